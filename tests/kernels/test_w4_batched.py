"""Batched-decode W4 (+EC) kernel (lowering/batched.py, w4_batched.py) vs a float64 dequantize-then-matmul reference.

Runs under the CPU interpreter on small random shapes (fixed seeds), outputs poisoned with NaN before every call.
The interpreter stores bf16 by truncation (the GPU rounds to nearest), which alone costs ~3e-3 relative: bf16
outputs are held to 2e-3 of the float64 reference truncated the same way, fp16 outputs (and bf16 on a GPU) to 3e-3
of the plain float64 reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import batched, dispatch, grouped
from spear_compile.lowering.runtime import WORKSPACES
from w4_problems import member, members_reference, problem, reference, rel, v64

BC = batched.BatchedConfig
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _truncate_bf16(ref):
    f = ref.float()
    return (f.view(torch.int32) & ~0xFFFF).view(torch.float32).double()


def _check(out, ref, dtype):
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        err = rel(out, _truncate_bf16(ref))
        assert err < 2e-3, err
    else:
        err = rel(out, ref)
        assert err < 3e-3, err


def _to(t):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _member(t):
    return batched.Member(t["qdata"], t["scale"], t["zero"], t["bias"], t.get("ec_A"), t.get("ec_B"),
                          t.get("gate_w"), t.get("gate_b"))


def _shape(seed):
    """(M, K, N) drawn from ``seed``: M in 2..40, K a multiple of 128 up to 512, N a multiple of 8 up to 96."""
    g = torch.Generator().manual_seed(seed)
    return (int(torch.randint(2, 41, (1,), generator=g)), 128 * int(torch.randint(1, 5, (1,), generator=g)),
            8 * int(torch.randint(2, 13, (1,), generator=g)))


CASES = [  # (seed, group (0: per-channel), dtype, ec, gated, bias, config)
    (11, 0, torch.bfloat16, False, False, False, BC(16, 32, 64, 1)),
    (12, 128, torch.bfloat16, False, False, True, BC(16, 32, 64, 2, swap=True)),
    (13, 0, torch.float16, False, False, True, BC(16, 64, 128, 2)),
    (14, 128, torch.float16, False, False, False, BC(32, 32, 128, 1, swap=True)),
    (15, 0, torch.bfloat16, True, True, False, BC(16, 32, 64, 2)),
    (16, 128, torch.bfloat16, True, True, True, BC(16, 32, 128, 1, swap=True)),
    (17, 0, torch.float16, True, True, True, BC(32, 32, 64, 1, swap=True)),
    (18, 128, torch.float16, True, True, False, BC(16, 64, 64, 4)),
    (19, 64, torch.bfloat16, True, False, False, BC(16, 32, 64, 2)),  # static EC, group 64
    (20, 0, torch.bfloat16, False, False, True, BC(16, 32, 64, 2, planes=True)),  # nibble-plane dots
    (26, 128, torch.float16, True, True, False, BC(16, 32, 128, 1, swap=True, planes=True)),
    (27, 64, torch.bfloat16, True, True, True, BC(32, 16, 64, 4, planes=True)),
    (29, 0, torch.bfloat16, False, False, False, BC(16, 32, 128, 2, swap=True, perm=True)),  # MMA-order k permutation
    (30, 128, torch.float16, True, True, True, BC(16, 32, 128, 1, swap=True, perm=True)),
    (31, 128, torch.bfloat16, False, False, True, BC(32, 16, 128, 2, perm=True)),
]


@pytest.mark.parametrize("seed,group,dtype,ec,gated,bias,cfg", CASES,
                         ids=[f"s{c[0]}-g{c[1]}-{str(c[2])[6:]}-ec{int(c[3])}{int(c[4])}-{c[6].name}" for c in CASES])
def test_single_vs_float64(seed, group, dtype, ec, gated, bias, cfg):
    m, k, n = _shape(seed)
    group = group or k
    t = _to(problem(m, group, dtype, ec, gated, bias, seed, k, n, 32))
    ref = reference(t, group).to(DEV)
    for _ in range(2):  # the second call checks the split-K counters were left at zero
        y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        batched.run_single(cfg, t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                           t["gate_w"], t["gate_b"], None, y)
        _check(y, ref, dtype)
    buffers = WORKSPACES.get(torch.device(DEV)).batched  # None: no split-K launch allocated any
    assert buffers is None or int(buffers[2].abs().sum()) == 0  # the arrival counters are left at zero


def test_ec_term_is_added():
    """The EC must change the output by its own term: the W4-only reference is far from the EC output."""
    m, k, n = 6, 256, 40
    t = problem(m, 128, torch.float16, True, True, False, 5, k, n, 32, ec_std=0.2)
    y = torch.full((m, n), float("nan"), dtype=torch.float16)
    batched.run_single(BC(16, 32, 64, 2), t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"], t["ec_B"],
                       t["gate_w"], t["gate_b"], None, y)
    _check(y, reference(t, 128), torch.float16)
    assert rel(y, reference(t, 128, with_ec=False)) > 1e-2


GROUPED = [  # (seed, member Ns, group (0: per-channel), dtype, bias, ec, config)
    (21, (64, 16, 16), 128, torch.bfloat16, False, False, BC(16, 32, 64, 1)),
    (22, (48, 40), 0, torch.float16, True, False, BC(16, 32, 128, 2, swap=True)),
    (23, (32, 16, 24, 8), 128, torch.float16, False, False, BC(32, 16, 64, 2)),
    (24, (40, 24, 24), 0, torch.bfloat16, False, True, BC(16, 32, 64, 2)),  # q|k|v with their ECs
    (25, (64, 64), 128, torch.float16, True, True, BC(16, 32, 128, 1, swap=True)),  # gate|up with ECs
    (28, (32, 16, 16), 0, torch.float16, False, False, BC(16, 16, 64, 2, planes=True)),
    (32, (48, 16), 128, torch.bfloat16, False, True, BC(16, 32, 128, 2, swap=True, perm=True)),
]


@pytest.mark.parametrize("seed,ns,group,dtype,bias,ec,cfg", GROUPED,
                         ids=[f"s{c[0]}-{len(c[1])}m-g{c[2]}-ec{int(c[5])}-{c[6].name}" for c in GROUPED])
def test_grouped_vs_float64(seed, ns, group, dtype, bias, ec, cfg):
    g = torch.Generator().manual_seed(seed)
    m, k, _ = _shape(seed)
    group = group or k
    x = torch.randn(m, k, generator=g).to(dtype)
    members = []
    for i, n in enumerate(ns):
        t = problem(m, group, dtype, ec, ec, bias, seed * 10 + i, k, n, 32)
        t["x"] = x
        members.append(_to(t))
    ref = torch.cat([reference(dict(t, x=x.to(DEV)), group) for t in members], -1)
    for _ in range(2):
        y = torch.full((m, sum(ns)), float("nan"), dtype=dtype, device=DEV)
        batched.run_members(cfg, x.to(DEV), [_member(t) for t in members], group, y)
        _check(y, ref, dtype)


def test_dispatch_routes_batched_configs():
    """``dispatch.launch`` / ``launch_grouped`` with a forced ``BatchedConfig`` run this kernel (the hook), 3-D x."""
    g = torch.Generator().manual_seed(31)
    k, group, dtype = 256, 128, torch.bfloat16
    t = problem(10, group, dtype, True, True, True, 31, k, 48, 32)
    x3 = t["x"].reshape(2, 5, k)
    out = dispatch.launch(x3, t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"], t["gate_w"],
                          t["gate_b"], config=BC(16, 32, 64, 2))
    assert out.shape == (2, 5, 48)
    _check(out.reshape(10, 48), reference(t, group), dtype)
    ms = [member(n, k, group, dtype, False, g) for n in (32, 16)]
    out = grouped.launch_grouped(x3, [t_["qdata"] for t_ in ms], [t_["scale"] for t_ in ms],
                                  [t_["zero"] for t_ in ms], None, group, config=BC(16, 16, 128, 1, swap=True))
    _check(out.reshape(10, 48), members_reference(t["x"], ms, group), dtype)


def test_u_given_runs_the_reference_path():
    t = problem(4, 128, torch.float16, True, True, False, 41, 256, 32, 32)
    u = (t["x"].double() @ t["ec_A"].double().T).to(torch.float16)
    y = torch.full((4, 32), float("nan"), dtype=torch.float16)
    batched.run_single(BC(16, 32, 64, 1), t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"], t["ec_B"],
                       t["gate_w"], t["gate_b"], u, y)
    ref = t["x"].double() @ __import__("w4_problems").w64(t, 128).T + v64(t, u) @ t["ec_B"].double().T
    assert rel(y, ref) < 1e-2


def test_candidates_range_and_blocks():
    assert batched.candidates_for(1, 2048, [2048], 128) == []
    assert batched.candidates_for(513, 2048, [2048], 128) == []
    assert batched.candidates_for(16, 2048, [2048], 128, rank=128) == []
    for m in (2, 16, 64, 256, 512):
        for k, group in ((2048, 128), (2048, 2048), (11008, 128), (11008, 11008)):
            cands = batched.candidates_for(m, k, [512, 256], group)
            assert cands, (m, k, group)
            for c in cands:
                assert group >= k or group % c.block_k == 0
                assert c.block_m <= max(16, m) or c.block_m == 64


def test_perm_needs_block_k_128():
    t = problem(3, 64, torch.float16, False, False, False, 53, 256, 16, 32)
    y = torch.empty(3, 16, dtype=torch.float16)
    with pytest.raises(SpearError, match="perm needs BLOCK_K = 128"):
        batched.run_single(BC(16, 16, 128, 1, perm=True), t["x"], t["qdata"], t["scale"], t["zero"], None, 64,
                           None, None, None, None, None, y)


def test_refuses_mixed_members():
    t1 = problem(3, 128, torch.float16, True, False, False, 51, 256, 16, 32)
    t2 = problem(3, 128, torch.float16, False, False, False, 52, 256, 16, 32)
    y = torch.empty(3, 32, dtype=torch.float16)
    with pytest.raises(SpearError, match="cannot run these members"):
        batched.run_members(BC(16, 16, 64, 1), t1["x"], [_member(t1), _member(t2)], 128, y)
