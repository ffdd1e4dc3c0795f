"""Grouped linears: several quantized linears of one ``x`` (q|k|v, gate|up; the op ``spear::grouped_linear`` that
``compile.passes.group_sibling_linears`` makes) as one ``[M, N_1 + ... + N_g]`` output.

M = 1 runs the 2-4 members in one launch of ``w4_gemv_grouped_kernel``; M 2..16 times that kernel's tensor-core
configs against per-member launches; larger M launches the members one by one (their own tuned configs) into
column slices of the same output, or, when their weights are adjacent row blocks of one buffer
(``compile.siblings.pack_siblings`` lays them out so), as one linear of ``N_1 + ... + N_g`` outputs (its own tuned
config: the GEMMs that beat bf16 at large M need wide N; three launches at N = 512-2,048 pay three fixed costs).
Keyed by (K, member Ns, group, dtype, M bucket, bias, adjacency); candidates: ``candidates.grouped_candidates``.

Siblings that all carry an EC (``spear::grouped_linear_ec``) run the batched kernel over every member and its EC,
or one launch per member, or, when ``pack_siblings`` laid their weights and ECs out as one linear's (``merged_ec``:
A and the gate bias adjacent row blocks, B and the gate weight the diagonal blocks of one matrix), as one linear of
``N_1 + ... + N_g`` outputs with one EC of rank ``g·r`` (its own tuned config: the single-linear EC paths, e.g. the
M = 1 GEMV with its EC modes, instead of g launches).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch

from .. import options
from ..errors import SpearError
from ..kernels.w4_gemv_grouped import w4_gemv_grouped_kernel
from . import batched
from .candidates import default_grouped_config, grouped_candidates, num_sms
from .configs import MAX_DECODE_M, MAX_EC_RANK, MAX_GROUP, DequantCublasConfig, GroupedConfig, cdiv
from .decode import groups_per_block, load_kwargs
from .dispatch import check_linear, choose, config_for, rows_and_out, runner
from .prefill import gemv_ok, run_dequant_cublas
from .precompile import launcher
from .runtime import TUNER, WORKSPACES
from .tuner import group_key


def _check_group(x, qdatas, scales, zeros, biases, group_size, ecs=None, where="launch_grouped"):
    """Every member's operands checked (``dispatch.check_linear``); ``ecs``: the members' (ec_A, ec_B, gate_w,
    gate_b) lists too."""
    where = f"spear_compile.lowering.grouped.{where}"
    names = "qdata/scale/zero/bias" + ("/ec_A/ec_B/gate_w/gate_b" if ecs else "")
    lists = (qdatas, scales, zeros, biases) + tuple(ecs or ())
    g = len(qdatas)
    if not 1 <= g or any(v is not None and len(v) != g for v in lists):
        raise SpearError(f"{where}: {names} lists must have the same length >= 1, got "
                         f"{'/'.join(str(None if v is None else len(v)) for v in lists)}")
    for i in range(g):
        check_linear(x, qdatas[i], scales[i], zeros[i], None if biases is None else biases[i], group_size,
                     *([e[i] for e in ecs] if ecs else [None] * 4), None)


def adjacent_rows(parts):
    """``parts`` (2-D row blocks, or 1-D) as one tensor when each starts where the one before ends inside the first
    one's storage (contiguous, same dtype, device and trailing shape), else None. (Memory inside one storage's
    range belongs to that storage: one ``untyped_storage()`` read, not one a part; on a mixed step's eager first
    run this check runs for every grouped linear.)"""
    first = parts[0]
    if first is None or not first.is_contiguous():
        return None
    dtype, device, trail = first.dtype, first.device, first.shape[1:]
    end = first.data_ptr()
    rows = 0
    for p in parts:
        if (p is None or p.data_ptr() != end or not p.is_contiguous() or p.dtype != dtype or p.device != device
                or p.shape[1:] != trail):
            return None
        end += p.numel() * p.element_size()
        rows += p.shape[0]
    storage = first.untyped_storage()
    if end > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided((rows, *trail), first.stride())


def block_diagonal(parts):
    """``parts`` (2-D, ``[n_i, c_i]``) as one ``[Σn, Σc]`` tensor when each is the i-th diagonal block of one
    row-major matrix inside the first one's storage (same dtype and device, stride ``(Σc, 1)``), else None. The
    blocks off the diagonal are not read here: only ``compile.siblings.pack_members`` lays tensors out so, with
    zeros there, and nothing writes them but through the blocks' views."""
    first = parts[0]
    if first is None or first.dim() != 2:
        return None
    width = sum(0 if p is None or p.dim() != 2 else p.shape[1] for p in parts)
    row = col = 0
    for p in parts:
        at = first.data_ptr() + (row * width + col) * first.element_size()  # the i-th diagonal block's start
        if (p is None or p.dim() != 2 or p.dtype != first.dtype or p.device != first.device
                or p.stride() != (width, 1) or p.data_ptr() != at):
            return None
        row, col = row + p.shape[0], col + p.shape[1]
    storage = first.untyped_storage()
    if first.data_ptr() + row * width * first.element_size() > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided((row, width), (width, 1))


