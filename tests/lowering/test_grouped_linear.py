"""Grouped W4 GEMV (sibling linears of one x in one launch) under the interpreter vs float64."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import candidates, configs, grouped, runtime
from tests.w4_problems import member, members_reference, problem, reference, rel

K = 256


def _member(n, group, dtype, bias, g, k=K):
    return member(n, k, group, dtype, bias, g)


def _problem(m, ns, group, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, K, generator=g).to(dtype), [_member(n, group, dtype, bias, g) for n in ns]


_reference = members_reference


def _run(x, members, group, cfg):
    return grouped.launch_grouped(x, [t["qdata"] for t in members], [t["scale"] for t in members],
                                   [t["zero"] for t in members], [t["bias"] for t in members], group, config=cfg)


_rel = rel


G = configs.GroupedConfig
CASES = [  # (M, member Ns, group, dtype, bias, config)
    (1, (64, 32), K, torch.bfloat16, False, G(8, 256, 1, 2)),                   # per-channel, 2 members
    (1, (48, 16, 16), K, torch.float16, True, G(16, 128, 2, 4)),               # per-channel, split-K, partial tiles
    (1, (32, 16, 48), 64, torch.bfloat16, False, G(16, 64, 2, 4)),             # grouped, one group per block
    (1, (40, 24), 32, torch.float16, False, G(8, 128, 1, 2)),                  # grouped, block spans groups
    (1, (16, 32, 16, 8), 128, torch.bfloat16, True, G(8, 128, 2, 2)),          # 4 members
    (1, (32, 16, 24), 32, torch.bfloat16, False, G(16, 128, 2, 2, seg=True)),  # blocks of 4 whole groups
    (1, (16, 48), 64, torch.float16, True, G(8, 256, 1, 2, seg=True)),
    (3, (32, 16, 16), 128, torch.bfloat16, True, G(16, 128, 1, 4, tc=True)),   # M 2..16: tensor cores
    (5, (48, 32), K, torch.float16, False, G(32, 128, 1, 4, tc=True)),
    (3, (32, 16), 64, torch.bfloat16, False, G(per_member=True)),              # per-member launches
]


@pytest.mark.parametrize("m,ns,group,dtype,bias,cfg", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[5].name}" for c in CASES])
def test_grouped_kernel_vs_float64(m, ns, group, dtype, bias, cfg):
    x, members = _problem(m, ns, group, dtype, bias, seed=torch.seed() % 2**31)
    ref = _reference(x, members, group)
    for _ in range(2):  # the second call checks the split-K workspace was left clean
        out = _run(x, members, group, cfg)
        assert out.shape == (m, sum(ns)) and out.dtype == dtype
        assert _rel(out, ref) < 1e-2
    acc, arrive = runtime.WORKSPACES.get(x.device).for_group(sum(ns))
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0


def test_grouped_default_config_and_3d_input():
    x, members = _problem(6, (32, 16), 128, torch.bfloat16, False, seed=1)
    ref = _reference(x, members, 128)
    out = _run(x.reshape(2, 3, K), members, 128, None)  # M = 6: default = per-member launches
    assert out.shape == (2, 3, 48) and _rel(out.reshape(6, 48), ref) < 1e-2
    x1 = x[:1]
    assert _rel(_run(x1, members, 128, None), _reference(x1, members, 128)) < 1e-2  # M = 1: grouped kernel
    assert grouped.choose_grouped(1, K, (32, 16), 128).startswith("grouped[BN=")
    assert grouped.choose_grouped(64, K, (32, 16), 128).startswith("grouped[per-member")


def test_grouped_op_reference_matches_kernel():
    x, members = _problem(1, (32, 16, 16), K, torch.bfloat16, True, seed=2)
    args = ([t["qdata"] for t in members], [t["scale"] for t in members], [t["zero"] for t in members],
            [t["bias"] for t in members], K)
    ref_op = torch.ops.spear.grouped_linear(x, *args)  # CPU: the reference path
    assert _rel(ref_op, _reference(x, members, K)) < 1e-2
    assert _rel(_run(x, members, K, G(8, 256, 1, 2)), ref_op.double()) < 1e-2


def test_grouped_bad_inputs():
    x, members = _problem(1, (32, 16), 128, torch.bfloat16, True, seed=3)
    members[1]["bias"] = None
    with pytest.raises(SpearError, match="all given or all None"):
        _run(x, members, 128, None)
    members[1]["scale"] = members[1]["scale"][:, :1]
    members[0]["bias"] = None
    with pytest.raises(SpearError, match="scale"):
        _run(x, members, 128, None)


def test_warm_grouped_runs_each_m_and_leaves_the_workspace_clean():
    assert grouped.warm_grouped(K, (32, 16), 128, torch.float16, bias=True, ms=(1, 3), device="cpu") == 2
    acc, arrive = runtime.WORKSPACES.get(torch.device("cpu")).for_group(48)
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0


def test_grouped_candidates_small():
    for k, ns, gs in ((2048, (2048, 512, 512), 2048), (2048, (8192, 8192), 128), (4096, (11008, 11008), 4096)):
        c1 = candidates.grouped_candidates(k, ns, gs, 132, m=1)
        assert 4 <= len(c1) <= 16 and all(not c.tc and not c.per_member for c in c1)
        c16 = candidates.grouped_candidates(k, ns, gs, 132, m=16)
        assert len(c16) <= 6 and any(c.per_member for c in c16) and all(c.split_k == 1 for c in c16)


def _packed(members):
    """The members' parts re-laid as adjacent row blocks of one buffer each (what ``compile.siblings`` does)."""
    out = [dict(t) for t in members]
    for part in ("qdata", "scale", "zero", "bias"):
        if members[0][part] is None:
            continue
        joined, row = torch.cat([t[part] for t in members]), 0
        for t in out:
            n = t[part].shape[0]
            t[part] = joined[row:row + n]
            row += n
    return out


