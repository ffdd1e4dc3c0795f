"""Host side of the batched-decode W4 (+EC) kernel (``w4_batched.w4_batched_kernel``), M = 2..512.

``BatchedConfig`` names one tiling; ``run_members`` launches it for 1..4 sibling members of one x (all with or all
without an EC), writing one ``[M, ΣN]`` output; ``batched_candidates`` lists what the tuner times per key; the
dispatch hook (``dispatch._config_for`` / ``_grouped_config_for``, via ``candidates_for``) adds them for
``MIN_M <= M <= MAX_M`` and routes a ``BatchedConfig`` here (``run_single`` / ``run_grouped``). The tuner times them
beside the existing candidates per key and keeps the fastest that is correct. Measured on H200:
bench/results/batched_decode.md (faster than bf16 at M = 16 per-channel, slower from M = 64 on).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import SpearError
from .. import options
from ..kernels.w4_batched import ec_gu_kernel, w4_batched_kernel
from .configs import block_r as rank_block, cdiv
from .prefill import contiguous_ec, reference_linear
from .precompile import launcher, pdl_ok
from .runtime import WORKSPACES

MIN_M = 2
MAX_M = 512
MAX_MEMBERS = 4
MAX_RANK = 64  # BLOCK_R of the in-loop u = x Aᵀ (registers: BLOCK_M x BLOCK_R fp32 per program)
MAX_WORKSPACE_BYTES = 256 << 20  # split-K slots: configs needing more are not candidates
EC_GU_BLOCK_M, EC_GU_BLOCK_K = 16, 128
EC_GU_PROGRAMS = 64  # ec_gu_kernel splits K until about this many programs run (H100/H200: 132 SMs)


@dataclass(frozen=True)
class BatchedConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = False  # yᵀ = W xᵀ (W the MMA's A operand from registers; the N tile is the MMA M dimension)
    planes: bool = False  # one dot per nibble plane against x's stride-8 columns (no layout change of the W tile)
    perm: bool = False  # BLOCK_K 128 only: k permuted in x and W alike into the MMA operand's order (w4_batched._mma_order)
    xsum_mma: bool = False  # Σ_k x (the zero point's term) by a dot with a tile of ones, not a shuffle reduction
    ec_pre: bool = False  # EC: g(u) ⊙ u by ec_gu_kernel first (one launch), the K loop W4-only (no A re-read per tile)
    zsub: bool = False  # q - zero in the weight tile (a packed fma per word pair): no Σx term in the K loop

    @property
    def name(self):
        return (f"batched[BM={self.block_m},BN={self.block_n},BK={self.block_k},splitK={self.split_k},"
                f"warps={self.num_warps},stages={self.num_stages}{',swap' if self.swap else ''}"
                f"{',planes' if self.planes else ''}{',perm' if self.perm else ''}"
                f"{',xsum' if self.xsum_mma else ''}{',ecpre' if self.ec_pre else ''}{',zsub' if self.zsub else ''}]")


@dataclass(frozen=True)
class Member:
    """One linear of a batched launch: packed ``qdata [N, K/2]`` uint8, ``scale``/``zero`` ``[N, groups]``, and
    the optional bias and EC (``ec_A [r, K]``, ``ec_B [N, r]``, gate ``gate_w [r, r]``, ``gate_b [r]``)."""
    qdata: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: Optional[torch.Tensor] = None
    ec_A: Optional[torch.Tensor] = None
    ec_B: Optional[torch.Tensor] = None
    gate_w: Optional[torch.Tensor] = None
    gate_b: Optional[torch.Tensor] = None


def applies(m, k, members: Sequence[Member], group_size) -> bool:
    """The kernel's preconditions: 2..512 rows (any M runs; the range is where it is a candidate), K % 8 == 0,
    4-byte aligned contiguous packed rows, blocks within one group, 1..4 members with all or no ECs of one rank
    <= MAX_RANK, all gated or all static."""
    if not (1 <= len(members) <= MAX_MEMBERS) or k % 8 or (group_size < k and group_size % 16):
        return False
    if any(t.qdata.data_ptr() % 4 or not t.qdata.is_contiguous() for t in members):
        return False
    ecs = {t.ec_B is not None for t in members}
    if len(ecs) > 1:
        return False
    if True in ecs:
        ranks = {t.ec_B.shape[1] for t in members}
        gates = {t.gate_w is not None for t in members}
        if len(ranks) > 1 or max(ranks) > MAX_RANK or len(gates) > 1 or any(t.ec_A is None for t in members):
            return False
    return len({t.bias is not None for t in members}) == 1


def ec_row_stride(members: Sequence[Member]) -> Optional[int]:
    """The row stride with which the kernel reads every member's B and gate weight: r for members' own ECs, g·r
    for members' views of a merged EC (``compile.siblings.merged_ec_views``); 0 without ECs; None where the
    members' strides differ or an operand lacks unit column stride (A and the gate bias: contiguous)."""
    if members[0].ec_B is None:
        return 0
    ld = members[0].ec_B.stride(0)
    for t in members:
        if t.ec_B.stride() != (ld, 1) or not t.ec_A.is_contiguous():
            return None
        if t.gate_w is not None and (t.gate_w.stride() != (ld, 1) or not t.gate_b.is_contiguous()):
            return None
    return ld