def merged_ec(ec_As, ec_Bs, gate_ws, gate_bs):
    """The members' ECs as one EC of rank ``Σr`` (``(A, B, gate_w, gate_b)``; gates None when static) when laid out
    as ``pack_members`` lays them (A and gate_b adjacent row blocks, B and gate_w block-diagonal), else None:
    ``x Wᵀ + B g(A x) ⊙ A x`` over the joined weights then gives every member's columns exactly."""
    if len(ec_As) < 2:
        return None
    a, b = adjacent_rows(ec_As), block_diagonal(ec_Bs)
    gated = gate_ws[0] is not None
    gw, gb = (block_diagonal(gate_ws), adjacent_rows(gate_bs)) if gated else (None, None)
    if a is None or b is None or (gated and (gw is None or gb is None)):
        return None
    return a, b, gw, gb


def adjacent_members(qdatas, scales, zeros, biases):
    """The members' (qdata, scale, zero, bias) as one linear's when all four are adjacent (``adjacent_rows``; biases
    all None or all given), else None."""
    if len(qdatas) < 2:
        return None
    joined = [adjacent_rows(qdatas), adjacent_rows(scales), adjacent_rows(zeros)]
    joined.append(None if biases[0] is None else adjacent_rows(biases))
    if any(t is None for t in joined[:3]) or (biases[0] is not None and joined[3] is None):
        return None
    return joined


def _concat_into(x2, qdatas, scales, zeros, biases, group_size, y, joined=None):
    """The adjacent members as one linear (its own tuned config) into ``y``; per member when not adjacent.
    ``joined``: ``adjacent_members``' answer when the caller has it."""
    joined = joined or adjacent_members(qdatas, scales, zeros, biases)
    if joined is None:
        return _members_into(x2, _members(qdatas, scales, zeros, biases), group_size, y)
    args = (x2, *joined, group_size, None, None, None, None, None, y)
    cfg = config_for(x2, args, x2.shape[1], y.shape[1], group_size, False, False)
    runner(cfg)(cfg, *args)
    return y


def _members(qdatas, scales, zeros, biases):
    return [batched.Member(q, s, z, b) for q, s, z, b in zip(qdatas, scales, zeros, biases)]


def _members_into(x2, members, group_size, y, config=None, run=None):
    """One launch per member (``batched.Member``s, EC included) into column slices of ``y``: each with its own
    tuned config for its key, or ``config`` for all, or ``run(*args)`` (the runner's arguments after the config)."""
    col = 0
    for t in members:
        n = t.qdata.shape[0]
        args = (x2, t.qdata, t.scale, t.zero, t.bias, group_size, t.ec_A, t.ec_B, t.gate_w, t.gate_b, None,
                y[:, col:col + n])
        if run is not None:
            run(*args)
        else:
            cfg = config or config_for(x2, args, x2.shape[1], n, group_size, t.ec_B is not None, t.gate_w is not None)
            runner(cfg)(cfg, *args)
        col += n
    return y


def _grouped_kernel_ok(cfg, x2, qdatas):
    m, k = x2.shape
    return (not cfg.per_member and len(qdatas) <= MAX_GROUP and m <= MAX_DECODE_M and (m == 1 or cfg.tc)
            and all(gemv_ok(k, q) for q in qdatas))


