"""An EC linear as the C input of an EC-free W4 kernel (``lowering.c_in``, ``CInConfig``) under the interpreter vs
float64: the EC term first, then the base kernel adds ``x Wᵀ`` into it."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import batched, c_in, dispatch, gluon_w4, prefill
from spear_compile.lowering.configs import (CInConfig, DecodeConfig, DequantCublasConfig, GluonW4Config,
                                            PrefillConfig, block_r)
from tests.w4_problems import problem, reference, rel, v64

BC = batched.BatchedConfig
CASES = [  # (M, K, N, group, dtype, gated, bias, config)
    (5, 256, 48, 256, torch.bfloat16, True, False, CInConfig(BC(16, 16, 64, 1))),            # batched base
    (20, 256, 32, 64, torch.float16, False, True, CInConfig(BC(16, 32, 64, 2), split=True)),  # split-K, bias
    (3, 128, 40, 128, torch.bfloat16, True, True, CInConfig(DequantCublasConfig())),         # dequantize + cuBLAS
    (33, 256, 16, 32, torch.float16, True, False, CInConfig(DequantCublasConfig(), split=True)),
]


@pytest.mark.parametrize("m,k,n,group,dtype,gated,bias,cfg", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-g{c[3]}-{'g' if c[5] else 's'}-{c[7].name}" for c in CASES])
def test_c_in_vs_float64(m, k, n, group, dtype, gated, bias, cfg):
    """``dispatch.launch`` with a forced ``CInConfig``: y (poisoned first) equals float64 dequantize-then-matmul +
    bias + the gated / static EC, with the prologue's own projection and with a given u (the TP hook)."""
    t = problem(m, group, dtype, True, gated, bias, seed=torch.seed() % 2**30, k=k, n=n, r=8)
    ref = reference(t, group)
    out = dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                          t["gate_w"], t["gate_b"], config=cfg)
    assert out.shape == (m, n) and out.dtype == dtype and rel(out, ref) < 1e-2
    u = (t["x"].double() @ t["ec_A"].double().T).float()
    out_u = dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                            t["gate_w"], t["gate_b"], u=u, config=cfg)
    assert rel(out_u, ref) < 1e-2