def contiguous_members(members: Sequence[Member]) -> list:
    """``members`` with their EC operands contiguous (``prefill.contiguous_ec``: copies only of views)."""
    if all(t is None or t.is_contiguous() for m in members for t in (m.ec_A, m.ec_B, m.gate_w, m.gate_b)):
        return list(members)
    return [dataclasses.replace(m, **dict(zip(("ec_A", "ec_B", "gate_w", "gate_b"),
                                                contiguous_ec(m.ec_A, m.ec_B, m.gate_w, m.gate_b)))) for m in members]


def _split_ok(cfg, m, n_total):
    return cfg.split_k == 1 or cfg.split_k * m * n_total * 4 <= MAX_WORKSPACE_BYTES


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap, planes, perm, xsum_mma) per M range: the configs that won at
# least one launch of bench/batched_sweep.py's broad sweep on H200 (results/batched_decode.md: both models, pc/g128,
# EC off/on, per q|k|v, o, gate|up, down launch), plus two never timed on a GPU (device loans were paused; the tuner
# checks each against the reference at the real shape before it can be picked): the M = 16 winner with ``perm`` (k in
# the MMA operand's order: no shared-memory conversion of the W tile) and the M = 64 winner with ``xsum_mma``.
# Offline sm_90 SASS of the K loop (bench/sass_loop.py, session 13): perm 16 instructions a weight word; xsum_mma at
# M = 64 28 vs 36. ``planes`` (one dot per nibble plane) is correct and compiles but was never timed: forced only.
# Session 15 (untimed): the ``perm`` tile at BLOCK_M 64 (and 32). The M = 17-64 winner was the BLOCK_M 16 perm tile,
# which dequantizes every weight tile once per 16 rows (4 times at M = 64): sm_90 SASS (Triton 3.6), K-loop
# instructions per weight word for all 64 rows, per-channel 63 -> 33, + EC 76 -> 40, g128 90 -> 49; no spills. At
# M <= 16 the perm tile 256 wide (8 warps): x's permutation amortized over twice the rows, 15.8 -> 14.1 a word.
# Session 22 (untimed; results/sass_loop_s22.md): ``zsub`` (q - zero in the weight tile, no Σx term; the Σx work
# grows with BLOCK_M) cut the K loop of the M = 256-512 picks by a third (BM 128: 382 -> 248 instructions, regs
# 242 -> 174 at BK 128) and the BM 64 tiles by a fifth, but adds to BM 16's: every M > 16 shape without planes or
# xsum_mma is also a candidate with it.
_SHAPES_16 = ((16, 128, 128, 4, 4, True, False, False, False), (16, 64, 128, 4, 4, False, False, False, False),
              (16, 128, 256, 8, 3, True, False, False, False), (16, 128, 128, 8, 3, False, False, False, False),
              (16, 128, 128, 4, 4, True, False, True, False), (16, 256, 128, 8, 3, True, False, True, False))