def test_adjacent_rows_only_for_one_buffers_consecutive_blocks():
    buf = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    assert torch.equal(grouped.adjacent_rows([buf[0:3], buf[3:4], buf[4:10]]), buf)
    assert torch.equal(grouped.adjacent_rows([buf[2:5], buf[5:7]]), buf[2:7])
    assert grouped.adjacent_rows([buf[3:4], buf[0:3]]) is None          # out of order
    assert grouped.adjacent_rows([buf[0:3], buf[4:6]]) is None          # a gap
    assert grouped.adjacent_rows([buf[0:3], buf[3:6].clone()]) is None  # another storage
    first = torch.empty(0).set_(buf.untyped_storage()[0:3 * buf.stride(0) * buf.element_size()], 0, (3, 4))
    assert first.data_ptr() == buf.data_ptr()
    assert grouped.adjacent_rows([first, buf[3:6]]) is None   # next in memory, past the first one's storage
    assert grouped.adjacent_rows([buf[0:3, :2], buf[3:6, :2]]) is None  # not contiguous
    assert grouped.adjacent_rows([buf[0:3], None]) is None
    flat = torch.arange(10.0)
    assert torch.equal(grouped.adjacent_rows([flat[:4], flat[4:]]), flat)  # biases


@pytest.mark.parametrize("group,dtype,bias", [(K, torch.bfloat16, True), (64, torch.float16, False)])
def test_concat_runs_adjacent_members_as_one_linear(monkeypatch, group, dtype, bias):
    m, ns = 20, (48, 16, 32)  # M > 16: where the concat candidate is offered
    x, members = _problem(m, ns, group, dtype, bias, seed=torch.seed() % 2**31)
    ref = _reference(x, members, group)
    runs = []
    real_runner = grouped.runner
    monkeypatch.setattr(grouped, "runner", lambda cfg: runs.append(cfg) or real_runner(cfg))
    packed = _packed(members)
    out = _run(x, packed, group, G(concat=True))
    assert out.shape == (m, sum(ns)) and _rel(out, ref) < 1e-2 and len(runs) == 1  # one launch, N = 96
    runs.clear()
    out = _run(x, members, group, G(concat=True))  # not adjacent: per member, still right
    assert _rel(out, ref) < 1e-2 and len(runs) == len(ns)
    runs.clear()
    assert _rel(_run(x, packed, group, None), ref) < 1e-2 and len(runs) == 1  # untuned default: concat if adjacent
    assert grouped.choose_grouped(m, K, ns, group, dtype, bias, adjacent=True).startswith("grouped[one linear")
    assert grouped.choose_grouped(m, K, ns, group, dtype, bias).startswith("grouped[per-member")
    assert grouped.choose_grouped(1, K, ns, group, dtype, bias, adjacent=True).startswith("grouped[BN=")


# ---- members that all carry an EC (spear::grouped_linear_ec) ----------------------------------------------------
def _ec_problem(m, ns, group, dtype, bias, gated, seed, r=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g).to(dtype)
    members = [problem(m, group, dtype, True, gated, bias, seed + 1 + i, K, n, r) for i, n in enumerate(ns)]
    return x, members