def _run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y, joined=None):
    """``y [M, ΣN] = [x W_1ᵀ | x W_2ᵀ | ...] (+ biases)``: one grouped launch where the kernel applies, else per
    member (``joined``: the members as one linear when adjacent, from ``adjacent_members``)."""
    if isinstance(cfg, batched.BatchedConfig):
        return batched.run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y)
    if cfg.concat:
        return _concat_into(x2, qdatas, scales, zeros, biases, group_size, y, joined)
    if not _grouped_kernel_ok(cfg, x2, qdatas):
        return _members_into(x2, _members(qdatas, scales, zeros, biases), group_size, y)
    m, k = x2.shape
    g = len(qdatas)
    ns = [q.shape[0] for q in qdatas]
    n_total = sum(ns)
    split = min(cfg.split_k, cdiv(k, cfg.block_k))
    tiles = [cdiv(n, cfg.block_n) * split for n in ns]
    starts = list(itertools.accumulate(tiles))  # P_1, P_2, ... (first program of members 1..)
    cols = list(itertools.accumulate(ns))
    acc, arrive = WORKSPACES.get(x2.device).for_group(n_total) if split > 1 else (y, y)
    has_bias = biases[0] is not None
    ptrs = []
    for i in range(MAX_GROUP):
        j = min(i, g - 1)  # unused slots repeat the last member (never read)
        ptrs += [qdatas[j].view(torch.int32), scales[j], zeros[j], biases[j] if has_bias else x2]
    pad = lambda v: (list(v) + [v[-1]] * MAX_GROUP)[:MAX_GROUP - 1]  # noqa: E731
    launcher(w4_gemv_grouped_kernel, (starts[-1],))(
        x2, y, acc, arrive, *ptrs,
        *(ns + [ns[-1]] * (MAX_GROUP - g)), *pad(starts[:-1] or [starts[-1]]), *pad(cols[:-1] or [cols[-1]]),
        m, k, group_size, k // group_size, x2.stride(0), n_total, split,
        MEMBERS=g, BLOCK_M=16 if cfg.tc else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SPLIT=split > 1,
        PER_CHANNEL=group_size == k, WIDE=group_size < k and cfg.block_k > group_size, TC=cfg.tc,
        X_BF16=x2.dtype == torch.bfloat16, HAS_BIAS=has_bias, INTERPRET=options.interpret(),
        GPB=groups_per_block(cfg, m, k, group_size), **load_kwargs(cfg, x2), num_warps=cfg.num_warps,
    )
    return y


def grouped_config_for(x2, qdatas, scales, zeros, biases, group_size, y, joined=None):
    """The config ``launch_grouped`` runs (``joined``: ``adjacent_members``' answer, None when not adjacent or M
    <= ``MAX_DECODE_M``)."""
    m, k = x2.shape
    ns = [q.shape[0] for q in qdatas]
    # one linear over adjacent members: above the grouped decode kernels' M, where wide-N GEMMs pay
    concat = m > MAX_DECODE_M and joined is not None
    key = group_key(m, k, ns, group_size, x2.dtype, biases[0] is not None, concat)
    if key in TUNER.picks:
        return TUNER.picks[key]
    sms = num_sms(x2.device)
    extra = batched.candidates_for(m, k, ns, group_size, sms) if TUNER.can_tune(x2) else []  # batched, M 2..512
    large = [GroupedConfig(concat=True)] * concat + [GroupedConfig(per_member=True)]
    if m > MAX_DECODE_M and (not TUNER.can_tune(x2) or len(large) + len(extra) == 1):
        return large[0]  # prefill: one linear over adjacent members, else each member its own tuned GEMM
    if not TUNER.can_tune(x2):
        return default_grouped_config(m, k, ns, group_size, sms)
    args = (x2, qdatas, scales, zeros, biases, group_size, y)

    def reference():
        return _members_into(x2, _members(qdatas, scales, zeros, biases), group_size, torch.empty_like(y),
                             DequantCublasConfig())

    cands = (grouped_candidates(k, ns, group_size, sms, m) if m <= MAX_DECODE_M else large) + extra
    return TUNER.pick(key, x2.device, cands, lambda cfg: _run_grouped(cfg, *args, joined), reference, y)