_SHAPES_64 = ((16, 128, 128, 4, 4, True, False, False, False), (64, 128, 128, 8, 3, False, False, False, False),
              (64, 64, 128, 4, 4, False, False, False, False), (64, 128, 64, 4, 4, True, False, False, False),
              (64, 128, 64, 4, 4, False, False, False, False), (16, 128, 256, 8, 3, True, False, False, False),
              (16, 64, 128, 4, 4, False, False, False, False), (16, 128, 128, 4, 4, True, False, True, False),
              (64, 128, 128, 8, 3, False, False, False, True), (64, 128, 128, 8, 3, True, False, True, False),
              (32, 128, 128, 4, 4, True, False, True, False))
# Session 25 (timed on an H100: won 0 of 56 keys at M = 256-1,024, the closest 2-10 % behind; kept as candidates
# because the margin is small and another GPU or Triton may differ; results/kernels_large_m_h100_s25.md): large tiles
# for the compute-bound M = 65-512 keys (1B layer at M = 256: 31 GFLOP against 30 MB of W4 weights), where BLOCK_M <=
# 128 non-swap tiles dequantize every weight M / BLOCK_M times into small wgmmas and ``dequant+cublas`` won every M =
# 256-512 key. ``_LARGE_512``: 8 warps (two warpgroups), a 128 x 128 to 128 x 256 / 256 x 128 accumulator (wgmma
# 64x128 / 64x256, N 256 wide), zsub only (fewer loop instructions and no 128 + q cancellation). Offline sm_90 SASS
# (Triton 3.6, ``bench/sass_loop.py``'s compile, per-channel, K = N = 4096): K-loop issue cycles per tensor-core cycle
# (loop instructions x warps / 4 schedulers over 2 BM BN BK / 4096 FLOP a clock) 0.34-0.60 against 0.49 for the BM 128
# BK 128 zsub tile above; wgmma waits for itself every iteration (``WARPGROUP.DEPBAR.LE gsb0, 0x0``), so the loop is
# dequantize + MMA in series, not overlapped. Registers 211-255, no spills in the configs listed (``_tile_regs``
# filters): the non-swap ones spill 2-18 instructions in the split-K finisher (split 1 only: ``SPLIT_TILE_REGS``);
# under g128 the per-group ``part`` doubles the accumulator and all but the swap 128 x 128 tile spill (per-channel
# only: ``GROUPED_TILE_REGS``); the in-loop u spills several (EC keys: ``ec_pre`` only). Tried and dropped (spills of
# 60-180 instructions, or dominated): swap BM 256 (BN 128 / 64), swap BM 128 BN 256, swap BN 64, swap BM 128 BK 64,
# non-swap BK 128 without perm, 4 stages (the same loop).
_LARGE_512 = ((128, 128, 128, 8, 3, True, False, True, False), (64, 256, 128, 8, 3, True, False, True, False),
              (128, 256, 64, 8, 3, False, False, False, False), (128, 256, 128, 8, 3, False, False, True, False),
              (256, 128, 64, 8, 3, False, False, False, False),
              # dominated in SASS (issue/TC 0.70) but 128 registers at split 1 and 80 KB of shared memory: two CTAs an
              # SM, so one's dequantize may run under the other's MMAs (a probe for that overlap)
              (128, 128, 64, 8, 4, True, False, False, False))