def _run_ec(x, members, group, cfg):
    parts = [[t[name] for t in members] for name in ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w",
                                                      "gate_b")]
    return grouped.launch_grouped_ec(x, *parts[:4], group, *parts[4:], config=cfg)


EC_CASES = [  # (M, member Ns, group, dtype, bias, gated, config: None = the default)
    (3, (32, 16, 16), K, torch.bfloat16, False, True, None),                       # per member (the default)
    (1, (48, 16), 64, torch.float16, True, False, None),                            # M = 1, static ECs, bias
    (5, (32, 16, 16), K, torch.bfloat16, False, True, "batched"),                   # one batched launch, gated
    (6, (48, 32), 64, torch.float16, True, False, "batched"),                       # static ECs, groups, bias
]


@pytest.mark.parametrize("m,ns,group,dtype,bias,gated,cfg", EC_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'g' if c[5] else 's'}-{c[6]}" for c in EC_CASES])
def test_grouped_ec_vs_float64(m, ns, group, dtype, bias, gated, cfg):
    from spear_compile.lowering import batched
    x, members = _ec_problem(m, ns, group, dtype, bias, gated, seed=torch.seed() % 2**30)
    ref = torch.cat([reference(dict(t, x=x), group) for t in members], -1)
    config = batched.BatchedConfig(16, 32, 64, 1) if cfg == "batched" else None
    for _ in range(2):  # the second call checks the workspaces were left clean
        out = _run_ec(x, members, group, config)
        assert out.shape == (m, sum(ns)) and out.dtype == dtype
        assert _rel(out, ref) < 1e-2
    # the op's CPU path (the reference) agrees
    parts = [[t[name] for t in members] for name in ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w",
                                                      "gate_b")]
    op = torch.ops.spear.grouped_linear_ec(x, *parts[:4], group, *parts[4:])
    assert _rel(op, ref) < 1e-2


def test_grouped_ec_bad_inputs():
    x, members = _ec_problem(3, (32, 16), K, torch.bfloat16, False, True, seed=5)
    parts = [[t[name] for t in members] for name in ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w",
                                                      "gate_b")]
    with pytest.raises(SpearError, match="same length"):
        grouped.launch_grouped_ec(x, *parts[:4], K, parts[4][:1], *parts[5:])
    with pytest.raises(SpearError, match="every member needs an EC"):
        grouped.launch_grouped_ec(x, *parts[:4], K, [parts[4][0], None], *parts[5:])
    with pytest.raises(SpearError, match="gates must be all given or all None"):
        grouped.launch_grouped_ec(x, *parts[:4], K, *parts[4:6], [parts[6][0], None], [parts[7][0], None])
    assert "EC r=16 gated each" in grouped.choose_grouped_ec(3, K, (32, 16), K, rank=16)


# ---- EC'd siblings laid out as one linear with one EC (compile.siblings.pack_members) --------------------------
def _merged(members):
    """``_packed`` and the ECs as one EC of rank g·r (``compile.siblings.merged_ec_views``)."""
    from spear_compile.compile.siblings import merged_ec_views
    out = _packed(members)
    names = ("ec_A", "ec_B", "gate_w", "gate_b")
    views = merged_ec_views(*([t[p] for t in members] for p in names))
    for t, v in zip(out, views):
        t.update(zip(names, v))
    return out


def test_block_diagonal_only_for_one_matrixs_diagonal_blocks():
    buf = torch.zeros(10, 6)
    blocks = [buf[0:4, 0:2], buf[4:7, 2:4], buf[7:10, 4:6]]
    assert torch.equal(grouped.block_diagonal(blocks), buf)
    assert grouped.block_diagonal(blocks[::-1]) is None                     # out of order
    assert grouped.block_diagonal([buf[0:4, 0:2], buf[4:7, 4:6]]) is None   # not the next block
    assert grouped.block_diagonal([buf[0:4, 0:2], buf[4:7, 2:4].clone()]) is None   # another storage
    assert grouped.block_diagonal([b.contiguous() for b in blocks]) is None  # each its own contiguous tensor
    assert grouped.block_diagonal([buf[0:4, 0:2], None]) is None
    wide = torch.zeros(10, 8)  # the row stride is not the blocks' total width
    assert grouped.block_diagonal([wide[0:4, 0:2], wide[4:7, 2:4], wide[7:10, 4:6]]) is None
    short = torch.zeros(6, 6)  # the last block would end past the storage
    rows = torch.empty(0).set_(short.untyped_storage(), 0, (4, 2), (6, 1))
    assert grouped.block_diagonal([rows, torch.empty(0).set_(short.untyped_storage(), 4 * 6 + 2, (3, 2), (6, 1))]) is None