def _known_layout(key, layout: Optional[bool]):
    """``key`` (its ``adjacent`` field set unless ``layout`` is False), or, when the layout is not known (``layout``
    None) and that key has no pick, the same key without it (``choose_grouped`` / ``choose_grouped_ec``)."""
    return key if layout is not None or key in TUNER.picks else key._replace(adjacent=False)


def choose_grouped(m: int, k: int, ns, group_size: int, dtype=torch.bfloat16, bias: bool = False,
                   adjacent: Optional[bool] = False) -> str:
    """Human-readable name of what ``launch_grouped`` would run for members of widths ``ns`` (``adjacent``: their
    weights one buffer's adjacent row blocks, ``compile.siblings.pack_siblings``; None: not known, the adjacent
    key's pick when there is one)."""
    group_size = group_size or k
    key = _known_layout(group_key(m, k, list(ns), group_size, dtype, bias, m > MAX_DECODE_M and adjacent is not False),
                        adjacent)
    adjacent = key.adjacent
    if key in TUNER.picks:
        return f"{TUNER.picks[key].name} (tuned, bucket M<={key.m_bucket})"
    if m > MAX_DECODE_M:
        return f"{GroupedConfig(concat=adjacent, per_member=not adjacent).name} (prefill)"
    return f"{default_grouped_config(m, k, list(ns), group_size).name} (default; tuned on first CUDA call)"


def launch_grouped(x, qdatas, scales, zeros, biases, group_size, config=None):
    """Several quantized linears of the same ``x [..., K]`` (same K, group size, dtype; biases all given or
    all None) as one ``[..., N_1 + ... + N_g]`` output, member i in columns ``[C_i, C_i + N_i)``.

    ``biases``: a list (entries None for no bias) or None; ``config``: a ``GroupedConfig`` to force one.
    """
    qdatas, scales, zeros = list(qdatas), list(scales), list(zeros)
    biases = [None] * len(qdatas) if biases is None else list(biases)
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise SpearError("spear_compile.lowering.grouped.launch_grouped: biases must be all given or all None")
    _check_group(x, qdatas, scales, zeros, biases, group_size)
    n_total = sum(q.shape[0] for q in qdatas)
    x2, m, y = rows_and_out(x, n_total)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_total)
    joined = adjacent_members(qdatas, scales, zeros, biases) if m > MAX_DECODE_M else None
    cfg = config or grouped_config_for(x2, qdatas, scales, zeros, biases, group_size, y, joined)
    _run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y, joined)
    return y.reshape(*x.shape[:-1], n_total)


