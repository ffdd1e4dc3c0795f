"""Batched-decode W4 (+EC) kernel (lowering/batched.py, w4_batched.py) vs a float64 dequantize-then-matmul reference.

Runs under the CPU interpreter on small random shapes (fixed seeds), outputs poisoned with NaN before every call.
The interpreter stores bf16 by truncation (the GPU rounds to nearest), which alone costs ~3e-3 relative: bf16
outputs are held to 2e-3 of the float64 reference truncated the same way, fp16 outputs (and bf16 on a GPU) to 3e-3
of the plain float64 reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import dataclasses

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import batched, configs, dispatch, grouped
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
    # Σ_k x by a dot with ones (xsum_mma): per-channel accumulated across the loop, grouped per block
    (33, 0, torch.bfloat16, False, False, False, BC(16, 32, 128, 2, swap=True, perm=True, xsum_mma=True)),
    (34, 128, torch.float16, True, True, True, BC(32, 32, 64, 1, xsum_mma=True)),
    (35, 0, torch.float16, True, True, False, BC(16, 32, 64, 2, xsum_mma=True)),
    (36, 64, torch.bfloat16, False, False, True, BC(16, 16, 64, 2, swap=True, xsum_mma=True)),
    # ec_pre: g(u) ⊙ u by ec_gu_kernel first, the K loop W4-only (split-K, swap + perm, static EC, grouped scales)
    (38, 0, torch.bfloat16, True, True, False, BC(16, 32, 128, 2, swap=True, perm=True, ec_pre=True)),
    (39, 128, torch.float16, True, True, True, BC(16, 32, 64, 1, ec_pre=True)),
    (40, 64, torch.bfloat16, True, False, True, BC(32, 16, 64, 4, ec_pre=True)),
    # the perm tile at BLOCK_M 64 / 32 (swap: M is the MMA's N), per-channel and grouped, with and without EC
    (43, 0, torch.bfloat16, True, True, True, BC(64, 32, 128, 2, swap=True, perm=True)),
    (44, 128, torch.float16, False, False, False, BC(64, 32, 128, 1, swap=True, perm=True)),
    (45, 0, torch.float16, True, True, False, BC(32, 32, 128, 2, swap=True, perm=True, ec_pre=True)),
    (46, 0, torch.bfloat16, True, True, True, BC(16, 256, 128, 2, swap=True, perm=True)),
    # zsub: q - zero in the weight tile, no Σx term (per-channel and grouped, both dtypes, swap, perm, EC, ec_pre)
    (47, 0, torch.bfloat16, False, False, False, BC(64, 32, 64, 2, zsub=True)),
    (48, 128, torch.bfloat16, True, True, True, BC(32, 32, 128, 1, zsub=True)),
    (49, 0, torch.float16, True, False, True, BC(64, 32, 128, 2, swap=True, perm=True, zsub=True)),
    (50, 64, torch.float16, False, False, False, BC(32, 16, 64, 2, swap=True, zsub=True)),
    (51, 0, torch.bfloat16, True, True, False, BC(64, 32, 128, 2, swap=True, perm=True, ec_pre=True, zsub=True)),
]


@pytest.mark.parametrize("seed,group,dtype,ec,gated,bias,cfg", CASES,
                         ids=[f"s{c[0]}-g{c[1]}-{str(c[2])[6:]}-ec{int(c[3])}{int(c[4])}-{c[6].name}" for c in CASES])
def test_single_vs_float64(seed, group, dtype, ec, gated, bias, cfg):
    m, k, n = _shape(seed)
    _check_single(cfg, seed, m, k, n, group or k, dtype, ec, gated, bias)


def _check_single(cfg, seed, m, k, n, group, dtype, ec, gated, bias):
    """One launch of ``cfg`` vs the float64 reference, twice (the second call checks the split-K counters were left
    at zero), into a NaN-poisoned output."""
    t = _to(problem(m, group, dtype, ec, gated, bias, seed, k, n, 32))
    ref = reference(t, group).to(DEV)
    for _ in range(2):
        y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        batched.run_single(cfg, t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                           t["gate_w"], t["gate_b"], None, y)
        _check(y, ref, dtype)
    buffers = WORKSPACES.get(torch.device(DEV)).batched  # None: no split-K launch allocated any
    assert buffers is None or int(buffers[2].abs().sum()) == 0  # the arrival counters are left at zero


@pytest.mark.parametrize("k,group,cfg", [(320, 0, BC(16, 32, 128, 2)), (192, 0, BC(16, 32, 128, 1, swap=True, xsum_mma=True)),
                                         (320, 0, BC(16, 16, 128, 2, swap=True, perm=True)), (448, 64, BC(16, 32, 64, 2)),
                                         (320, 0, BC(16, 32, 128, 2, ec_pre=True)),
                                         (448, 64, BC(16, 32, 64, 1, swap=True, ec_pre=True)),
                                         (320, 0, BC(32, 32, 128, 2, zsub=True)), (448, 64, BC(32, 32, 64, 1, swap=True, zsub=True))],
                         ids=["k320-pc", "k192-pc-xsum", "k320-pc-perm", "k448-g64", "k320-pc-ecpre", "k448-g64-swap-ecpre",
                              "k320-pc-zsub", "k448-g64-swap-zsub"])
def test_k_not_a_multiple_of_block_k(k, group, cfg):
    """K not a multiple of BLOCK_K: the last block's masked columns (the ``EVEN_K`` constexpr off) add nothing."""
    m, n = 7, 40
    group = group or k
    t = _to(problem(m, group, torch.bfloat16, True, True, True, 41, k, n, 32))
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    batched.run_single(cfg, t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                       t["gate_w"], t["gate_b"], None, y)
    _check(y, reference(t, group).to(DEV), torch.bfloat16)