_SHAPES_512 = ((64, 128, 128, 8, 3, False, False, False, False), (64, 64, 128, 4, 4, False, False, False, False),
               (64, 128, 64, 4, 4, True, False, False, False), (64, 128, 64, 4, 4, False, False, False, False),
               (128, 128, 64, 4, 4, False, False, False, False), (128, 128, 128, 8, 3, False, False, False, False),
               (64, 128, 128, 8, 3, False, False, False, True), (64, 128, 128, 8, 3, True, False, True, False)
               ) + _LARGE_512


GROUPED_TILE_REGS = 160  # _LARGE_512 under g128: tiles above this spilled (offline sm_90 SASS, bf16 or fp16)
SPLIT_TILE_REGS = 128  # _LARGE_512 with split-K: tiles above this spilled in the finisher (no split-K for them)


def _tile_regs(bm, bn, bk, warps, grouped):
    """Registers a thread holds for the tile: the fp32 accumulator (two under grouped scales: the K block's ``part``
    and the running sum) plus the dequantized W tile (two 16-bit halves a register)."""
    return (2 if grouped else 1) * bm * bn // (32 * warps) + bn * bk // (64 * warps)


def batched_candidates(m, k, ns, group_size, sms=132, has_ec=False):
    """Configs the tuner times for one key (members of widths ``ns``): the shapes of the M range, BLOCK_K within one
    group (BK 256 per-channel only), split-K factors that bring the N x M tiles to about 1-2 waves (``_splits``)."""
    pc = group_size >= k
    shapes = _SHAPES_16 if m <= 16 else (_SHAPES_64 if m <= 64 else _SHAPES_512)
    out = []
    for i, shape in enumerate(shapes):
        bm, bn, bk, warps, stages, swap, planes, perm, xsum = shape
        large = shape in _LARGE_512
        if large and (bm >= 2 * m or (not pc and _tile_regs(bm, bn, bk, warps, True) > GROUPED_TILE_REGS)):
            continue  # half the tile or more would be padding; g128's second accumulator spills (see above)
        if not pc and (bk > group_size or group_size % bk):
            if bk > 128:
                continue
            bk = group_size
        if perm and bk != 128:
            continue
        tiles = sum(cdiv(n, bn) for n in ns) * cdiv(m, bm)
        # EC keys: also the K loop without u (``ec_pre``) for the first shape and the perm tiles, whose W4-only
        # loops won where their in-loop u lost (session 14, results/batched_decode_h200_s14.md); untimed on a GPU.
        # The large tiles: zsub only, and ec_pre only on EC keys (the in-loop u spills several of them)
        zsubs = (True,) if large else ((False, True) if m > 16 and bm > 16 and not (planes or xsum) else (False,))
        ec_pres = (True,) if has_ec and large else ((False, True) if has_ec and (i == 0 or perm) else (False,))
        for ec_pre in ec_pres:
            for split in _splits(tiles, k, bk, sms):
                if large and split > 1 and _tile_regs(bm, bn, bk, warps, False) > SPLIT_TILE_REGS:
                    continue
                for zsub in zsubs:
                    cfg = BatchedConfig(bm, bn, bk, split, warps, stages, swap, planes, perm, xsum, ec_pre, zsub)
                    if _split_ok(cfg, m, sum(ns)):
                        out.append(cfg)
    return list(dict.fromkeys(out))


def _splits(tiles, k, bk, sms):
    """Split-K factors: 1, the smallest power of two giving >= 1 wave of programs, and twice that, each split >= 4 K
    blocks long."""
    n_kb = cdiv(k, bk)
    out = [1]
    split = 1
    while tiles * split < sms and n_kb >= 8 * split and split < 16:
        split *= 2
    if split > 1:
        out.append(split)
        if n_kb >= 8 * split and tiles * split < 4 * sms:
            out.append(2 * split)
    return out