def warm_grouped(k: int, ns, group_size: int, dtype=torch.bfloat16, bias: bool = False, ms=(1,), device="cuda") -> int:
    """Tune (and allocate the workspaces of) the grouped key for members of widths ``ns`` before CUDA-graph
    capture, like ``compile.api.warm_kernels`` does for single linears: tuning is keyed by shapes only, so
    random weights of those shapes do. Returns the number of calls made."""
    device = torch.device(device)
    g = len(ns)
    qs = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device) for n in ns]
    ss = [torch.full((n, k // group_size), 0.01, dtype=dtype, device=device) for n in ns]
    zs = [torch.full((n, k // group_size), 8.0, dtype=dtype, device=device) for n in ns]
    bs = [torch.zeros(n, dtype=dtype, device=device) for n in ns] if bias else [None] * g
    for m in ms:
        launch_grouped(torch.randn(m, k, dtype=dtype, device=device), qs, ss, zs, bs, group_size)
    return len(ms)


# ---- sibling linears that all carry an EC (``spear::grouped_linear_ec``) ---------------------------------------
def grouped_ec_key(m, k, ns, group_size, dtype, has_bias, rank: int, gated: bool, merged: bool = False) -> tuple:
    """The tuner key of an EC group: ``group_key``'s with its tag naming the EC (rank, gated or static);
    ``merged``: laid out as one linear with one EC (``merged_ec``; its ``adjacent`` field)."""
    return group_key(m, k, ns, group_size, dtype, has_bias, merged)._replace(
        tag=f"grouped-ec{rank}{'g' if gated else 's'}")


def _run_merged(x2, one, group_size, y):
    """The group as one linear with its merged EC (``one``: the joined weights and ``merged_ec``), its own tuned
    config for its key."""
    args = (x2, *one[:4], group_size, *one[4:], None, y)
    cfg = config_for(x2, args, x2.shape[1], y.shape[1], group_size, True, one[6] is not None)
    runner(cfg)(cfg, *args)
    return y


def solo_members(members, ec=None):
    """``members`` as each is launched alone (one launch per member). With the group's merged EC (``ec``:
    ``merged_ec``'s ``(A, B, gate_w, gate_b)``), each takes A and the gate whole and its own rows of B: B's zero
    blocks make that its own EC, at rank g·r, read in place. Otherwise their EC operands contiguous
    (``batched.contiguous_members``: a copy only for views the kernels cannot read)."""
    if ec is not None:
        a, b, gw, gb = ec
        starts = itertools.accumulate((m.qdata.shape[0] for m in members), initial=0)
        return [dataclasses.replace(m, ec_A=a, ec_B=b[c:c + m.qdata.shape[0]], gate_w=gw, gate_b=gb)
                for m, c in zip(members, starts)]
    return batched.contiguous_members(members)


def _run_grouped_ec(cfg, x2, members, group_size, y, one=None, solo=None):
    """``one``: the merged group's joined weights and EC (``launch_grouped_ec``); ``solo``: the members' operands
    for their own launches when the caller has them (else ``solo_members`` with ``one``'s EC)."""
    if isinstance(cfg, GroupedConfig) and cfg.concat and one is not None:
        return _run_merged(x2, one, group_size, y)
    if isinstance(cfg, batched.BatchedConfig) and batched.applies(x2.shape[0], x2.shape[1], members, group_size):
        return batched.run_members(cfg, x2, members, group_size, y)   # reads merged EC views in place
    return _members_into(x2, solo or solo_members(members, one[4:] if one is not None else None), group_size, y)


def grouped_ec_config_for(x2, members, group_size, y, one=None):
    """The config ``launch_grouped_ec`` runs: the tuner's pick between the batched kernel over every member (and
    its EC), the members' own launches (``GroupedConfig(per_member=True)``, ``solo_members``) and, for a merged
    group (``one``: its weights and EC joined, ``merged_ec``), one linear with one EC (``GroupedConfig(concat=True)``).
    Where nothing can be timed: the merged linear when there is one (one launch instead of g), else the members' own
    launches."""
    m, k = x2.shape
    ns = [t.qdata.shape[0] for t in members]
    rank, gated = members[0].ec_B.shape[1], members[0].gate_w is not None
    own, merged = GroupedConfig(per_member=True), GroupedConfig(concat=True)
    key = grouped_ec_key(m, k, ns, group_size, x2.dtype, members[0].bias is not None, rank, gated, one is not None)
    if key in TUNER.picks:   # (also inside a CUDA-graph capture, where nothing is tuned)
        return TUNER.picks[key]
    if not TUNER.can_tune(x2):
        return merged if one is not None else own
    extra = batched.candidates_for(m, k, ns, group_size, num_sms(x2.device), True, rank) \
        if batched.applies(m, k, members, group_size) else []
    cands = [own] + [merged] * (one is not None) + extra
    if len(cands) == 1:
        return own
    # the members' own keys and the merged linear's tuned first (outside the timing of this key)
    solo = solo_members(members, one[4:] if one is not None else None)
    _members_into(x2, solo, group_size, torch.empty_like(y))
    if one is not None:
        _run_merged(x2, one, group_size, torch.empty_like(y))

    def reference():   # torch dequantize + cuBLAS + the ECs by torch ops, per member
        return _members_into(x2, solo, group_size, torch.empty_like(y),
                             run=lambda *args: run_dequant_cublas(None, *args))

    return TUNER.pick(key, x2.device, cands, lambda cfg: _run_grouped_ec(cfg, x2, members, group_size, y, one, solo),
                      reference, y)


def choose_grouped_ec(m: int, k: int, ns, group_size: int, dtype=torch.bfloat16, bias: bool = False, rank: int = 32,
                      gated: bool = True, merged: Optional[bool] = None) -> str:
    """Human-readable name of what ``launch_grouped_ec`` would run for members of widths ``ns`` with ECs of
    ``rank`` (``merged``: laid out as one linear with one EC by ``compile.siblings.pack_siblings``; None: not
    known, the merged key's pick when there is one)."""
    group_size = group_size or k
    ec = f" + EC r={rank}{' gated' if gated else ' static'} each"
    key = _known_layout(grouped_ec_key(m, k, list(ns), group_size, dtype, bias, rank, gated, merged is not False),
                        merged)
    one_linear = "grouped[one linear with the merged EC]"
    if key in TUNER.picks:
        cfg = TUNER.picks[key]
        if getattr(cfg, "concat", False):   # and what that linear (N = ΣN, EC rank g·r) runs
            inner = choose(m, k, sum(ns), group_size, dtype, len(ns) * rank, gated)
            return f"{one_linear}{ec} (tuned, bucket M<={key.m_bucket}): {inner}"
        return f"{cfg.name}{ec} (tuned, bucket M<={key.m_bucket})"
    if key.adjacent:
        return f"{one_linear}{ec} (default; tuned on first CUDA call)"
    if not batched.MIN_M <= m <= batched.MAX_M:
        return f"{GroupedConfig(per_member=True).name}{ec}"
    return f"{GroupedConfig(per_member=True).name}{ec} (default; batched kernel tuned on first CUDA call)"


def launch_grouped_ec(x, qdatas, scales, zeros, biases, group_size, ec_As, ec_Bs, gate_ws, gate_bs, config=None):
    """``launch_grouped`` for members that all carry an EC (``ec_As[i] [r, K]``, ``ec_Bs[i] [N_i, r]``, gates all
    given or all None), one rank: ``[..., N_1 + ... + N_g]``, member i's ``x W_iᵀ + b_i + B_i g(A_i x) ⊙ A_i x``
    in its columns. ``config``: a ``BatchedConfig`` or ``GroupedConfig(per_member=True)`` (or ``concat=True`` for
    a merged group, ``merged_ec``) to force one."""
    where = "spear_compile.lowering.grouped.launch_grouped_ec"
    qdatas, scales, zeros, biases, ec_As, ec_Bs, gate_ws, gate_bs = (
        list(v) for v in (qdatas, scales, zeros, biases, ec_As, ec_Bs, gate_ws, gate_bs))
    if len({b is None for b in biases}) > 1 or len({w is None for w in gate_ws}) > 1:
        raise SpearError(f"{where}: biases and gates must be all given or all None")
    if any(a is None or b is None for a, b in zip(ec_As, ec_Bs)) or len({b.shape[-1] for b in ec_Bs}) > 1:
        raise SpearError(f"{where}: every member needs an EC (ec_A and ec_B) of one rank, got ec_B shapes "
                         f"{[None if b is None else tuple(b.shape) for b in ec_Bs]}")
    _check_group(x, qdatas, scales, zeros, biases, group_size, (ec_As, ec_Bs, gate_ws, gate_bs), "launch_grouped_ec")
    n_total = sum(q.shape[0] for q in qdatas)
    x2, m, y = rows_and_out(x, n_total)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_total)
    joined = adjacent_members(qdatas, scales, zeros, biases)
    # (pack_members lays out weights and ECs together: no pointer checks of the ECs where the weights are not)
    ec = merged_ec(ec_As, ec_Bs, gate_ws, gate_bs) if joined is not None else None
    if ec is not None and ec[1].shape[1] > MAX_EC_RANK:   # past the single-linear kernels' rank
        ec = None
    one = (*joined, *ec) if ec is not None else None
    members = [batched.Member(*t) for t in zip(qdatas, scales, zeros, biases, ec_As, ec_Bs, gate_ws, gate_bs)]
    cfg = config or grouped_ec_config_for(x2, members, group_size, y, one)
    _run_grouped_ec(cfg, x2, members, group_size, y, one)
    return y.reshape(*x.shape[:-1], n_total)