@pytest.mark.parametrize("ec_pre", [False, True], ids=["u-in-loop", "ec-pre"])
def test_ec_term_is_added(ec_pre):
    """The EC must change the output by its own term: the W4-only reference is far from the EC output."""
    m, k, n = 6, 256, 40
    t = problem(m, 128, torch.float16, True, True, False, 5, k, n, 32, ec_std=0.2)
    y = torch.full((m, n), float("nan"), dtype=torch.float16)
    batched.run_single(BC(16, 32, 64, 2, ec_pre=ec_pre), t["x"], t["qdata"], t["scale"], t["zero"], None, 128,
                       t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], None, y)
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
    (37, (32, 24), 0, torch.float16, True, False, BC(16, 32, 64, 2, xsum_mma=True)),
    (41, (40, 24, 24), 0, torch.bfloat16, False, True, BC(16, 32, 128, 2, swap=True, perm=True, ec_pre=True)),
    (42, (64, 64), 128, torch.float16, True, True, BC(16, 32, 64, 1, ec_pre=True)),  # one program per member's gu
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


@pytest.mark.parametrize("k", [640, 1408, 1920, 4224])
def test_ec_pre_split_sums_vs_float64(k):
    """ec_gu_kernel's finisher sums the split slots a few at a time (masked past the last): K of 5, 11, 15 and 33
    blocks make 3, 6, 8 and 17 splits, none a whole number of the slots it loads together."""
    m, n = 5, 32
    split, _ = batched.ec_gu_split(m, 1, k)
    assert split == {640: 3, 1408: 6, 1920: 8, 4224: 17}[k]
    t = _to(problem(m, k, torch.bfloat16, True, True, False, 60 + split, k, n, 32))
    ref = reference(t, k).to(DEV)
    for _ in range(2):  # the second launch finds the counters at zero again
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        batched.run_single(BC(16, 32, 128, 1, swap=True, perm=True, ec_pre=True), t["x"], t["qdata"], t["scale"],
                           t["zero"], None, k, t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], None, y)
        _check(y, ref, torch.bfloat16)