MERGED_CASES = [  # (M, member Ns, group, dtype, bias, gated, config: None = the default, "merged" forced, ...)
    (1, (32, 16, 16), K, torch.bfloat16, False, True, None),       # M = 1, q|k|v-like: the default is one launch
    (1, (48, 16), 64, torch.float16, True, False, None),          # static ECs, groups, bias
    (4, (32, 16), 64, torch.bfloat16, False, True, "merged"),     # M 2..16, forced
    (20, (32, 32), K, torch.float16, True, True, "merged"),       # M > 16
    (3, (32, 16, 16), K, torch.bfloat16, False, True, "per_member"),  # members alone: their rows of the merged EC
    (5, (48, 32), 64, torch.bfloat16, True, True, "batched"),     # the batched kernel over the members
    (6, (32, 16, 16), K, torch.float16, False, True, "batched_pre"),  # ... its u kernel first, split-K
    (3, (32, 16), K, torch.bfloat16, False, False, "batched_pre"),    # ... static ECs
]


@pytest.mark.parametrize("m,ns,group,dtype,bias,gated,cfg", MERGED_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'g' if c[5] else 's'}-{c[6]}" for c in MERGED_CASES])
def test_merged_ec_group_vs_float64(monkeypatch, m, ns, group, dtype, bias, gated, cfg):
    """Members whose weights and ECs ``pack_members`` laid out as one linear with one EC: the default (nothing
    tuned here) and the forced merged config run one launch of rank g·r; every other config still runs right on
    the members' strided EC views."""
    from spear_compile.lowering import batched
    x, members = _ec_problem(m, ns, group, dtype, bias, gated, seed=torch.seed() % 2**30, r=8)
    ref = torch.cat([reference(dict(t, x=x), group) for t in members], -1)
    merged = _merged(members)
    assert not merged[0]["ec_B"].is_contiguous() and all(torch.equal(a["ec_B"], b["ec_B"])
                                                          for a, b in zip(merged, members))
    runs = []
    real_runner = grouped.runner
    monkeypatch.setattr(grouped, "runner", lambda c: runs.append(c) or real_runner(c))
    config = {None: None, "merged": G(concat=True), "per_member": G(per_member=True),
              "batched": batched.BatchedConfig(16, 32, 64, 1),
              "batched_pre": batched.BatchedConfig(16, 16, 32, 2, ec_pre=True)}[cfg]
    # no config copies an EC view: the batched kernel reads them in place, members alone take the merged EC's rows
    assert batched.ec_row_stride([batched.Member(**{n: t[n] for n in _MEMBER_FIELDS}) for t in merged]) == len(ns) * 8
    monkeypatch.setattr(batched, "contiguous_ec", lambda *ec: pytest.fail("a merged EC view was copied"))
    for _ in range(2):
        runs.clear()
        out = _run_ec(x, merged, group, config)
        assert out.shape == (m, sum(ns)) and out.dtype == dtype and _rel(out, ref) < 1e-2
    if cfg in (None, "merged"):
        assert len(runs) == 1   # one linear: N = ΣN, EC rank g·r
    if cfg == "per_member":
        assert len(runs) == len(ns)
    if cfg is None:
        assert grouped.choose_grouped_ec(m, K, ns, group, dtype, bias, 8, gated, merged=True).startswith(
            "grouped[one linear with the merged EC]")


_MEMBER_FIELDS = ("qdata", "scale", "zero", "bias", "ec_A", "ec_B", "gate_w", "gate_b")