def ec_gu_split(m: int, members: int, k: int) -> tuple:
    """(splits, K per split) of ec_gu_kernel: at decode M there are only M tiles x members programs (3 for q|k|v at
    M = 16), each reading its whole A serially; split K (whole BLOCK_K blocks, none empty) up to about
    ``EC_GU_PROGRAMS`` programs. Session 15 (H100, M = 16): the unsplit kernel cost about 10-17 µs at K = 4096."""
    k_blocks = cdiv(k, EC_GU_BLOCK_K)
    want = max(1, EC_GU_PROGRAMS // (cdiv(m, EC_GU_BLOCK_M) * members))
    split = 1
    while split * 2 <= min(want, k_blocks):
        split *= 2
    per = cdiv(k_blocks, split)  # blocks per split; then no split is left without one
    return cdiv(k_blocks, per), per * EC_GU_BLOCK_K


def run_members(cfg: BatchedConfig, x2: torch.Tensor, members: Sequence[Member], group_size: int,
                y: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``y [M, ΣN] = [x W_1ᵀ (+ b_1) (+ EC_1) | x W_2ᵀ ... ]`` in one launch (``y`` may be a column slice);
    ``accumulate``: added to what ``y`` holds (its C input, ``lowering.c_in``), rounded once."""
    m, k = x2.shape
    if not applies(m, k, members, group_size):
        raise SpearError(f"spear_compile.lowering.batched: {cfg.name} cannot run these members (K={k}, group "
                         f"{group_size}, {len(members)} members; needs K % 8 == 0, aligned rows, uniform ECs)")
    if y.stride(1) != 1:
        raise SpearError("spear_compile.lowering.batched: the output needs unit column stride")
    g = len(members)
    ns = [t.qdata.shape[0] for t in members]
    n_total = sum(ns)
    bk = cfg.block_k if group_size >= k else min(cfg.block_k, group_size)
    if group_size < k and group_size % bk:
        raise SpearError(f"spear_compile.lowering.batched: BLOCK_K={bk} must divide the group {group_size}")
    if (cfg.perm and bk != 128) or (cfg.perm and cfg.planes):
        raise SpearError(f"spear_compile.lowering.batched: {cfg.name}: perm needs BLOCK_K = 128 (got {bk}), not planes")
    if cfg.zsub and (cfg.planes or cfg.xsum_mma):
        raise SpearError(f"spear_compile.lowering.batched: {cfg.name}: zsub replaces the Σx term of planes / xsum")
    split = max(1, min(cfg.split_k, cdiv(k, bk)))
    m_tiles = cdiv(m, cfg.block_m)
    n_tiles = [cdiv(n, cfg.block_n) for n in ns]
    tiles_total = sum(n_tiles)
    starts = list(itertools.accumulate([t * split for t in n_tiles]))
    cols = list(itertools.accumulate(ns))
    has_ec = members[0].ec_B is not None
    gated = has_ec and members[0].gate_w is not None
    r = members[0].ec_B.shape[1] if has_ec else 0
    ec_ld = ec_row_stride(members)
    if ec_ld is None:   # a layout the kernel cannot read in place: copied (none that spear builds)
        members = contiguous_members(members)
        ec_ld = r
    block_r = rank_block(r)
    ec_pre = has_ec and cfg.ec_pre
    gu_split, gu_k = ec_gu_split(m, g, k) if ec_pre else (1, k)
    if split > 1 or ec_pre:
        # ec_pre: ``uws`` holds every member's g(u) ⊙ u [g, M, BLOCK_R], then ec_gu_kernel's split-K slots, instead of
        # u partials; its arrival counters come first in ``cnt``, the W4 kernel's after them (the two kernels may
        # run at once under programmatic dependent launch; each leaves its counters at zero for the next launch)
        n_uws = (1 + gu_split) * g * m * block_r if ec_pre else (tiles_total * split * m * block_r if has_ec else 1)
        n_gu_cnt = g * cdiv(m, EC_GU_BLOCK_M) if ec_pre else 0
        n_cnt = n_gu_cnt + (tiles_total * m_tiles if split > 1 else 1)
        ws, uws, gu_cnt = WORKSPACES.get(x2.device).for_batched(split * m * n_total if split > 1 else 1, n_uws, n_cnt)
        cnt = gu_cnt[n_gu_cnt:]
    else:
        ws = uws = cnt = gu_cnt = y  # never touched without split-K
    dummy = x2
    ptrs, gu_ptrs = [], []
    for i in range(MAX_MEMBERS):
        t = members[min(i, g - 1)]  # unused slots repeat the last member (never read)
        a, gw, gb = (t.ec_A if has_ec else dummy), (t.gate_w if gated else dummy), (t.gate_b if gated else dummy)
        ptrs += [t.qdata.view(torch.int32), t.scale, t.zero, t.bias if t.bias is not None else dummy, a,
                 t.ec_B if has_ec else dummy, gw, gb]
        gu_ptrs += [a, gw, gb]   # ec_gu_kernel's per-member arguments
    pad = lambda v: (list(v) + [v[-1]] * MAX_MEMBERS)[:MAX_MEMBERS - 1]  # noqa: E731
    gdc = ec_pre and pdl_ok(x2.device)
    if ec_pre:
        launcher(ec_gu_kernel, (cdiv(m, EC_GU_BLOCK_M), g, gu_split))(
            x2, uws, uws[g * m * block_r:], gu_cnt, *gu_ptrs, m, k, r, ec_ld, x2.stride(0), gu_k, BLOCK_M=EC_GU_BLOCK_M,
            BLOCK_K=EC_GU_BLOCK_K, BLOCK_R=block_r, GATED=gated, SPLIT=gu_split,
            INTERPRET=options.interpret(), GDC=gdc, num_warps=4)
    launcher(w4_batched_kernel, (starts[-1] * m_tiles,))(
        x2, y, ws, uws, cnt, *ptrs,
        *(ns + [ns[-1]] * (MAX_MEMBERS - g)), *pad(starts[:-1] or [starts[-1]]), *pad(cols[:-1] or [cols[-1]]),
        m, k, k // 8, r, ec_ld, group_size, k // group_size, x2.stride(0), y.stride(0), n_total, tiles_total, split,
        MEMBERS=g, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, BLOCK_R=block_r, USE_SPLIT=split > 1,
        PER_CHANNEL=group_size >= k, X_BF16=x2.dtype == torch.bfloat16, HAS_BIAS=members[0].bias is not None,
        HAS_EC=has_ec, GATED=gated, SWAP=cfg.swap, INTERPRET=options.interpret(), PLANES=cfg.planes, PERM=cfg.perm,
        EVEN_K=k % bk == 0, XSUM_MMA=cfg.xsum_mma, EC_PRE=ec_pre, GDC=gdc, ZSUB=cfg.zsub, ACCUMULATE=accumulate,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if gdc else {}),
    )
    return y


def run_single(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """``dispatch``'s runner signature. A given ``u`` (the tensor-parallel hook) is not this kernel's case: the
    tuner's reference path runs it."""
    if u is not None:
        return reference_linear(x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    return run_members(cfg, x2, [Member(qdata, scale, zero, bias, ec_A, ec_B, gate_w, gate_b)], group_size, y)


def candidates_for(m, k, ns, group_size, sms=132, has_ec=False, rank=0):
    """The dispatch hook's list for one key: ``batched_candidates`` where the kernel is a candidate
    (``MIN_M <= M <= MAX_M``, K % 8 == 0, blocks within one group, EC rank <= ``MAX_RANK``, not switched off by
    ``SPEAR_BATCHED_KERNEL=0``), else []."""
    if not options.current().batched_kernel:
        return []
    if not MIN_M <= m <= MAX_M or k % 8 or (group_size < k and group_size % 16) or rank > MAX_RANK:
        return []
    return batched_candidates(m, k, ns, group_size, sms, has_ec)


def run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y):
    """``dispatch._run_grouped``'s signature: the members of a grouped linear (no ECs) in one launch."""
    return run_members(cfg, x2, [Member(q, s, z, b) for q, s, z, b in zip(qdatas, scales, zeros, biases)],
                       group_size, y)