def test_ec_gu_splits_k_at_decode_m():
    """ec_gu_kernel's split of K: whole BLOCK_K blocks, none empty, about EC_GU_PROGRAMS programs in all (the
    split cases above run it: each compares against float64 and leaves the counters at zero)."""
    assert batched.ec_gu_split(16, 3, 4096) == (16, 256)    # 7B q|k|v at M = 16: 1 M tile x 3 members x 16
    assert batched.ec_gu_split(64, 3, 4096) == (4, 1024)
    assert batched.ec_gu_split(7, 1, 320) == (2, 256)      # 3 K blocks: the second split holds one (masked) block
    assert batched.ec_gu_split(512, 4, 4096) == (1, 4096)
    for m, g, k in ((2, 1, 128), (16, 2, 11008), (40, 4, 640)):
        split, per = batched.ec_gu_split(m, g, k)
        assert per % batched.EC_GU_BLOCK_K == 0 and split * per >= k and (split - 1) * per < k


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


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 24, 200])
def test_grouped_ec_through_the_tuner(m):
    """``launch_grouped_ec`` as the compiled graph calls it (no config): at M 2..512 the tuner times the batched launch
    over every member and its EC against the members' own launches; every M matches float64."""
    k, group, dtype = 512, 128, torch.bfloat16
    x = problem(m, group, dtype, False, False, False, 40, k, 8, 32)["x"].to(DEV)
    ms = [_to(problem(m, group, dtype, True, True, False, 41 + i, k, n, 32)) for i, n in enumerate((256, 128, 128))]
    parts = [[t[name] for t in ms] for name in ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w", "gate_b")]
    for _ in range(2):
        out = grouped.launch_grouped_ec(x, *parts[:4], group, *parts[4:])
        _check(out, torch.cat([reference(dict(t, x=x), group) for t in ms], -1), dtype)
    name = grouped.choose_grouped_ec(m, k, (256, 128, 128), group, dtype, rank=32)
    assert ("tuned" in name) == (batched.MIN_M <= m <= batched.MAX_M), name


@pytest.mark.gpu
@pytest.mark.parametrize("m,ns", [(1, (256, 128, 128)), (1, (512, 512)), (24, (256, 128, 128)), (200, (512, 512))])
def test_merged_ec_group_through_the_tuner(m, ns):
    """Siblings laid out by ``pack_members`` (weights adjacent, ECs merged into one of rank g·r = 96 or 64):
    ``launch_grouped_ec`` as the compiled graph calls it times the merged linear (the single-linear EC paths at
    rank g·r) against the members' own and batched launches; every pick matches float64, as does each forced one."""
    from spear_compile.compile.siblings import merged_ec_views
    k, group, dtype = 512, 128, torch.bfloat16
    x = problem(m, group, dtype, False, False, False, 50, k, 8, 32)["x"].to(DEV)
    ms = [_to(problem(m, group, dtype, True, True, False, 51 + i, k, n, 32)) for i, n in enumerate(ns)]
    names = ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w", "gate_b")
    parts = [[t[name] for t in ms] for name in names]
    ref = torch.cat([reference(dict(t, x=x), group) for t in ms], -1)
    for i in range(3):   # the weights as one buffer's row blocks, the ECs merged
        joined, row = torch.cat(parts[i]), 0
        for j, t in enumerate(parts[i]):
            parts[i][j], row = joined[row:row + t.shape[0]], row + t.shape[0]
    parts[4:] = [list(v) for v in zip(*merged_ec_views(*parts[4:]))]
    assert grouped.merged_ec(*parts[4:]) is not None
    for cfg in (None, None, configs.GroupedConfig(concat=True), configs.GroupedConfig(per_member=True)):
        out = grouped.launch_grouped_ec(x, *parts[:4], group, *parts[4:], config=cfg)
        _check(out, ref, dtype)
    name = grouped.choose_grouped_ec(m, k, ns, group, dtype, rank=32, merged=True)
    assert "(tuned, bucket" in name, name


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,group", [(16, 2048, 2048, 2048), (64, 2048, 6144, 128), (256, 4096, 4096, 2048),
                                         (200, 2048, 8192, 128)])