def test_batched_kernel_copies_ec_layouts_it_cannot_read_in_place():
    """Members whose B row strides differ (one a merged view, one its own), or a B without unit column stride:
    ``ec_row_stride`` says None and the batched kernel runs on copies, still right."""
    from spear_compile.lowering import batched
    x, members = _ec_problem(5, (32, 16), K, torch.bfloat16, False, True, seed=13, r=8)
    ref = torch.cat([reference(dict(t, x=x), K) for t in members], -1)
    merged = _merged(members)
    mixed = [merged[0], dict(merged[1], **{n: members[1][n] for n in ("ec_A", "ec_B", "gate_w", "gate_b")})]
    col_major = [dict(t, ec_B=t["ec_B"].t().contiguous().t()) for t in members]
    assert not col_major[0]["ec_B"].is_contiguous()
    for case in (mixed, col_major):
        as_members = [batched.Member(**{n: t[n] for n in _MEMBER_FIELDS}) for t in case]
        assert batched.ec_row_stride(as_members) is None
        y = torch.empty(5, 48, dtype=torch.bfloat16)
        out = batched.run_members(batched.BatchedConfig(16, 16, 32, 1), x, as_members, K, y)
        assert _rel(out, ref) < 1e-2


def test_merged_ec_refused_unless_both_weights_and_ecs_are_laid_out(monkeypatch):
    """Only weights adjacent, or only ECs merged: the members run one by one (never a wrong merged read)."""
    x, members = _ec_problem(1, (32, 16), K, torch.bfloat16, False, True, seed=11, r=8)
    ref = torch.cat([reference(dict(t, x=x), K) for t in members], -1)
    runs = []
    real_runner = grouped.runner
    monkeypatch.setattr(grouped, "runner", lambda c: runs.append(c) or real_runner(c))
    merged = _merged(members)
    weights_only = [dict(p, **{n: t[n] for n in ("ec_A", "ec_B", "gate_w", "gate_b")}) for p, t in zip(merged, members)]
    ecs_only = [dict(p, **{n: t[n] for n in ("qdata", "scale", "zero")}) for p, t in zip(merged, members)]
    for case in (weights_only, ecs_only):
        runs.clear()
        out = _run_ec(x, case, K, G(concat=True))
        assert _rel(out, ref) < 1e-2 and len(runs) == 2


def test_single_launch_copies_a_strided_ec_view():
    """``dispatch.launch`` given a member's strided EC views (B and the gate weight inside the merged EC's
    block-diagonal matrices) reads them right."""
    from spear_compile.lowering import dispatch
    x, members = _ec_problem(2, (32, 16), K, torch.bfloat16, True, True, seed=12, r=8)
    t = _merged(members)[1]
    assert not t["ec_B"].is_contiguous() and not t["gate_w"].is_contiguous()
    out = dispatch.launch(x, t["qdata"], t["scale"], t["zero"], t["bias"], K, t["ec_A"], t["ec_B"], t["gate_w"],
                          t["gate_b"])
    assert _rel(out, reference(dict(members[1], x=x), K)) < 1e-2


def test_choose_names_the_packed_keys_pick_when_the_layout_is_unknown():
    """``compile.inspect`` cannot see whether a group's weights (or ECs) were packed: ``adjacent=None`` /
    ``merged=None`` name the packed key's pick when one was tuned, else the unpacked one's."""
    from spear_compile.lowering.tuner import group_key
    ns, dt = (64, 32), torch.bfloat16
    runtime.TUNER.pin(group_key(20, K, list(ns), K, dt, False, True), G(concat=True))
    runtime.TUNER.pin(group_key(20, K, list(ns), K, dt, False, False), G(per_member=True))
    ec_key = grouped.grouped_ec_key(3, K, list(ns), K, dt, False, 8, True, True)
    runtime.TUNER.pin(ec_key, G(concat=True))
    from spear_compile.lowering.batched import BatchedConfig
    from spear_compile.lowering.tuner import linear_key
    inner = configs.CInConfig(BatchedConfig(16, 32, 64, 1))   # the merged linear's own pick (N = 96, rank 16)
    runtime.TUNER.pin(linear_key(3, K, sum(ns), K, dt, True, True, 16), inner)
    try:
        assert grouped.choose_grouped(20, K, ns, K, dt, adjacent=None).startswith("grouped[one linear")
        assert grouped.choose_grouped(20, K, ns, K, dt).startswith("grouped[per-member")
        assert grouped.choose_grouped_ec(3, K, ns, K, dt, rank=8).startswith("grouped[one linear with the merged")
        assert grouped.choose_grouped_ec(3, K, ns, K, dt, rank=8).endswith(f"{inner.name} + EC r=16 gated (tuned, "
                                                                           "bucket M<=4)")
        assert grouped.choose_grouped_ec(3, K, ns, K, dt, rank=8, merged=False).startswith("grouped[per-member")
        assert grouped.choose_grouped_ec(3, K, ns, K, dt, rank=16).startswith("grouped[per-member")
    finally:
        runtime.TUNER.clear()