def test_c_in_into_column_slices():
    """Members of a sibling group launched one by one write column slices of one output (``grouped._members_into``):
    c_in's ``v Bᵀ`` and the base's add both go through the slice's row stride."""
    from spear_compile.lowering import grouped
    m, k, group = 7, 256, 64
    ts = [problem(m, group, torch.bfloat16, True, True, True, 30 + i, k, n, 8) for i, n in enumerate((48, 32))]
    x = ts[0]["x"]
    ref = torch.cat([reference(dict(t, x=x), group) for t in ts], -1)
    members = [batched.Member(*(t[p] for p in ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w", "gate_b")))
               for t in ts]
    for cfg in (CInConfig(BC(16, 16, 64, 1)), CInConfig(DequantCublasConfig(), split=True)):
        y = torch.full((m, 80), float("nan"), dtype=torch.bfloat16)
        grouped._members_into(x, members, group, y, config=cfg)
        assert rel(y, ref) < 1e-2


@pytest.mark.parametrize("split", [1, 3])
def test_batched_kernel_adds_into_y_only_when_accumulating(split):
    """``accumulate=True``: y's C input is added (float64 check of C + x Wᵀ); without it y's old content is never
    read (NaN-poisoned y still comes out right)."""
    m, k, n, group = 6, 256, 48, 64
    t = problem(m, group, torch.bfloat16, False, False, False, seed=21 + split, k=k, n=n, r=0)
    ref = reference(t, group)
    member = batched.Member(t["qdata"], t["scale"], t["zero"])
    c = torch.randn(m, n, dtype=torch.bfloat16)
    y = c.clone()
    batched.run_members(BC(16, 16, 64, split), t["x"], [member], group, y, accumulate=True)
    assert rel(y, ref + c.double()) < 1e-2
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    batched.run_members(BC(16, 16, 64, split), t["x"], [member], group, y)
    assert rel(y, ref) < 1e-2


def test_candidates_take_the_fastest_bases_that_accumulate():
    swap = GluonW4Config(16, 128, 64, 4, 4, "swap")
    dec, pre = DecodeConfig(64, 256, 1, 4), PrefillConfig(64, 64, 64, 4, 3)
    ranked = [dec, pre, swap, GluonW4Config(), BC(16, 32, 64, 1), DequantCublasConfig()]
    assert [c.name for c in c_in.candidates(ranked)] == [
        CInConfig(swap).name, CInConfig(BC(16, 32, 64, 1)).name, CInConfig(swap, split=True).name]
    assert c_in.candidates([dec, pre]) == []
    assert not c_in.accumulates(GluonW4Config()) and c_in.accumulates(swap)
    assert CInConfig(swap).name.startswith("c_in[gluon[") and dispatch.runner(CInConfig(swap)) is c_in.run_c_in


@pytest.mark.parametrize("m,expect", [(1, False), (2, True), (16, True), (17, True), (256, True)])
def test_dispatch_offers_c_in_for_ec_keys_from_m_2(monkeypatch, m, expect):
    """An EC key's candidates (``dispatch.config_for``, tuner faked: the EC-free key's ranking is its candidate
    list) hold ``CInConfig`` over the EC-free key's fastest accumulating configs from M = 2 up; an EC-free key's
    never do."""
    from spear_compile.lowering.runtime import TUNER
    seen = {}
    monkeypatch.setattr(gluon_w4, "supported", lambda x2, q, g: True)
    monkeypatch.setattr(TUNER, "can_tune", lambda x: True)
    monkeypatch.setattr(TUNER, "ranked", lambda key, cands: cands)
    monkeypatch.setattr(TUNER, "pick", lambda key, dev, cands, run, ref, out: seen.setdefault(key.has_ec, cands)[0])
    k, n = 256, 128
    t = problem(m, 128, torch.bfloat16, True, True, False, 3, k, n, 16)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    args = (t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"],
            None, y)
    dispatch.config_for(t["x"], args, k, n, 128, True, True)
    ours = [c for c in seen[True] if isinstance(c, CInConfig)]
    assert bool(ours) == expect, [c.name for c in seen[True]]
    assert all(c_in.accumulates(c.base) for c in ours) and len(ours) <= c_in.TOP_BASES + 1
    assert not any(isinstance(c, CInConfig) for c in seen[False])


def test_gluon_base_refuses_other_variants():
    """Only the swap variant adds into y; the others are refused by name (never a silent overwrite)."""
    t = problem(64, 128, torch.bfloat16, False, False, False, 5, 256, 128, 0)
    y = torch.empty(64, 128, dtype=torch.bfloat16)
    with pytest.raises(SpearError, match="only the swap variant adds into y"):
        gluon_w4.run_gluon_w4(t["x"], t["qdata"], t["scale"], t["zero"], None, 128, y, GluonW4Config(),
                              accumulate=True)


def test_gluon_ec_epilogue_refusals():
    """The Gluon kernels take an EC only in the swap variant, up to ``MAX_SWAP_EC_RANK``: the others are refused by
    name before any work."""
    t = problem(64, 128, torch.bfloat16, True, True, False, 6, 256, 128, 8)
    y = torch.empty(64, 128, dtype=torch.bfloat16)
    ec = (t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], None, y)
    with pytest.raises(SpearError, match="has no EC epilogue"):
        gluon_w4.run_single(GluonW4Config(), t["x"], t["qdata"], t["scale"], t["zero"], None, 128, *ec)
    big = torch.zeros(128, gluon_w4.MAX_SWAP_EC_RANK + 16, dtype=torch.bfloat16)
    swap = GluonW4Config(16, 128, 64, 4, 4, "swap")
    with pytest.raises(SpearError, match="has no EC epilogue"):
        gluon_w4.run_single(swap, t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"], big, None, None,
                            None, y)
    with pytest.raises(SpearError, match=r"ec_B must be \[N=128, r\]"):   # B of another linear's rows
        gluon_w4.run_single(swap, t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"], t["ec_B"][:64],
                            t["gate_w"], t["gate_b"], None, y)
    with pytest.raises(SpearError, match="the EC epilogue takes v"):   # v of the wrong width
        gluon_w4.run_gluon_w4(t["x"], t["qdata"], t["scale"], t["zero"], None, 128, y, swap,
                              ec=(torch.zeros(64, 4, dtype=torch.bfloat16), t["ec_B"]))
    assert block_r(8) == 16 and block_r(32) == 32 and block_r(96) == 128   # the epilogue's rank block (BLOCK_R)


def test_prologue_gdc_needs_the_one_launch_prologue():
    t = problem(4, 128, torch.bfloat16, True, True, False, 7, 128, 32, 8)
    with pytest.raises(SpearError, match="gdc needs the one-launch prologue"):
        prefill.ec_prologue(t["x"], t["ec_A"], None, t["gate_w"], t["gate_b"], 8, split=True, gdc=True)


_PROLOGUE_SM90 = r"""
import json
from spear_compile.kernels.aot import compile_for
from spear_compile.kernels.ec_prologue import ec_prologue_kernel as kernel
out = {}
for gdc in (False, True):
    types = {n: "*bf16" for n in ("x_ptr", "a_ptr", "gw_ptr", "gb_ptr", "out_ptr")}
    types["u_ptr"] = "*fp32"
    consts = dict(BLOCK_M=16, BLOCK_K=256, BLOCK_R=32, COPY_X=False, U_GIVEN=False, GATED=True, LOOP=True,
                  INTERPRET=False, BLOCK_PAD=0, X_IN_OUT=False, GDC=gdc)
    values = dict(M=64, K=2048, R=32, RP=32, stride_xm=2048, stride_um=0, stride_om=32, col0=0)
    ptx = compile_for(kernel, consts, types, values).asm["ptx"]
    out[str(gdc)] = ptx.count("griddepcontrol.launch_dependents")
print(json.dumps(out))
"""


def test_prologue_releases_its_dependent_for_sm90():
    """``ec_prologue_kernel(GDC=True)`` compiled ahead of time for sm_90 (no GPU, no interpreter, in a subprocess)
    lets the Gluon swap kernel start at once (``griddepcontrol.launch_dependents``); without GDC it does not."""
    from tests.sm90_aot import run_sm90_script
    got = run_sm90_script(_PROLOGUE_SM90)
    assert got["False"] == 0 and got["True"] >= 1, got


def test_v64_is_the_term_added():
    """The EC term c_in puts in y first is the prologue's v times Bᵀ: checked alone (y = v Bᵀ) by running a base
    that adds nothing: a zero weight (codes equal to the zero points)."""
    m, k, n, group = 4, 128, 32, 128
    t = problem(m, group, torch.bfloat16, True, True, False, 9, k, n, 8)
    t["q"] = t["zero"].long().repeat_interleave(group, dim=1)
    from spear_compile.quant.packing import pack
    t["qdata"] = pack(t["q"], 4)
    out = dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], None, group, t["ec_A"], t["ec_B"],
                          t["gate_w"], t["gate_b"], config=CInConfig(BC(16, 16, 64, 1)))
    assert rel(out, v64(t) @ t["ec_B"].double().T) < 1e-2