def test_c_in_through_the_tuner(m, k, n, group):
    """An EC linear (gated r = 32) as the compiled graph calls it: the tuner also times the EC as the C input of
    the EC-free key's fastest accumulating configs (``lowering.c_in``: Gluon swap, batched, dequantize + cuBLAS);
    the pick and each offered ``CInConfig``, forced, match float64."""
    from spear_compile.lowering import c_in
    from spear_compile.lowering.runtime import TUNER
    from spear_compile.lowering.tuner import linear_key
    dtype = torch.bfloat16
    t = _to(problem(m, group, dtype, True, True, False, 60, k, n, 32))
    ref = reference(t, group)
    args = (t["x"], t["qdata"], t["scale"], t["zero"], None, group, t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"])
    _check(dispatch.launch(*args), ref, dtype)
    key = linear_key(m, k, n, group, dtype, True, True, 32)
    offered = [name for name, _ in TUNER.timings[key] if name.startswith("c_in[")]
    assert offered, TUNER.timings[key]
    free = TUNER.ranked(linear_key(m, k, n, group, dtype, False, False),
                        dispatch.own_candidates(t["x"], (*args, None, None), group, 132))
    for cfg in c_in.candidates(free):
        _check(dispatch.launch(*args, config=cfg), ref, dtype)


def test_switched_off_it_is_no_candidate(monkeypatch):
    """``SPEAR_BATCHED_KERNEL=0`` takes the kernel out of the tuner's lists (the ``--existing`` side of
    bench/batched_sweep.py), at the next call."""
    assert batched.candidates_for(16, 2048, [2048], 128)
    monkeypatch.setenv("SPEAR_BATCHED_KERNEL", "0")
    assert batched.candidates_for(16, 2048, [2048], 128) == []
    monkeypatch.setenv("SPEAR_BATCHED_KERNEL", "1")
    assert batched.candidates_for(16, 2048, [2048], 128)


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


def test_zsub_is_a_candidate_above_m16_only_and_never_with_xsum_or_planes():
    for m, want in ((16, False), (64, True), (256, True), (512, True)):
        cands = batched.candidates_for(m, 2048, [2048], 2048)
        assert any(c.zsub for c in cands) == want, m
        assert not any(c.zsub and (c.xsum_mma or c.planes or c.block_m <= 16) for c in cands)
        # every zsub candidate is a copy of one without it (the tuner times both), but the large M > 64 tiles
        # (batched._LARGE_512), which are candidates with zsub only
        assert {dataclasses.replace(c, zsub=False) for c in cands if c.zsub and not _large(c)} <= set(cands)
    t = _to(problem(8, 128, torch.bfloat16, False, False, False, 3, 128, 32, 32))
    with pytest.raises(SpearError, match="zsub replaces"):
        batched.run_single(BC(16, 16, 128, 1, xsum_mma=True, zsub=True), t["x"], t["qdata"], t["scale"], t["zero"],
                           None, 128, None, None, None, None, None, torch.empty(8, 32, dtype=torch.bfloat16, device=DEV))


def _large(c):
    """The config is one of ``batched._LARGE_512``'s shapes (their BLOCK_K, 64 or 128, divides a group of 128)."""
    return (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.swap, c.planes, c.perm,
            c.xsum_mma) in batched._LARGE_512


# Session 25: the large M = 65-512 tiles (zsub) per shape: per-channel without EC (split-K, two M and two N tiles,
# the second of each partial), g128 with the gated EC by ec_pre (fp16), per-channel with a static EC by ec_pre and
# split-K, g128 with the in-loop u. More than the tuner offers (it keeps the non-swap tiles per-channel, at split 1
# and EC by ec_pre only, where their sm_90 registers did not spill): the kernel runs every combination all the same
def _large_cases():
    out = []
    for i, (bm, bn, bk, warps, stages, swap, planes, perm, xsum) in enumerate(batched._LARGE_512):
        cfg = lambda split, ec_pre: BC(bm, bn, bk, split, warps, stages, swap, planes, perm, xsum, ec_pre,  # noqa
                                       zsub=True)
        out += [(70 + 4 * i, bm + 2, 512, bn + 24, 0, torch.bfloat16, False, False, True, cfg(2, False)),
                (71 + 4 * i, 67, 384, bn // 2 + 8, 128, torch.float16, True, True, False, cfg(1, True)),
                (72 + 4 * i, 200, 512, bn + 8, 0, torch.bfloat16, True, False, True, cfg(2, True)),
                (73 + 4 * i, 80, 256, 40, 128, torch.bfloat16, True, True, False, cfg(2, False))]
    return out


LARGE_CASES = _large_cases()


@pytest.mark.parametrize("seed,m,k,n,group,dtype,ec,gated,bias,cfg", LARGE_CASES,
                         ids=[f"s{c[0]}-m{c[1]}-g{c[4]}-ec{int(c[6])}{int(c[7])}-{c[9].name}" for c in LARGE_CASES])
def test_large_m_tiles_vs_float64(seed, m, k, n, group, dtype, ec, gated, bias, cfg):
    _check_single(cfg, seed, m, k, n, group or k, dtype, ec, gated, bias)


LLAMA = {  # (K, member Ns) of q|k|v, o, gate|up, down
    "Llama-3.2-1B": ((2048, (2048, 512, 512)), (2048, (2048,)), (2048, (8192, 8192)), (8192, (2048,))),
    "Llama-2-7B": ((4096, (4096,) * 3), (4096, (4096,)), (4096, (11008, 11008)), (11008, (4096,))),
}


@pytest.mark.parametrize("model", list(LLAMA))
def test_large_m_tiles_are_valid_candidates_at_real_shapes(model):
    """At M = 128, 256, 512 and the models' launches: the large tiles are candidates with zsub only, ec_pre only on
    EC keys, g128 only where their registers did not spill (the swap 128 x 128), never half padding, BLOCK_K within
    the group (perm at 128), split-K within the workspace limit, >= 1 K block a split and only where the finisher
    did not spill (the swap tiles); every shape is offered at M = 256 per-channel."""
    seen = set()
    for m in (128, 256, 512):
        for k, ns in LLAMA[model]:
            for group in (k, 128):
                for ec in (False, True):
                    cands = batched.candidates_for(m, k, list(ns), group, 132, ec, 32 if ec else 0)
                    assert len(cands) == len(set(cands))
                    for c in (c for c in cands if _large(c)):
                        assert c.zsub and c.ec_pre == ec and not (c.planes or c.xsum_mma), c
                        assert c.block_m < 2 * m, c
                        assert group >= k or (group % c.block_k == 0 and batched._tile_regs(
                            c.block_m, c.block_n, c.block_k, c.num_warps, True) <= batched.GROUPED_TILE_REGS), c
                        assert not c.perm or c.block_k == 128, c
                        assert batched._split_ok(c, m, sum(ns)) and c.split_k <= k // c.block_k, c
                        assert c.split_k == 1 or batched._tile_regs(
                            c.block_m, c.block_n, c.block_k, c.num_warps, False) <= batched.SPLIT_TILE_REGS, c
                        if m == 256 and group >= k and not ec:
                            seen.add(dataclasses.replace(c, split_k=1, zsub=False))
    assert len(seen) == len(batched._LARGE_512)
    assert not any(_large(c) for c in batched.candidates_for(64, 2048, [2048], 2048))  # M <= 64: _SHAPES_64


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


_SM90_SCRIPT = r"""
import json
from spear_compile.kernels.aot import compile_for
from spear_compile.kernels.w4_batched import w4_batched_kernel as kernel

out = {}
VARIANTS = (("bf16-pc-ec-swap-perm", True, True, True, 16, 128, True, True, False, False),
            ("fp16-g128-noswap", False, False, False, 16, 64, False, False, False, False),
            ("bf16-g128-m64-xsum", True, False, True, 64, 128, False, False, True, False),
            ("bf16-pc-ecpre-swap-perm", True, True, True, 16, 128, True, True, False, True),
            ("bf16-pc-m64-zsub", True, True, False, 64, 128, False, False, False, False, True),
            ("fp16-g128-m64-swap-zsub", False, False, True, 64, 128, True, False, False, False, True),
            ("bf16-pc-m128-swap-perm-ecpre-zsub", True, True, True, 128, 128, True, True, False, True, True))
for name, x_bf16, pc, ec, bm, bn, swap, perm, xsum, ec_pre, *zsub in VARIANTS:
    dt = "*bf16" if x_bf16 else "*fp16"
    types = {n: dt for n in kernel.arg_names[:kernel.arg_names.index("N0")]}
    types.update({f"q{i}": "*i32" for i in range(4)}, ws_ptr="*fp32", uws_ptr="*fp32", cnt_ptr="*i32")
    consts = dict(MEMBERS=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, BLOCK_R=32, USE_SPLIT=True, PER_CHANNEL=pc,
                  X_BF16=x_bf16, HAS_BIAS=False, HAS_EC=ec, GATED=ec, SWAP=swap, INTERPRET=False, PLANES=False,
                  PERM=perm, EVEN_K=True, XSUM_MMA=xsum, EC_PRE=ec_pre, GDC=ec_pre, ZSUB=bool(zsub),
                  ACCUMULATE=name.endswith("zsub"))   # two variants add into y (lowering.c_in's base)
    k, n = 2048, 2048
    values = dict(N0=n, N1=n, N2=n, N3=n, P1=0, P2=0, P3=0, C1=n, C2=n, C3=n, M=16, K=k, K8=k // 8, R=32, EC_LD=32,
                  group_size=k if pc else 128, n_groups=1 if pc else k // 128, stride_xm=k, stride_ym=n, N_TOTAL=n,
                  N_TILES_TOTAL=n // bn, SPLIT_K=2)
    ptx = compile_for(kernel, consts, types, values, num_warps=4 if bm == 16 else 8).asm["ptx"]
    magic = "0x43004300" if x_bf16 else "0x64006400"
    out[name] = {"lop3": sum("lop3.b32" in line and magic in line.lower() for line in ptx.splitlines()),
                 "mma": ptx.count("mma."), "gdc": ptx.count("griddepcontrol.wait"),
                 "zsub_fma": ptx.count("fma.rn.bf16x2" if x_bf16 else "fma.rn.f16x2")}
from spear_compile.kernels.w4_batched import ec_gu_kernel
types = {n: "*bf16" for n in ec_gu_kernel.arg_names[:ec_gu_kernel.arg_names.index("M")]}
types.update(gu_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32")
for split in (1, 8):
    ptx = compile_for(ec_gu_kernel, dict(BLOCK_M=16, BLOCK_K=128, BLOCK_R=32, GATED=True, SPLIT=split,
                                         INTERPRET=False, GDC=split > 1), types,
                      dict(M=16, K=2048, R=32, EC_LD=32, stride_xm=2048, K_PER_SPLIT=256)).asm["ptx"]
    out[f"ec_gu{split}"] = {"mma": ptx.count("mma."), "atom": ptx.count("atom."),
                            "gdc": ptx.count("griddepcontrol.launch_dependents")}
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90():
    """The kernel compiled ahead of time for an H100/H200 (sm_90; bf16 and fp16, per-channel and g128, EC, perm,
    xsum_mma, zsub, ec_pre and its u kernel, their programmatic dependent launch, a large M > 64 tile, adding into y)
    in a subprocess without the interpreter: the inline-PTX one-lop3 unpack assembles, with the dtype's magic
    constant, and the products run on tensor cores."""
    from sm90_aot import run_sm90_script
    got = run_sm90_script(_SM90_SCRIPT)
    gu1, gu8 = got.pop("ec_gu1"), got.pop("ec_gu8")
    assert len(got) == 7 and all(v["lop3"] >= 4 and v["mma"] >= 1 for v in got.values()), got
    # zsub: q - zero by the packed fma in the weight tile (the dtype's form), nowhere else
    assert all((v["zsub_fma"] >= 4) == ("zsub" in name) for name, v in got.items()), got
    assert gu1["mma"] >= 1 and gu8["mma"] >= 1, (gu1, gu8)   # ec_pre's u kernel: x Aᵀ on tensor cores
    assert gu1["atom"] == 0 and gu8["atom"] >= 1, (gu1, gu8)  # split K: the arrival counter
    # programmatic dependent launch (Hopper): the u kernel releases the W4 launch, whose epilogue waits for it
    assert gu1["gdc"] == 0 and gu8["gdc"] >= 1 and got["bf16-pc-ecpre-swap-perm"]["gdc"] >= 1, (gu1, gu8, got)
    assert all(v["gdc"] == 0 for name, v in got.items() if "ecpre" not in name), got
