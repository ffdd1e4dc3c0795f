"""M = 1 GEMV load-path configs (software-pipelined K loop, 128 + q nibbles, x as int32 pairs, 16-byte row
alignment) under the interpreter vs float64: single and grouped launches, per-channel / g128 / seg blocks,
bf16 / fp16, split-K, partial N tiles, K whose rows are not 16-byte aligned."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.lowering import configs, decode, dispatch, grouped, runtime
from tests.w4_problems import member, members_reference, rel

D = configs.DecodeConfig
G = configs.GroupedConfig


_member = member


_reference = members_reference


_rel = rel


SINGLE = [  # (K, N, group (0: per-channel), dtype, bias, config)
    (256, 64, 0, torch.bfloat16, True, D(16, 128, 1, 2, stages=3, lean=2, xw=True)),
    (256, 48, 0, torch.float16, False, D(8, 64, 2, 4, stages=2, lean=1, xw=True)),    # split-K, fp16 pairs
    (512, 40, 0, torch.bfloat16, False, D(16, 256, 1, 2, stages=4)),                     # planes, no lean
    (264, 24, 0, torch.bfloat16, True, D(8, 128, 1, 2, stages=3, lean=1, xw=True)),   # K/8 odd: masked tail
    (264, 24, 0, torch.float16, False, D(8, 128, 2, 2, lean=2)),                      # register path, lop3
    (256, 64, 64, torch.bfloat16, False, D(16, 64, 1, 2, stages=3, lean=1)),          # g64, one group a block
    (256, 40, 32, torch.float16, True, D(8, 32, 2, 2, stages=2, lean=1, xw=True)),    # g32, split-K
    (512, 32, 64, torch.bfloat16, True, D(8, 256, 1, 2, seg=True, stages=3, lean=2, xw=True, maxnreg=96)),
    (512, 24, 32, torch.float16, False, D(8, 128, 2, 2, seg=True, stages=2, lean=1)),
    (512, 32, 64, torch.bfloat16, False, D(16, 256, 1, 4, seg=True, lean=1)),         # seg, register path
    (256, 40, 0, torch.bfloat16, True, D(16, 128, 2, 2, stages=3, lean=1, xw=True, tma=True)),  # TMA, partial tile
    (256, 48, 64, torch.float16, False, D(32, 64, 1, 2, stages=2, lean=1, tma=True)),  # TMA, g64
    (264, 24, 0, torch.bfloat16, False, D(8, 128, 1, 2, stages=3, lean=1, tma=True)),  # K/8 odd: cp.async instead
    # nibble pairs (lean 3: 256 + q / 16 + q, one shift a pair) on every body; rows-inner seg tiles (rt)
    (256, 64, 0, torch.bfloat16, True, D(16, 128, 1, 2, stages=3, lean=3, xw=True)),
    (264, 24, 0, torch.float16, False, D(8, 128, 2, 2, stages=2, lean=3)),            # planes, split-K, masked tail
    (264, 24, 0, torch.bfloat16, False, D(8, 128, 2, 2, lean=3)),                     # register path
    (256, 40, 32, torch.float16, True, D(8, 32, 2, 2, lean=3)),                       # register path, g32
    (256, 64, 64, torch.bfloat16, False, D(16, 64, 1, 2, stages=3, lean=3, xw=True)),  # one group a block
    (512, 32, 64, torch.bfloat16, True, D(8, 256, 1, 2, seg=True, stages=3, lean=3, xw=True)),
    (512, 40, 64, torch.bfloat16, True, D(16, 256, 1, 2, seg=True, stages=3, lean=3, xw=True, rt=True)),
    (512, 24, 32, torch.float16, False, D(8, 128, 2, 2, seg=True, stages=2, lean=2, xw=True, rt=True)),
    (544, 24, 16, torch.bfloat16, False, D(8, 64, 2, 2, seg=True, stages=2, lean=3, rt=True)),  # planes, g16, tail block
    (512, 32, 64, torch.float16, True, D(16, 256, 1, 4, seg=True, lean=3, rt=True)),  # seg register path
    (512, 32, 64, torch.bfloat16, False, D(16, 256, 2, 2, seg=True, stages=3, rt=True, xw=True)),  # no lean
]


@pytest.mark.parametrize("k,n,group,dtype,bias,cfg", SINGLE, ids=[f"{c[0]}x{c[1]}-g{c[2]}-{c[5].name}" for c in SINGLE])
def test_single_load_configs(k, n, group, dtype, bias, cfg):
    g = torch.Generator().manual_seed(55228)
    group = group or k
    t = _member(n, k, group, dtype, bias, g)
    x = torch.randn(1, k, generator=g).to(dtype)
    ref = _reference(x, [t], group)
    for _ in range(2):  # the second call checks the split-K workspace was left clean
        out = dispatch.launch(x, t["qdata"], t["scale"], t["zero"], t["bias"], group, config=cfg)
        assert out.shape == (1, n) and _rel(out, ref) < 1e-2
    acc, arrive = runtime.WORKSPACES.get(x.device).for_n(n)
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0


GROUPED = [  # (K, member Ns, group (0: per-channel), dtype, bias, config)
    (256, (64, 16, 16), 0, torch.bfloat16, False, G(16, 128, 1, 2, stages=3, lean=2, xw=True)),
    (256, (48, 24), 0, torch.float16, True, G(8, 128, 2, 4, stages=2, lean=1, xw=True)),
    (256, (32, 16, 24, 8), 64, torch.bfloat16, True, G(16, 64, 2, 2, stages=3, lean=1)),
    (512, (32, 24), 64, torch.float16, False, G(8, 256, 1, 2, seg=True, stages=3, lean=2, xw=True, maxnreg=96)),
    (512, (16, 40), 128, torch.bfloat16, False, G(16, 256, 2, 2, seg=True, stages=2, lean=1)),
    (256, (40, 16, 24), 0, torch.bfloat16, False, G(16, 128, 2, 2, stages=3, lean=1, xw=True, tma=True)),
    (256, (64, 16, 16), 0, torch.float16, True, G(16, 128, 2, 2, stages=3, lean=3, xw=True)),
    (1024, (32, 24), 128, torch.bfloat16, True, G(16, 512, 1, 2, seg=True, stages=3, lean=3, xw=True, rt=True)),
    (1024, (40, 16), 128, torch.float16, False, G(32, 512, 2, 2, seg=True, stages=3, lean=3, xw=True, rt=True)),
    (512, (16, 40), 128, torch.bfloat16, False, G(16, 256, 2, 4, seg=True, stages=3, lean=3, xw=True)),
]


@pytest.mark.parametrize("k,ns,group,dtype,bias,cfg", GROUPED, ids=[f"{c[0]}-{c[1]}-g{c[2]}-{c[5].name}" for c in GROUPED])
def test_grouped_load_configs(k, ns, group, dtype, bias, cfg):
    g = torch.Generator().manual_seed(63147)
    group = group or k
    members = [_member(n, k, group, dtype, bias, g) for n in ns]
    x = torch.randn(1, k, generator=g).to(dtype)
    ref = _reference(x, members, group)
    for _ in range(2):
        out = grouped.launch_grouped(x, [t["qdata"] for t in members], [t["scale"] for t in members],
                                      [t["zero"] for t in members], [t["bias"] for t in members], group, config=cfg)
        assert out.shape == (1, sum(ns)) and _rel(out, ref) < 1e-2
    acc, arrive = runtime.WORKSPACES.get(x.device).for_group(sum(ns))
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0


def test_unaligned_x_falls_back_to_planes():
    """x pairs need a 4-byte aligned row: an x view starting at an odd element runs the plane loads."""
    g = torch.Generator().manual_seed(5)
    t = _member(32, 256, 256, torch.bfloat16, False, g)
    xb = torch.randn(1, 257, generator=g).to(torch.bfloat16)
    x = xb[:, 1:]
    assert x.data_ptr() % 4 != 0
    cfg = D(16, 128, 1, 2, stages=3, lean=1, xw=True)
    assert not decode.load_kwargs(cfg, x)["XW"]
    out = dispatch.launch(x, t["qdata"], t["scale"], t["zero"], None, 256, config=cfg)
    assert _rel(out, _reference(x, [t], 256)) < 1e-2


def test_load_kwargs():
    x = torch.zeros(1, 2048, dtype=torch.bfloat16)
    kw = decode.load_kwargs(D(16, 512, 1, 2, stages=3, lean=2, xw=True, maxnreg=96), x)
    assert kw == dict(STAGES=3, LEAN=1, XW=True, KW_DIV=16, TMA=False)  # interpreter: plain ops, no register cap
    assert decode.load_kwargs(D(16, 128, 1, 4, tc=True, stages=3, lean=1), x)["STAGES"] == 0  # FMA only
    assert decode.load_kwargs(D(16, 128, 1, 2), torch.zeros(1, 264, dtype=torch.bfloat16))["KW_DIV"] == 1
    assert not decode.load_kwargs(D(8, 128, 1, 2, stages=3, tma=True), torch.zeros(1, 264, dtype=torch.bfloat16))["TMA"]
    assert not decode.load_kwargs(D(8, 256, 1, 2, stages=3, tma=True, seg=True), x)["TMA"]  # seg: cp.async
    assert decode.load_kwargs(D(16, 128, 1, 2), torch.zeros(1, 2064, dtype=torch.bfloat16))["KW_DIV"] == 2
    assert decode.load_kwargs(D(16, 128, 1, 2, stages=3, lean=3), x)["LEAN"] == 4  # pairs: plain ops here
    assert decode.load_kwargs(D(16, 512, 1, 2, seg=True, stages=3, lean=3, rt=True), x)["LEAN"] == 12  # + rt flag
    assert decode.load_kwargs(D(16, 512, 1, 2, stages=3, lean=2, rt=True), x)["LEAN"] == 1  # rt: seg only
    assert D(16, 512, 1, 2, seg=True, stages=3, lean=3, rt=True, xw=True).name.endswith(",seg,st=3,pair,rt,xw]")
