"""Phase-aware dispatch for ``spear::fused_linear`` on the 4-bit container.

``launch`` flattens x to ``[M, K]`` and picks, by M bucket (1, 2-4, 5-16: decode; 17-64, 65-256,
257-1024, >1024: prefill):

* ``decode``: split-K GEMV (``w4_gemv``, ``w4_decode``) with the EC fused in the same launch (``DecodeConfig.ec``
  "epoch"/"spin") or in a u kernel launched just before it under programmatic dependent launch ("pdl"); EC keys
  are tuned over the W4-only key's fastest configs (``decode_ec_candidates``);
* ``prefill``: tensor-core W4A16 GEMM, EC in the epilogue (``w4_prefill``);
* ``dequant+cublas``: dequantize to the activation dtype (int32-word kernel), cuBLAS, the EC joined as the
  tuner picks per key (``DequantCublasConfig``: after / c_in / kcat / fold; large M only).

The config is timed on the first CUDA call of each key (K, N, group, dtype, M bucket, has EC,
gated) and cached in-process and on disk (``tune_cache``: a new process reuses the picks); during
CUDA-graph capture, under the interpreter, or with ``SPEAR_AUTOTUNE=0`` the heuristic default is used.
``choose`` names what ``launch`` would run.
CUDA-graph safe once warmed up (run each shape once before capture: that tunes and allocates the
workspaces): no host sync, no ``.item()``; persistent per-device workspaces are reset by the kernels
themselves; only the output (and prefill's small ``u``) is allocated. The workspaces are per device,
not per stream: decode launches must not run concurrently on two streams of one device.

Grouped linears (``launch_grouped``, the op ``spear::grouped_linear`` that the pass
``passes.group_sibling_linears`` makes of sibling linears such as q|k|v and gate|up): M = 1 runs the
2-4 members in one launch of ``w4_gemv_grouped_kernel`` writing one ``[M, N_1 + ... + N_g]`` output;
M 2..16 times that kernel's tensor-core configs against per-member launches; larger M launches the
members one by one (their own tuned configs) into column slices of the same output. Keyed by
(K, member Ns, group, dtype, M bucket, bias); candidates: ``grouped_candidates``.

Tensor parallelism hook: ``project_u`` is the separable u partial-sum step; a caller that
all-reduces u across GPUs passes the reduced ``u=`` to ``launch``, and the kernels skip their own.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from ..errors import SpearError
from . import batched, tune_cache
from .ec_tiles import ec_u_kernel
from .w4_decode import w4_decode_kernel
from .w4_gemv import w4_gemv_grouped_kernel, w4_gemv_kernel
from .w4_prefill import (ec_gate_blocks_kernel, ec_gate_kernel, ec_prologue_kernel, ec_xpass_blocks_kernel,
                         ec_xpass_kernel, w4_dequant_words_kernel, w4_dequantize_kernel, w4_prefill_kernel)

MAX_DECODE_M = 16
MAX_EC_RANK = 256
XPASS_CONFIG = (64, 128, 2, 4, 2)  # ec_xpass_kernel at M >= 1024: BLOCK_M, BLOCK_K, stages, warps, programs per SM
XPASS_CONFIG_IN_PLACE_DEFAULT = (64, 128, 3, 4, 1)  # ec_prologue_in_place: best total of bench/xpass_sweep.py
XPASS_CONFIG_IN_PLACE = XPASS_CONFIG_IN_PLACE_DEFAULT  # (sessions 8, 9; the session-8 split x pass reading [x | 0])
if os.environ.get("SPEAR_XPASS_IN_PLACE"):  # "BLOCK_M,BLOCK_K,stages,warps,per_sm": a bench override
    try:
        XPASS_CONFIG_IN_PLACE = tuple(int(v) for v in os.environ["SPEAR_XPASS_IN_PLACE"].split(","))
    except ValueError:
        XPASS_CONFIG_IN_PLACE = ()
    if len(XPASS_CONFIG_IN_PLACE) != 5 or min(XPASS_CONFIG_IN_PLACE) < 1:
        raise SpearError(f"SPEAR_XPASS_IN_PLACE={os.environ['SPEAR_XPASS_IN_PLACE']!r}: expected five positive "
                         "integers BLOCK_M,BLOCK_K,stages,warps,programs_per_SM, e.g. 64,128,3,4,1")
COPY_X_MAX_BLOCK_R = 32  # the prologue copies x inside its projection loop only up to this BLOCK_R (``ec_prologue``)
MIN_BLOCK_N = 4
MAX_GROUP = 4  # members of one grouped launch (w4_gemv_grouped_kernel's pointer sets)
_BUCKETS = (1, 4, 16, 64, 256, 1024)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    two_launch: bool = False  # EC only: u = x Aᵀ by cuBLAS first, then the W kernel reads it
    kernel: str = "gemv"  # "gemv" (w4_gemv, int32 words) or "v3" (w4_decode, bytes)
    tc: bool = False  # gemv: tensor cores on bf16 (OFFSET + q) straight from the bits (M <= 16)
    dynamic_ids: bool = False  # EC "spin": tile ids from an atomic counter instead of the program id
    seg: bool = False  # gemv M = 1, grouped scales: K blocks of several whole groups (3-D word tiles)
    # EC synchronisation (EC_MODES): "spin" one launch, u tiles + spin + last finisher resets the workspace;
    # "epoch" one launch, the last u tile publishes the gated u as epoch-tagged words (no counter to reset);
    # "pdl" ec_u_kernel then the W kernel under programmatic dependent launch (it streams its weights while
    # u is computed and waits only in its epilogue); "2k" the same two kernels in plain stream order; "slots" one
    # launch, M = 1 int32-word GEMV (FMA) only (elsewhere it runs as "epoch"): each u tile stores its own tagged
    # partial, the finishing programs sum the slots and gate (no atomics, no counter, no publishing tile); "ecsplit"
    # slots' u tiles, then one EC program per N tile adding g(u)⊙u Bᵀ into the split-K accumulator as one more arrival (the W
    # programs always take the split-K path; the last arrival finishes as W4-only: no EC work on its tail);
    # "ecterm" the same EC programs publish their term as tagged words, the W finisher adds it (any split).
    ec: str = "spin"
    ec_b: str = "auto"  # modes epoch/pdl/2k: the tile's B rows at program start ("early"), in the finishing
    #                     program ("late"), or "auto" (early when split_k == 1, where every program finishes)
    stages: int = 0  # gemv M = 1 FMA: K loop pipelined by Triton this deep (words by cp.async); 0 = register prefetch
    lean: int = 0  # gemv M = 1 FMA: nibbles as 128 + q, no subtraction; 1: shift + and + or, 2: shift + one lop3 (asm);
    #                3: "pair", one shift per nibble pair + one lop3 each (256 + q even, 16 + q odd: 4 shifts a word)
    rt: bool = False  # gemv M = 1 seg: rows-inner word tile [groups, words, rows] (_w_tile_seg_t: x unpacked per 4 rows)
    xw: bool = False  # gemv M = 1 FMA with stages: x read as int32 pairs (cp.async-pipelined, no per-plane shuffle)
    tma: bool = False  # gemv M = 1 FMA with stages, not seg: word tiles by TMA (device-made descriptor) not cp.async
    maxnreg: int = 0  # register cap per thread for ptxas (0: none)
    u_tiles: int = 0  # EC "slots": the most u tiles (each covers cdiv(K, u_tiles) rounded up to BLOCK_KU); 0 = SLOT_TILES

    @property
    def name(self):
        u = ",u=cublas+2nd launch" if self.two_launch else ""
        v = ("" if self.kernel == "gemv" else f",{self.kernel}") + (",tc" if self.tc else "") + \
            (",dyn" if self.dynamic_ids else "") + (",seg" if self.seg else "") + \
            ("" if self.ec == "spin" else f",ec={self.ec}") + ("" if self.ec_b == "auto" else f",b={self.ec_b}") + \
            (f",ut={self.u_tiles}" if self.u_tiles else "") + _load_suffix(self)
        return f"decode[BN={self.block_n},BK={self.block_k},splitK={self.split_k},warps={self.num_warps}{u}{v}]"


EC_MODES = {"spin": 0, "epoch": 1, "pdl": 2, "2k": 2, "slots": 3, "ecsplit": 5, "ecterm": 6}
SLOT_TILES = 32  # EC "slots": default cap on the u tiles (a finishing program loads tiles x r slot words; with up to
#                 32 of BLOCK_KU = 256 each, K <= 8192 takes one sub-block a tile; 64 slots raised registers 128 -> 255)
_SLOT_SPINS = 1 << 20  # EC "slots": re-reads of stale slot words before a tile is poisoned (tests lower it)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # yᵀ = W xᵀ: the dequantized W tile is the tensor-core A operand

    @property
    def name(self):
        return (f"prefill[BM={self.block_m},BN={self.block_n},BK={self.block_k},"
                f"warps={self.num_warps},stages={self.num_stages}{',swap' if self.swap else ''}]")


EC_STRUCTURES = ("after", "c_in", "kcat", "fold")


@dataclass(frozen=True)
class DequantCublasConfig:
    """Dequantize W (``w4_dequant_words_kernel``) then cuBLAS; ``ec`` is how the EC joins (ignored without one):

    * ``after``: ``y = x Wᵀ (+ bias)``, then ``y += v Bᵀ`` (re-reads and re-writes y);
    * ``c_in``: ``y = v Bᵀ (+ bias)`` first, then ``y += x Wᵀ``: cuBLAS reads the EC term as C (beta = 1)
      in the compute-bound GEMM's epilogue;
    * ``kcat``: one GEMM ``[x | v] [W | B]ᵀ`` over K + r (r rounded up to ``pad``, default 8): the prologue
      writes ``[x | v]`` in its pass over x, the dequantize writes ``[W | B]``;
    * ``fold``: static EC only (no gate, u not given): ``W + B A`` dequantized, one plain GEMM (else ``kcat``).

    ``v = g(u) ⊙ u`` comes from ``ec_prologue_kernel`` (one pass over x, or the given u). ``overlap``: the prologue
    runs on a side stream, concurrently with the dequantize (two memory-bound launches share the machine instead of
    queueing, tails included); CUDA only, fork and join inside the call (CUDA-graph capture makes them branches).
    ``split``: the prologue as a split-K pass over x with many programs plus a gate launch (``ec_prologue``)."""
    ec: str = "after"
    pad: int = 0
    overlap: bool = False
    split: bool = False

    @property
    def name(self):
        if self.ec == "after" and not self.pad and not self.overlap and not self.split:
            return "dequant+cublas"
        return (f"dequant+cublas[ec={self.ec}{f',pad={self.pad}' if self.pad else ''}"
                f"{',overlap' if self.overlap else ''}{',split' if self.split else ''}]")


@dataclass(frozen=True)
class GroupedConfig:
    """One launch of ``w4_gemv_grouped_kernel`` for every member, or (``per_member``) one launch per
    member with its own tuned config, into column slices of the grouped output."""
    block_n: int = 0
    block_k: int = 0
    split_k: int = 1
    num_warps: int = 4
    tc: bool = False
    per_member: bool = False
    seg: bool = False  # as DecodeConfig.seg
    stages: int = 0  # as DecodeConfig.stages
    lean: int = 0  # as DecodeConfig.lean
    rt: bool = False  # as DecodeConfig.rt
    xw: bool = False  # as DecodeConfig.xw
    tma: bool = False  # as DecodeConfig.tma
    maxnreg: int = 0  # as DecodeConfig.maxnreg

    @property
    def name(self):
        if self.per_member:
            return "grouped[per-member launches]"
        return (f"grouped[BN={self.block_n},BK={self.block_k},splitK={self.split_k},warps={self.num_warps}"
                f"{',tc' if self.tc else ''}{',seg' if self.seg else ''}{_load_suffix(self)}]")


def _load_suffix(cfg) -> str:
    return ((f",st={cfg.stages}" if cfg.stages else "") + ({0: "", 1: ",lean", 2: ",lop3", 3: ",pair"}[int(cfg.lean)])
            + (",rt" if cfg.rt else "") + (",xw" if cfg.xw else "") + (",tma" if cfg.tma else "")
            + (f",r{cfg.maxnreg}" if cfg.maxnreg else ""))


def m_bucket(m: int) -> str:
    for hi in _BUCKETS:
        if m <= hi:
            return str(hi)
    return f">{_BUCKETS[-1]}"


def _gpb(cfg, m, k, group_size) -> int:
    """Groups per K block for a ``seg`` config that applies here (M = 1, grouped scales, the block a power-of-two
    multiple of the group), else 0 (the regular paths)."""
    if not getattr(cfg, "seg", False) or m != 1 or cfg.tc or group_size >= k or group_size % 16:
        return 0
    gpb = cfg.block_k // group_size
    return gpb if gpb >= 2 and gpb * group_size == cfg.block_k and gpb & (gpb - 1) == 0 else 0


def _stages(cfg, m) -> int:
    """Software-pipelining depth of a gemv config where it applies (M = 1, FMA path), else 0."""
    return cfg.stages if m == 1 and not cfg.tc else 0


def _load_kwargs(cfg, x2):
    """The load-path launch arguments of both GEMV kernels: ``STAGES``, ``LEAN`` (the nibble scheme; the lop3 asm needs
    the GPU: plain ops under the interpreter, 2 -> 1, 3 -> 4; + 8 for the rows-inner seg tile ``rt``, which only
    ``_w_tile_seg`` reads, so the entry kernels pass it through unchanged), ``XW`` (x as int32 pairs: needs a 4-byte
    aligned x row), ``KW_DIV`` (largest power of two <= 16 dividing K / 8: the row starts' alignment in words, for 16-byte loads), ``TMA``, and ``maxnreg``."""
    m, k = x2.shape
    fma = m == 1 and not cfg.tc
    kw = k // 8
    div = 1
    while div < 16 and kw % (2 * div) == 0:
        div *= 2
    tma = bool(cfg.tma and fma and cfg.stages and not cfg.seg and div >= 4)
    if tma:
        _ensure_allocator()
    lean = int(cfg.lean) if fma else 0
    if lean and _interpret():
        lean = {1: 1, 2: 1, 3: 4}[lean]
    if fma and getattr(cfg, "rt", False) and cfg.seg:  # read only by _w_tile_seg (GPB > 0); the other bodies use LEAN % 8
        lean += 8
    return dict(STAGES=_stages(cfg, m), LEAN=lean,
                XW=bool(cfg.xw and fma and cfg.stages and x2.data_ptr() % 4 == 0), KW_DIV=div, TMA=tma,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not _interpret() else {}))


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-made TMA descriptors live in Triton's per-launch global scratch: give Triton an allocator (the
    torch caching allocator; inside CUDA-graph capture it draws from the graph's pool) unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _valid_block_k(bk: int, k: int, group_size: int) -> bool:
    return bk <= group_size and group_size % bk == 0 if group_size < k else True


def _num_sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _split_for(n_tiles: int, k: int, block_k: int, sms: int) -> int:
    """Enough programs to keep ~8 tiles of loads in flight per SM, each split >= 2 K blocks long."""
    split = 1
    while n_tiles * split < 8 * sms and triton.cdiv(k, block_k) >= 4 * split and split < 32:
        split *= 2
    return split


def _block_k_choices(k, group_size, wanted):
    ks = [bk for bk in wanted if _valid_block_k(bk, k, group_size)]
    return ks or [min(group_size, 32)]


def _gemv_splits(n_tiles, k, block_k, sms):
    """Split-K factors that bring the launch to ~1-4 waves of programs (1 when the N tiles already do)."""
    n_kb = triton.cdiv(k, block_k)
    out = []
    for split in (1, 2, 4, 8, 16, 32):
        if split > n_kb or (split > 1 and n_tiles * split > 4 * sms):
            break
        if n_tiles * split >= sms or split == n_kb:
            out.append(split)
            if len(out) == 2:
                break
    return out or [min(n_kb, 32)]


def decode_candidates(k, n, group_size, sms=132, has_ec=False, m=1):
    """Decode configs the tuner times. M = 1: the int32-word GEMV (FMA, or tensor cores on the bf16 bits);
    M 2..16: the tensor-core GEMV and the byte kernel (v3). Ranges from bench/decode_sweep.py on H100; the W4-only
    M = 1 FMA configs from bench/load_floor.py (session 5: cp.async-pipelined words, x as int32 pairs, 128 + q
    nibbles by one lop3), the EC ones as before (their kernel path is the EC engineer's to re-tune)."""
    out = []
    pc = group_size >= k
    if m == 1 and not has_ec:
        out += _m1_load_candidates(k, [n], group_size, sms, DecodeConfig)
    elif m == 1:
        # grouped scales: blocks of one group here; longer blocks as ``seg`` below (the per-word-scale WIDE
        # blocks never won a shape in bench/results/decode_sweep.md; WIDE stays reachable as a forced config)
        bks = (256, 512, 1024) if pc else (128,)
        for bn, bk, warps in itertools.product((8, 16, 32, 64), bks, (2, 4)):
            if bk <= max(k, 256) and bn * bk // 8 >= 32 * warps:
                for split in _gemv_splits(triton.cdiv(n, bn), k, bk, sms):
                    out.append(DecodeConfig(bn, bk, split, warps))
        if not pc:
            for bn, bk, warps in _SEG_M1:
                if bk < k and bk % group_size == 0 and bk > group_size:
                    for split in _gemv_splits(triton.cdiv(n, bn), k, bk, sms):
                        out.append(DecodeConfig(bn, bk, split, warps, seg=True))
    tc_bks = [bk for bk in ((128, 256) if pc else (128,)) if _valid_block_k(bk, k, group_size)]
    tc_bns = (32,) if m == 1 and not has_ec else (16, 32, 64)  # W4-only M = 1: tensor cores never won (one kept)
    for bn, bk, warps in itertools.product(tc_bns, tc_bks[:1] if m == 1 and not has_ec else tc_bks,
                                           (4,) if m == 1 else (4, 8)):
        # split 1 only: fp32 atomics on a tensor-core accumulator layout summed replicated lanes on H100
        # (bench/decode_sweep.py, run 1: rel err 0.1-0.3 with BN=64, 4 warps, split >= 2)
        out.append(DecodeConfig(bn, bk, 1, warps, tc=True))
    if m > 1:
        for bn, bk, warps in ((32, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 4)):
            for bk2 in _block_k_choices(k, group_size, [bk]):
                base = _split_for(triton.cdiv(n, bn), k, bk2, sms)
                for split in sorted({base, max(1, base // 2)}):
                    if triton.cdiv(k, bk2) >= split:
                        out.append(DecodeConfig(bn, bk2, split, warps, kernel="v3"))
    # The two-launch EC variant (cuBLAS u, then the W kernel) lost to the one-launch kernel on every
    # shape of bench run 2 (H100), so it is not a default candidate; pass it as `config=` to force it.
    return list(dict.fromkeys(out))


def decode_ec_candidates(w4_ranked, k=None, n=None, sms=132, top=3):
    """EC decode configs the tuner times, derived from the W4-only key's ranking (the EC adds ~5-9% bytes, so the
    W4 stream's best tilings stay the candidates): the ``top`` fastest, and the fastest whose programs fit one per
    SM (the EC lengthens each tile's finishing program; with several waves of programs that delay is paid once per
    wave: bench/results/decode_ec.md), each with the modes "epoch" and "pdl" (and "slots", "ecterm" where the config is
    the M = 1 FMA GEMV; "ecsplit" won no key of the merged session-6 run and none by more than 0.2 µs before, so it is
    forced only); and the fastest with the "spin" mode (the session-3 kernel) as the reference."""
    picks = list(w4_ranked[:top])
    if k is not None and n is not None:
        one_wave = [c for c in w4_ranked
                    if triton.cdiv(n, c.block_n) * min(c.split_k, triton.cdiv(k, c.block_k)) <= sms]
        picks += one_wave[:1]
    out = []
    for cfg in picks:
        slots = cfg.kernel == "gemv" and not cfg.tc
        for ec in ("epoch", "pdl", "slots", "ecterm") if slots else ("epoch", "pdl"):
            out.append(dataclasses.replace(cfg, ec=ec, ec_b="auto", dynamic_ids=False))
    out.append(dataclasses.replace(w4_ranked[0], ec="spin", ec_b="auto"))
    return list(dict.fromkeys(out))


def prefill_candidates(m, k, group_size, has_ec=False, gated=False):
    """Prefill configs the tuner times: the Triton W4 GEMM (M > 64 also swapped, W as the A operand) and, for
    M > 64, dequantize + cuBLAS with each EC structure (``DequantCublasConfig``). The Triton GEMM never won a
    M > 1024 key (bench/results/kernels_tune_*.json): one shape and two swapped ones stay there."""
    if m <= 64:
        shapes = ((16, 64, 128, 4, 4, False), (32, 64, 128, 4, 4, False), (64, 64, 64, 4, 4, False),
                  (64, 128, 64, 4, 4, False))
    elif m <= 1024:  # winners of M = 256 keys in bench/results/kernels_tune_*.json, and two swapped; all
        # compile without spills on sm_90 with Triton 3.6 (the EC epilogue made (128, 128, 64, 4 warps) spill ~1 KB)
        shapes = ((128, 128, 128, 8, 3, False), (64, 128, 64, 4, 4, False),
                  (128, 128, 64, 8, 3, True), (64, 128, 64, 4, 4, True))
    else:
        shapes = ((128, 128, 128, 8, 3, False), (128, 128, 64, 8, 3, True), (128, 256, 64, 8, 3, True))
    out = []
    for bm, bn, bk, warps, stages, swap in shapes:
        for bk2 in _block_k_choices(k, group_size, [bk, 32]):
            out.append(PrefillConfig(bm, bn, bk2, warps, stages, swap))
            break
    cands = list(dict.fromkeys(out))
    if m > 64:
        if not has_ec:
            cands.append(DequantCublasConfig())
        else:
            # bench/results/prefill_s5.md: the one-launch prologue (16 rows a program) streams x at 1.0-2.1 TB/s,
            # the split one wins where K is long or x is copied; kcat K + 64 (128-byte rows) >= K + 8
            for ec, pad in (("after", 0), ("c_in", 0), ("kcat", 64)):
                cands += [DequantCublasConfig(ec, pad, ov, sp) for ov in (False, True) for sp in (False, True)]
            cands.append(DequantCublasConfig("kcat", split=True))
            if not gated:
                cands.append(DequantCublasConfig("fold"))
    return cands


def default_config(m, k, n, group_size, sms=132, has_ec=False):
    """The config used untuned (``SPEAR_AUTOTUNE=0``, the interpreter, a capture with no warm-up): the EC in
    decode with the "slots" mode at M = 1 and "epoch" at M 2..16, at M > 64 as the K-concat GEMM, the modes the
    tuner picked on most keys (bench/results/decode_ec_s6_merged.md, decode_ec.md, prefill_s5.md)."""
    if m <= MAX_DECODE_M:
        bk = _block_k_choices(k, group_size, [128, 64, 32])[0]
        if m == 1:
            return DecodeConfig(32, bk, _gemv_splits(triton.cdiv(n, 32), k, bk, sms)[0], 2,
                                ec="slots" if has_ec else "spin", lean=2)
        return DecodeConfig(32, bk, _split_for(triton.cdiv(n, 32), k, bk, sms), 4, kernel="v3",
                            ec="epoch" if has_ec else "spin")
    if m > 64:  # measured faster than our Triton GEMM at M=256/2048 on H100 (bench/results/kernels.md)
        return DequantCublasConfig(ec="kcat", pad=64, split=True) if has_ec else DequantCublasConfig()
    return prefill_candidates(m, k, group_size)[0]


# grouped scales, K blocks of several whole groups (seg): long contiguous rows as per-channel's best blocks
_SEG_M1 = ((8, 512, 2), (16, 512, 2), (16, 256, 2), (32, 512, 4))
_GROUPED_TC = ((16, 128, 4), (32, 128, 4), (64, 128, 8))

# W4-only M = 1 FMA configs (single and grouped launches), from bench/load_floor.py on H100 (run 1 of session 5:
# every group of both models, pc and g128; results/load_path.md): (BLOCK_N, BLOCK_K, warps, stages, xw, lean,
# maxnreg, seg, rt). cp.async 3 deep with x as int32 pairs won every big launch (stages 5 and TMA never did); xw only
# on the wide word tiles, where plane loads need a layout shuffle through shared memory. Session 6 (results/
# g128_body.md, A/B in one run): the rows-inner seg tile (rt: x unpacked once for 4 rows) took 7B g128 gate|up
# 27.3 -> 24.3 us and q|k|v 16.2 -> 14.6; nibble pairs (lean 3, 4 shifts a word) won 3 of 4 pc groups by 1-3% and
# the 7B g128 single launches (o, down), but lost 1-2% to lop3 on the rt grouped tiles: both schemes stay listed.
# The plain and-or (lean 1) and old-tile seg r96 rows lost every group of that A/B and left; the old seg BN 8 stays
# (1B q|k|v, 1B o). The rt pair r96 row (10 programs per SM, no spill) never won a sweep: candidate for removal.
_M1_PC = ((8, 1024, 4, 3, True, 2, 0), (16, 512, 2, 3, True, 2, 0), (16, 1024, 4, 3, True, 2, 0),
          (32, 256, 2, 0, False, 2, 0),
          (8, 1024, 4, 3, True, 3, 0), (16, 512, 2, 3, True, 3, 0), (16, 1024, 4, 3, True, 3, 0))
_M1_G = ((8, 512, 2, 3, True, 2, 0, True), (64, 128, 2, 0, False, 2, 0, False),
         (16, 512, 2, 3, True, 2, 0, True, True), (16, 512, 2, 3, True, 3, 0, True, True),
         (32, 512, 2, 3, True, 3, 0, True, True), (16, 1024, 4, 3, True, 3, 0, True, True),
         (16, 512, 2, 3, True, 3, 96, True, True))


def _m1_load_candidates(k, ns, group_size, sms, cls):
    """W4-only M = 1 FMA candidates for members of widths ``ns`` (one: a single linear), split-K factors from
    ``_gemv_splits`` over all members' N tiles. Grouped scales: ``seg`` blocks where the group divides a block of
    2+ whole groups, else blocks of one group (``BLOCK_K = min(128, group)``, the register path's shape)."""
    pc = group_size >= k
    out = []
    rows = _M1_PC if pc else _M1_G
    for row in rows:
        bn, bk, warps, stages, xw, lean, maxnreg = row[:7]
        seg = bool(row[7]) if len(row) > 7 else False
        rt = bool(row[8]) if len(row) > 8 else False
        if not pc:
            if seg:
                if not (bk < k and bk % group_size == 0 and bk > group_size):
                    continue
            else:
                bk = min(bk, group_size)
        elif bk > max(k, 256):
            continue
        if bn * bk // 8 < 32 * warps:
            continue
        tiles = sum(triton.cdiv(n, bn) for n in ns)
        for split in _gemv_splits(tiles, k, bk, sms):
            out.append(cls(bn, bk, split, warps, seg=seg, stages=stages, xw=xw, lean=lean, maxnreg=maxnreg, rt=rt))
    return out


def grouped_candidates(k, ns, group_size, sms=132, m=1):
    """Grouped decode configs the tuner times (M <= 16): M = 1 the FMA GEMV over all members' tiles;
    M 2..16 the tensor-core GEMV (split 1, see decode_candidates) and per-member launches."""
    pc = group_size >= k
    out = []
    if m == 1:
        out += _m1_load_candidates(k, ns, group_size, sms, GroupedConfig)
    else:
        tc_bks = [bk for bk in ((128, 256) if pc else (128,)) if _valid_block_k(bk, k, group_size)]
        for (bn, bk, warps), bk2 in itertools.product(_GROUPED_TC, tc_bks[:1]):
            out.append(GroupedConfig(bn, bk2, 1, warps, tc=True))
        out.append(GroupedConfig(per_member=True))
    return list(dict.fromkeys(out))


def default_grouped_config(m, k, ns, group_size, sms=132):
    if m == 1:
        bk = _block_k_choices(k, group_size, [128, 64, 32])[0]
        tiles = sum(triton.cdiv(n, 32) for n in ns)
        return GroupedConfig(32, bk, _gemv_splits(tiles, k, bk, sms)[0], 2, lean=2)
    return GroupedConfig(per_member=True)


# ------------------------------------------------------------------ workspaces (per device)
class _Workspace:
    """Persistent buffers the decode kernels leave clean (zeroed, or epoch-consistent) after every launch."""

    def __init__(self, device):
        self.device = device
        self.sync = torch.zeros(4, dtype=torch.int32, device=device)  # tile id, u arrivals, done
        self.u = torch.zeros(MAX_DECODE_M * MAX_EC_RANK, dtype=torch.float32, device=device)
        # modes pdl/2k: the gated u as tagged int64 words (tags unused: the kernel boundary orders them)
        self.gu = torch.zeros(MAX_DECODE_M * MAX_EC_RANK, dtype=torch.int64, device=device)
        self.ep = torch.zeros(1, dtype=torch.int32, device=device)
        self.acc = {}     # N -> fp32 [16 * N] split-K accumulator
        self.arrive = {}  # N -> int32 [cdiv(N, 16)] split arrival counters
        self.geo = {}     # (N, N tiles) -> (epoch + per-tile phases int32 [1 + N tiles], tagged g(u)⊙u words)
        self.ecw = {}     # mode ecterm: slot geometry -> the published EC term words

    def for_n(self, n):
        if n not in self.acc:
            self.acc[n] = torch.zeros(MAX_DECODE_M * n, dtype=torch.float32, device=self.device)
            self.arrive[n] = torch.zeros(triton.cdiv(n, MIN_BLOCK_N), dtype=torch.int32, device=self.device)
        return self.acc[n], self.arrive[n]

    def for_epoch(self, n, n_tiles):
        """Mode "epoch": state of one launch geometry. Every launch of it bumps the epoch and each tile's phase
        once, so they agree between launches; another geometry has its own (its tile count differs)."""
        key = (n, n_tiles)
        if key not in self.geo:
            self.geo[key] = (torch.zeros(1 + n_tiles, dtype=torch.int32, device=self.device),
                             torch.zeros(MAX_DECODE_M * MAX_EC_RANK, dtype=torch.int64, device=self.device))
        return self.geo[key]

    def for_slots(self, n, n_tiles, n_u, r, term=False):
        """Modes "slots"/"ecsplit": phases ``int32 [n_u + n_tiles]`` (u tiles, then N tiles) and the slot
        words ``int64 [n_u * 16 * r]`` of one launch geometry (every launch bumps each phase once, so they agree
        between launches). ``term`` ("ecterm"): n_tiles more phases (the W finishers) and the published EC term words
        ``int64 [16 * n]`` (a third entry)."""
        key = ("slots", n, n_tiles, n_u, r, term)
        if key not in self.geo:
            self.geo[key] = (torch.zeros(n_u + n_tiles * (2 if term else 1), dtype=torch.int32, device=self.device),
                             torch.zeros(n_u * MAX_DECODE_M * r, dtype=torch.int64, device=self.device))
            if term:
                self.ecw[key] = torch.zeros(MAX_DECODE_M * n, dtype=torch.int64, device=self.device)
        return self.geo[key] + ((self.ecw[key],) if term else ())

    def for_group(self, n_total):
        """Split-K buffers of a grouped launch: ``n_total`` columns, up to ``n_total / 4 + MAX_GROUP`` N tiles."""
        key = ("group", n_total)
        if key not in self.acc:
            self.acc[key] = torch.zeros(MAX_DECODE_M * n_total, dtype=torch.float32, device=self.device)
            self.arrive[key] = torch.zeros(triton.cdiv(n_total, MIN_BLOCK_N) + MAX_GROUP, dtype=torch.int32,
                                           device=self.device)
        return self.acc[key], self.arrive[key]


_WORKSPACES = {}


def _workspace(device) -> _Workspace:
    key = (device.type, device.index)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(device)
    return _WORKSPACES[key]


# ------------------------------------------------------------------ validation
def _check(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u):
    where = "spear_compile.lowering.dispatch.launch"
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise SpearError(f"{where}: activations must be bf16/fp16, got {x.dtype}")
    k = x.shape[-1]
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] * 2 != k:
        raise SpearError(f"{where}: qdata must be uint8 [N, K/2] for K={k}, got {qdata.dtype} {tuple(qdata.shape)}")
    n = qdata.shape[0]
    if group_size <= 0 or k % group_size:
        raise SpearError(f"{where}: group_size={group_size} must divide K={k}")
    if group_size < k and (group_size < 16 or group_size & (group_size - 1)):
        raise SpearError(f"{where}: group_size={group_size} must be a power of two >= 16 (or K for per-channel)")
    groups = k // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (n, groups) or t.dtype != x.dtype:
            raise SpearError(f"{where}: {name} must be {x.dtype} [{n}, {groups}], got {t.dtype} {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise SpearError(f"{where}: bias must be [{n}], got {tuple(bias.shape)}")
    if ec_A is None and u is None:
        if ec_B is not None or gate_w is not None:
            raise SpearError(f"{where}: ec_B/gate_w given without ec_A")
        return
    if ec_B is None or ec_B.dim() != 2 or ec_B.shape[0] != n:
        raise SpearError(f"{where}: ec_B must be [N={n}, r], got {None if ec_B is None else tuple(ec_B.shape)}")
    r = ec_B.shape[1]
    if r > MAX_EC_RANK:
        raise SpearError(f"{where}: EC rank {r} exceeds the kernels' limit {MAX_EC_RANK}")
    if ec_A is not None and tuple(ec_A.shape) != (r, k):
        raise SpearError(f"{where}: ec_A must be [r={r}, K={k}], got {tuple(ec_A.shape)}")
    if u is not None and u.shape[-1] != r:
        raise SpearError(f"{where}: u must be [M, r={r}], got {tuple(u.shape)}")
    if gate_w is not None and (tuple(gate_w.shape) != (r, r) or gate_b is None or tuple(gate_b.shape) != (r,)):
        raise SpearError(f"{where}: gate_w must be [{r}, {r}] with gate_b [{r}]")


# ------------------------------------------------------------------ runners
def project_u(x2: torch.Tensor, ec_A: torch.Tensor) -> torch.Tensor:
    """The separable EC step ``u = x Aᵀ`` (a tensor-parallel caller all-reduces this)."""
    return F.linear(x2, ec_A)


def _gate(u, gate_w, gate_b):
    uf = u.float()
    return uf * (2.0 * torch.sigmoid(F.linear(uf, gate_w.float(), gate_b.float())))


def _block_r(r):
    return max(16, triton.next_power_of_2(max(r, 1)))


@dataclass(frozen=True)
class _DecodeSetup:
    """What both decode launchers need besides the config: workspaces and the EC's u-tile geometry."""
    acc: torch.Tensor
    arrive: torch.Tensor
    sync: torch.Tensor
    u_buf: torch.Tensor
    u: Optional[torch.Tensor]
    r: int
    block_r: int
    block_ku: int
    num_u_tiles: int  # u tiles inside the W launch
    mode: int = 0  # EC_MODE of the W kernel
    u_kernel_tiles: int = 0  # > 0: ec_u_kernel runs first with this many programs (modes pdl/2k)
    gu: Optional[torch.Tensor] = None  # the tagged g(u)⊙u words (modes epoch/pdl/2k; else the sync buffer)
    phase: Optional[torch.Tensor] = None  # epoch, then one phase per N tile (mode epoch); the ep scratch (pdl/2k);
    #                                       else the sync buffer (the kernels' unused pointer)
    b_early: bool = True
    gdc: bool = False
    u_sub: int = 1  # mode slots: BLOCK_KU sub-blocks per u tile
    block_u: int = 1  # mode slots: power of two >= the u tiles


def _pdl_ok(device) -> bool:
    """Programmatic dependent launch: Hopper or newer, compiled kernels only."""
    return device.type == "cuda" and not _interpret() and torch.cuda.get_device_capability(device)[0] >= 9


def _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles=0, split=1, slots_ok=False) -> _DecodeSetup:
    """``slots_ok``: the launch is the M = 1 FMA GEMV, where mode "slots" exists (elsewhere it runs as "epoch")."""
    ws = _workspace(x2.device)
    acc, arrive = ws.for_n(n)
    has_ec = ec_B is not None
    if has_ec and u is None and cfg.two_launch:
        u = project_u(x2, ec_A)
    r = ec_B.shape[1] if has_ec else 0
    block_r = _block_r(r)
    block_ku = max(32, 8192 // block_r)
    tiles = triton.cdiv(x2.shape[1], block_ku) if has_ec and u is None else 0
    if cfg.ec not in EC_MODES or cfg.ec_b not in ("auto", "early", "late"):
        raise SpearError(f"spear_compile.lowering.dispatch: unknown EC mode in {cfg.name}")
    mode = EC_MODES[cfg.ec] if tiles else 0
    if mode >= 3 and not slots_ok:
        mode = 1
    gu = phase = ws.sync
    u_buf = ws.u if u is None else u.contiguous()
    u_sub = block_u = 1
    if mode >= 3:
        k = x2.shape[1]
        cap = cfg.u_tiles or SLOT_TILES
        u_sub = triton.cdiv(triton.cdiv(k, cap), block_ku)
        if u_sub > 1 and block_ku > 128:  # several sub-blocks a tile: a runtime loop over half-size ones (two of
            u_sub, block_ku = 2 * u_sub, block_ku // 2  # 256 held the u tile at 160-167 registers, sm_90 AOT)
        tiles = triton.cdiv(k, u_sub * block_ku)
        block_u = triton.next_power_of_2(tiles)
        state = ws.for_slots(n, n_tiles, tiles, r, mode == 6)
        phase, gu = state[:2]
        if mode == 6:
            u_buf = state[2]  # the kernel's u pointer carries the EC term words in this mode
    elif mode == 1:
        phase, gu = ws.for_epoch(n, n_tiles)
    elif mode == 2:
        phase, gu = ws.ep, ws.gu
    # "auto": early when split_k == 1, except in mode slots, whose finishing program loads slots and gate anyway (B
    # beside them is free there; held from program start with the gate it took the seg tiles from 127 to 167 registers)
    b_early = cfg.ec_b == "early" or (cfg.ec_b == "auto" and split == 1 and mode < 3)
    return _DecodeSetup(acc, arrive, ws.sync, u_buf, u, r, block_r, block_ku,
                        0 if mode == 2 else tiles, mode, tiles if mode == 2 else 0, gu, phase, b_early,
                        mode == 2 and cfg.ec == "pdl" and _pdl_ok(x2.device), u_sub, block_u)


def _launch_u_kernel(d, x2, ec_A, gate_w, gate_b):
    """Modes pdl/2k: ``g(u) ⊙ u`` by ``ec_u_kernel`` into the workspace words the W kernel reads."""
    m, k = x2.shape
    gated = gate_w is not None
    ec_u_kernel[(d.u_kernel_tiles,)](
        x2, ec_A, d.u_buf, d.sync, gate_w if gated else x2, gate_b if gated else x2, d.gu, d.phase,
        m, k, d.r, x2.stride(0), d.u_kernel_tiles,
        BLOCK_M=1 if m == 1 else 16, BLOCK_KU=d.block_ku, BLOCK_R=d.block_r, GATED=gated, GDC=d.gdc,
        INTERPRET=_interpret(), num_warps=4,
    )


def _pdl_kwargs(d):
    return {"launch_pdl": True} if d.gdc else {}


def gemv_ok(k, qdata) -> bool:
    """The int32-word kernel needs K % 8 == 0 and 4-byte aligned rows."""
    return k % 8 == 0 and qdata.data_ptr() % 4 == 0 and qdata.is_contiguous()


def _run_decode(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y, stage="all"):
    """``stage="w"`` (bench only): modes pdl/2k without their u kernel (the W kernel reads whatever gated u the
    workspace holds), to time the W kernel's EC epilogue alone."""
    m, k = x2.shape
    if cfg.kernel == "gemv" and gemv_ok(k, qdata) and (m == 1 or cfg.tc):
        return _run_gemv(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y, stage)
    if not _valid_block_k(cfg.block_k, k, group_size) or cfg.block_k % 16:
        raise SpearError(f"spear_compile.lowering.dispatch: {cfg.name} cannot run the byte kernel here "
                         f"(M={m}, K={k}, group {group_size}): its BLOCK_K must be a multiple of 16 within one group")
    n = qdata.shape[0]
    n_tiles = triton.cdiv(n, cfg.block_n)
    d = _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles, cfg.split_k)
    has_ec = ec_B is not None
    n_prog = d.num_u_tiles + n_tiles * cfg.split_k
    dummy = x2  # never read; same dtype as the real operands so every constexpr branch type-checks
    if d.u_kernel_tiles and stage != "w":
        _launch_u_kernel(d, x2, ec_A, gate_w, gate_b)
    w4_decode_kernel[(n_prog,)](
        x2, qdata, scale, zero, bias if bias is not None else dummy, y,
        ec_A if ec_A is not None else dummy, ec_B if has_ec else dummy,
        gate_w if gate_w is not None else dummy, gate_b if gate_w is not None else dummy, d.u_buf,
        d.acc, d.arrive, d.sync, d.gu, d.phase,
        m, n, k, d.r, group_size, k // group_size, x2.stride(0), y.stride(0), d.num_u_tiles, n_prog, cfg.split_k,
        BLOCK_M=1 if m == 1 else 16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_KU=d.block_ku,
        BLOCK_R=d.block_r, HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None,
        U_READY=d.u is not None, INTERPRET=_interpret(), EC_MODE=d.mode, B_EARLY=d.b_early, GDC=d.gdc,
        num_warps=cfg.num_warps, **_pdl_kwargs(d),
    )
    return y


def _run_gemv(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y, stage="all"):
    m, k = x2.shape
    n = qdata.shape[0]
    n_tiles = triton.cdiv(n, cfg.block_n)
    n_kb = triton.cdiv(k, cfg.block_k)
    split = min(cfg.split_k, n_kb)
    d = _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles, split, slots_ok=m == 1 and not cfg.tc)
    has_ec = ec_B is not None
    dummy = x2  # never read; same dtype as the real operands so every constexpr branch type-checks
    if d.u_kernel_tiles and stage != "w":
        _launch_u_kernel(d, x2, ec_A, gate_w, gate_b)
    w4_gemv_kernel[(d.num_u_tiles + n_tiles * (split + (d.mode >= 5)),)](
        x2, qdata.view(torch.int32), scale, zero, bias if bias is not None else dummy, y,
        ec_A if ec_A is not None else dummy, ec_B if has_ec else dummy,
        gate_w if gate_w is not None else dummy, gate_b if gate_w is not None else dummy, d.u_buf,
        d.acc, d.arrive, d.sync, d.gu, d.phase,
        m, n, k, d.r, group_size, k // group_size, x2.stride(0), y.stride(0), d.num_u_tiles, n_tiles, split,
        BLOCK_M=16 if cfg.tc else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SPLIT=split > 1 or d.mode == 5,
        PER_CHANNEL=group_size == k, WIDE=group_size < k and cfg.block_k > group_size, TC=cfg.tc,
        X_BF16=x2.dtype == torch.bfloat16, BLOCK_KU=d.block_ku, BLOCK_R=d.block_r,
        HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None, U_READY=d.u is not None,
        DYNAMIC_IDS=cfg.dynamic_ids, INTERPRET=_interpret(), GPB=_gpb(cfg, m, k, group_size),
        EC_MODE=d.mode, B_EARLY=d.b_early, GDC=d.gdc, **_load_kwargs(cfg, x2), U_SUB=d.u_sub, BLOCK_U=d.block_u,
        MAX_SPINS=_SLOT_SPINS, num_warps=cfg.num_warps, **_pdl_kwargs(d),
    )
    return y


def _run_prefill(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    m, k = x2.shape
    n = qdata.shape[0]
    if not _valid_block_k(cfg.block_k, k, group_size):
        raise SpearError(f"spear_compile.lowering.dispatch: {cfg.name} needs BLOCK_K within one group "
                         f"(K={k}, group {group_size})")
    has_ec = ec_B is not None
    if has_ec and u is None:
        u = project_u(x2, ec_A)
    r = ec_B.shape[1] if has_ec else 0
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    w4_prefill_kernel[grid](
        x2, qdata, scale, zero, bias if bias is not None else y, y,
        u.contiguous() if has_ec else y, ec_B if has_ec else y,
        gate_w if gate_w is not None else y, gate_b if gate_w is not None else y,
        m, n, k, r, group_size, k // group_size, x2.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, BLOCK_R=_block_r(r),
        HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None, PER_CHANNEL=group_size == k,
        INTERPRET=_interpret(), SWAP=cfg.swap, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def _dequant_block(k, group_size):
    """(BLOCK_N, BLOCK_W words, per-word scales) of ``w4_dequant_words_kernel``: 1024-word (4 KB) tiles; a tile
    inside one group (one scale per row) unless the group is under 128 (then scales per word)."""
    k8 = k // 8
    if group_size >= k:  # per-channel: long rows
        bw = min(64, triton.next_power_of_2(k8))
    else:
        bw = min(16, triton.next_power_of_2(k8))
    per_word = group_size < k and group_size < 8 * bw
    return max(16, 1024 // bw), bw, per_word


def _launcher(kernel, traceable):
    """``kernel``, or ``torch.library.wrap_triton(kernel)`` when ``traceable``: a call traced into an FX graph
    (``passes.decompose_prefill_linears``) then records the launch itself, which Inductor emits from its wrapper."""
    if not traceable:
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def dequantize_w4(qdata, scale, zero, group_size, dtype, *, tail=None, tail_width=0, tail_col0=0, fold=None,
                  block=None, out=None, row0=0, traceable=False):
    """``(q - zero) * scale`` as a ``[N, K]`` ``dtype`` matrix, or ``[N, K + tail_width]`` ``[W | tail]``
    (``tail``: ``[N, r]`` in tail columns ``tail_col0 .. tail_col0 + r``, zeros in the others; ``tail=None``
    with ``tail_width > 0``: all zeros), or ``W + B A`` (``fold=(A, B)``). int32-word kernel where the rows
    allow it (``gemv_ok``), else the byte kernel (plain W only). ``block``: force (BLOCK_N, BLOCK_W, per-word).
    ``out``: write rows ``row0 .. row0 + N`` of this ``[*, K + tail_width]`` tensor instead (and return it).
    ``traceable``: launched through ``wrap_triton`` (the caller has checked the rows: fake tensors have no
    data pointer)."""
    n, k = qdata.shape[0], qdata.shape[1] * 2
    where = "spear_compile.lowering.dispatch.dequantize_w4"
    r_tail = tail.shape[1] if tail is not None else 0
    if tail_width < 0 or not 0 <= tail_col0 <= tail_width - r_tail:
        raise SpearError(f"{where}: tail of width {r_tail} at column {tail_col0} does not fit tail_width={tail_width}")
    has_tail = tail_width > 0
    if out is not None and (out.dim() != 2 or out.shape[1] != k + tail_width or out.stride(1) != 1
                            or not 0 <= row0 <= out.shape[0] - n or out.dtype != dtype):
        raise SpearError(f"{where}: out must be {dtype} [>= row0 + {n}, {k + tail_width}] with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)} stride {out.stride()} and row0={row0}")
    if not (traceable or gemv_ok(k, qdata)):
        if has_tail or fold is not None or out is not None:
            raise SpearError(f"{where}: [W | B] / W + BA / out= need K % 8 == 0 and 4-byte aligned packed rows")
        w = torch.empty(n, k, dtype=dtype, device=qdata.device)
        block_k = min(128, group_size) if group_size < k else 128  # in one group: one (scale, zero) per row
        w4_dequantize_kernel[(triton.cdiv(n, 32), triton.cdiv(k, block_k))](
            qdata, scale, zero, w, n, k, group_size, k // group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
        return w
    w = torch.empty(n, k + tail_width, dtype=dtype, device=qdata.device) if out is None else out
    bn, bw, per_word = block or _dequant_block(k, group_size)
    if group_size < k and group_size < 8 * bw:
        per_word = True
    ab = fold if fold is not None else (None, None)
    extra = tail if tail is not None else ab[1]
    r = extra.shape[1] if extra is not None else 0
    dummy = scale  # never read; the activation dtype, like B and A
    grid = (triton.cdiv(n, bn), triton.cdiv(k // 8, bw) + (1 if has_tail else 0))
    _launcher(w4_dequant_words_kernel, traceable)[grid](
        qdata.view(torch.int32), scale, zero, w, extra if extra is not None else dummy,
        ab[0] if fold is not None else dummy,
        n, k, k // 8, r, tail_width, group_size, k // group_size, w.stride(0), row0, tail_col0,
        BLOCK_N=bn, BLOCK_W=bw, PER_WORD_SCALE=per_word, TAIL=has_tail,
        BLOCK_T=triton.next_power_of_2(max(tail_width, 16)), FOLD=fold is not None, BLOCK_R=_block_r(r),
        INTERPRET=_interpret(), num_warps=4,
    )
    return w


def _xpass_grid(m, k, cfg, device, max_splits=None):
    """A split-K x pass's geometry from its config ``(BLOCK_M, BLOCK_K, stages, warps, programs per SM)``: 16-row
    tiles below M = 1024, K split so that there are about ``programs per SM`` programs per SM (at most
    ``max_splits`` splits). Returns (BLOCK_M, BLOCK_K, stages, warps, M tiles, K blocks per split, splits)."""
    bm, bk, stages, warps, per_sm = cfg
    bm = bm if m >= 1024 else 16
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    m_tiles, n_kb = triton.cdiv(m, bm), triton.cdiv(k, bk)
    splits = min(n_kb, max_splits or n_kb, max(1, triton.cdiv(per_sm * _num_sms(device), m_tiles)))
    per = triton.cdiv(n_kb, splits)
    return bm, bk, stages, warps, m_tiles, per, triton.cdiv(n_kb, per)


def ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=None, col0=0, width=None, copy_x=False, split=False,
                traceable=False):
    """``v = g(u) ⊙ u`` (u = x Aᵀ in fp32, or the given ``u``) into columns ``col0 .. col0 + width`` of ``out``
    (zeros past r; a new ``[M, r]`` tensor by default); ``copy_x``: x into columns ``0 .. K`` too.
    ``split=False``: one launch, one program per 16 rows (``ec_prologue_kernel``); ``split=True``: a split-K
    pass over x with ~2 programs per SM (``ec_xpass_kernel``: copy + fp32 partials) and the gate
    (``ec_gate_kernel``) in a second launch. ``traceable``: launched through ``wrap_triton`` (``_launcher``).
    (``[x | 0]`` already in ``out``, written by x's producer: ``ec_prologue_in_place``.)"""
    m, k = x2.shape
    width = r if width is None else width
    if out is None:
        out = torch.empty(m, width, dtype=x2.dtype, device=x2.device)
    x_in_out = False  # x read from columns 0 .. K of out (X_IN_OUT)
    if copy_x and u is None and _block_r(r) > COPY_X_MAX_BLOCK_R:
        # measured on H100 / Triton 3.6 (bench/NOTES_kernels.md, session 8): with the copy in the same loop as the
        # x Aᵀ dot, u came out wrong at BLOCK_R >= 64 (rel err 1e-2 at 64, 0.2 at 96 and 128; x copied exactly).
        # Copy first, then the projection without the copy, which is right at every rank.
        out[:, :k].copy_(x2)
        x2, copy_x, x_in_out = out[:, :k], False, True
    if u is not None:
        u = u.reshape(m, r)
        if u.stride(-1) != 1:
            u = u.contiguous()
    block_r = _block_r(r)
    pad = triton.next_power_of_2(width - block_r) if width > block_r else 0
    dummy = ec_A if ec_A is not None else x2  # never read (not x: x may be a view of ``out``, written here)
    gw, gb = (gate_w, gate_b) if gate_w is not None else (dummy, dummy)
    if not split:
        _launcher(ec_prologue_kernel, traceable)[(triton.cdiv(m, 16),)](
            dummy if x_in_out else x2, ec_A if ec_A is not None else dummy, u if u is not None else dummy, gw, gb, out,
            m, k, r, width, 0 if x_in_out else x2.stride(0), u.stride(0) if u is not None else 0, out.stride(0), col0,
            BLOCK_M=16, BLOCK_K=min(256, max(16, triton.next_power_of_2(k))), BLOCK_R=block_r,
            COPY_X=copy_x, U_GIVEN=u is not None, GATED=gate_w is not None, LOOP=copy_x or u is None,
            INTERPRET=_interpret(), BLOCK_PAD=pad, X_IN_OUT=x_in_out, num_warps=4, num_stages=3,
        )
        return out
    part = None
    if copy_x or u is None:
        bm, bk, stages, warps, m_tiles, per, n_split = _xpass_grid(
            m, k, XPASS_CONFIG_IN_PLACE_DEFAULT if x_in_out else XPASS_CONFIG, x2.device)
        if u is None:
            part = torch.empty(n_split, m, block_r, dtype=torch.float32, device=x2.device)
        _launcher(ec_xpass_kernel, traceable)[(m_tiles, n_split)](
            dummy if x_in_out else x2, ec_A if ec_A is not None else dummy, part if part is not None else out,
            out if copy_x or x_in_out else part, m, k, r, 0 if x_in_out else x2.stride(0), out.stride(0), per * bk,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, COPY_X=copy_x, PROJECT=u is None, X_IN_OUT=x_in_out,
            INTERPRET=_interpret(), num_warps=warps, num_stages=stages,
        )
    _launcher(ec_gate_kernel, traceable)[(triton.cdiv(m, 16),)](
        part if part is not None else out, u if u is not None else dummy, gw, gb, out,
        m, r, width, part.shape[0] if part is not None else 0, u.stride(0) if u is not None else 0,
        out.stride(0), col0,
        BLOCK_M=16, BLOCK_R=block_r, U_GIVEN=u is not None, GATED=gate_w is not None, BLOCK_PAD=pad, num_warps=4,
    )
    return out


MAX_IN_PLACE_BLOCKS = 4  # ECs one ``ec_prologue_in_place`` takes (its kernels' A / gate pointer arguments)
MAX_IN_PLACE_SPLITS = 16  # its K splits: the gate launch reads every split's partial, unrolled


def ec_prologue_in_place(out, k, blocks, traceable=False, xpass=None):
    """``out = [x | 0]`` (``[M, K + width]``, written by x's producer) becomes ``[x | v_1 | v_2 | ... | 0]``:
    ``blocks`` = ``[(A_b, gate_w_b or None, gate_b_b or None), ...]``, up to ``MAX_IN_PLACE_BLOCKS`` ECs of x
    (merged siblings), each read from its own tensors (no stacked copies), ``v_b = g(u_b) ⊙ u_b``,
    ``u_b = x A_bᵀ`` in fp32, in columns ``K + r_1 + ... + r_(b-1) ..``. Two launches: the split-K x pass
    (``ec_xpass_blocks_kernel``) and the gates (``ec_gate_blocks_kernel``). ``xpass``: the x pass's (BLOCK_M,
    BLOCK_K, stages, warps, programs per SM), default ``XPASS_CONFIG_IN_PLACE``."""
    where = "spear_compile.lowering.dispatch.ec_prologue_in_place"
    m = out.shape[0]
    ranks = [a.shape[0] for a, _, _ in blocks]
    if not 1 <= len(blocks) <= MAX_IN_PLACE_BLOCKS:
        raise SpearError(f"{where}: 1 to {MAX_IN_PLACE_BLOCKS} ECs, got {len(blocks)}")
    if out.dim() != 2 or out.stride(1) != 1 or out.shape[1] < k + sum(ranks):
        raise SpearError(f"{where}: out must be [M, >= K + R] = [*, >= {k + sum(ranks)}] with unit column stride, "
                         f"got {tuple(out.shape)} stride {out.stride()}")
    if any(a.shape[1] != k or a.dtype != out.dtype or not a.is_contiguous() for a, _, _ in blocks):
        raise SpearError(f"{where}: each A must be a contiguous {out.dtype} [r, K={k}], got "
                         f"{[(a.dtype, tuple(a.shape), a.stride()) for a, _, _ in blocks]}")
    for (a, gw, gb), r in zip(blocks, ranks):
        if (gw is None) != (gb is None) or (gw is not None and (tuple(gw.shape) != (r, r) or tuple(gb.shape) != (r,)
                                                                or not (gw.is_contiguous() and gb.is_contiguous()))):
            raise SpearError(f"{where}: a gate needs contiguous W_g [r, r] and b_g [r] with r = {r}, got "
                             f"{None if gw is None else tuple(gw.shape)} and {None if gb is None else tuple(gb.shape)}")
    bm, bk, stages, warps, m_tiles, per, n_split = _xpass_grid(m, k, xpass or XPASS_CONFIG_IN_PLACE, out.device,
                                                               MAX_IN_PLACE_SPLITS)
    block_r = _block_r(max(ranks))
    part = torch.empty(n_split, m, len(blocks) * block_r, dtype=torch.float32, device=out.device)
    pad = [blocks[0][0]] * (MAX_IN_PLACE_BLOCKS - len(blocks))  # never read
    a_s = [a for a, _, _ in blocks] + pad
    gw_s = [gw if gw is not None else a for a, gw, _ in blocks] + pad
    gb_s = [gb if gb is not None else a for a, _, gb in blocks] + pad
    r_s = ranks + [0] * (MAX_IN_PLACE_BLOCKS - len(blocks))
    _launcher(ec_xpass_blocks_kernel, traceable)[(m_tiles, n_split)](
        out, part, *a_s, m, k, *r_s, out.stride(0), per * bk, 0,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r, N_BLK=len(blocks), INTERPRET=_interpret(),
        num_warps=warps, num_stages=stages,
    )
    _launcher(ec_gate_blocks_kernel, traceable)[(triton.cdiv(m, 16),)](
        part, out, *gw_s, *gb_s, m, k, *r_s, out.stride(0),
        BLOCK_M=16, BLOCK_R=block_r, N_BLK=len(blocks), N_SPLIT=n_split,
        GATE_MASK=sum(1 << i for i, (_, gw, _) in enumerate(blocks) if gw is not None), num_warps=4,
    )
    return out


def _mm_into(a, b, bias, y):
    """``y = a bᵀ (+ bias)`` by cuBLAS, written into ``y`` (which may be a column slice)."""
    return torch.addmm(bias, a, b.t(), out=y) if bias is not None else torch.mm(a, b.t(), out=y)


def _reference_linear(x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """The tuner's reference: torch dequantize (independent of every Triton kernel), cuBLAS, EC by torch ops."""
    from ..ops import dequantize_packed

    w = dequantize_packed(qdata, scale, zero, x2.shape[1], x2.dtype)
    _mm_into(x2, w, bias, y)
    if ec_B is not None:
        if u is None:
            u = project_u(x2, ec_A)
        if gate_w is not None:
            u = _gate(u, gate_w, gate_b)
        y.addmm_(u.to(x2.dtype), ec_B.t())
    return y


_SIDE = {}


def _side_stream(device):
    key = (device.type, device.index)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device)
    return _SIDE[key]


class _Fork:
    """``with _Fork(on, device):`` runs the block on the device's side stream after it waited for the current one
    (a CUDA-graph capture follows the fork); ``_join`` makes the current stream wait for the side stream. Tensors the
    block writes must be allocated before it, on the current stream, and used on it only after the join."""

    def __init__(self, on, device):
        self.on, self.device, self.ctx = on, device, None

    def __enter__(self):
        if self.on:
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            self.ctx = torch.cuda.stream(side)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def _join(on, device):
    if on:
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))


def _run_dequant_cublas(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """Dequantize + cuBLAS with the EC joined as ``cfg.ec`` says (``DequantCublasConfig``); ``cfg=None``: the
    tuner's reference (``_reference_linear``)."""
    if cfg is None:
        return _reference_linear(x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    m, k = x2.shape
    dt = x2.dtype
    ec = cfg.ec if ec_B is not None else "none"
    if ec == "fold" and (u is not None or gate_w is not None):
        ec = "kcat"
    if ec in ("kcat", "fold") and not gemv_ok(k, qdata):
        ec = "after"
    if ec == "none":
        return _mm_into(x2, dequantize_w4(qdata, scale, zero, group_size, dt), bias, y)
    r = ec_B.shape[1]
    if ec == "fold":
        return _mm_into(x2, dequantize_w4(qdata, scale, zero, group_size, dt, fold=(ec_A, ec_B)), bias, y)
    overlap = cfg.overlap and x2.is_cuda
    if ec == "kcat":
        rp = -(-r // (cfg.pad or 8)) * (cfg.pad or 8)
        xv = torch.empty(m, k + rp, dtype=dt, device=x2.device)  # [x | v]
    else:
        xv = torch.empty(m, r, dtype=dt, device=x2.device)  # v
    if u is not None:
        u = u.reshape(m, r)
        u = u if u.stride(-1) == 1 else u.contiguous()
    with _Fork(overlap, x2.device):  # the prologue (on the side stream when overlapping) ...
        if ec == "kcat":
            ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=xv, col0=k, width=rp, copy_x=True, split=cfg.split)
        else:
            ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=xv, split=cfg.split)
    if ec == "kcat":  # ... and the dequantize (current stream) run concurrently
        wc = dequantize_w4(qdata, scale, zero, group_size, dt, tail=ec_B, tail_width=rp)
    else:
        w = dequantize_w4(qdata, scale, zero, group_size, dt)
    _join(overlap, x2.device)
    if ec == "kcat":
        return _mm_into(xv, wc, bias, y)
    v = xv
    if ec == "c_in":
        _mm_into(v, ec_B, bias, y)
        y.addmm_(x2, w.t())
    else:  # after
        _mm_into(x2, w, bias, y)
        y.addmm_(v, ec_B.t())
    return y


def _runner(cfg):
    if isinstance(cfg, batched.BatchedConfig):  # issue 18 hook
        return batched.run_single
    if isinstance(cfg, DecodeConfig):
        return _run_decode
    if isinstance(cfg, PrefillConfig):
        return _run_prefill
    return _run_dequant_cublas


# ------------------------------------------------------------------ choice + tuning cache
_TUNED = {}
TUNE_LOG = []  # (key, [(name, ms)...]) for the benchmark's notes


def clear_tuning():
    """Forget this process's tuned configs, tuning log and loaded cache files (the files on disk stay)."""
    _TUNED.clear()
    TUNE_LOG.clear()
    tune_cache.forget()


def _tuned_or_cached(key, device, cands, tune):
    """``key``'s config: rebuilt by name from ``cands`` when the on-disk cache has it (its timed results go back
    into ``TUNE_LOG`` for ``_ranked``), else ``tune()``'s pick, saved with its timings."""
    hit = tune_cache.lookup(key, cands, device)
    if hit is not None:
        TUNE_LOG.append((key, hit[1]))
        return hit[0]
    cfg = tune()
    tune_cache.store(key, cfg.name, _last_log(key), device)
    return cfg


def _key(m, k, n, group_size, dtype, has_ec, gated):
    return (k, n, group_size, str(dtype), m_bucket(m), bool(has_ec), bool(gated))


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _can_tune(x):
    return (x.is_cuda and os.environ.get("SPEAR_AUTOTUNE", "1") != "0" and not _interpret()
            and not torch.cuda.is_current_stream_capturing())


_FLUSH = {}


def _graph_ms(fn, device, reps=5):
    """ms per call of ``fn`` as a CUDA-graph replay, each call after an in-graph 64 MB write that evicts
    L2 (minus a graph of the writes alone): no host launch time inside the measurement, unlike
    ``do_bench``, whose per-call timing let the launcher's Python time leak in (bench/results/decode_sweep.md)."""
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(1 << 26, dtype=torch.uint8, device=device)
    buf = _FLUSH[device]
    fn()
    torch.cuda.synchronize(device)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                buf.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    times = []
    for g in graphs:
        best = float("inf")
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b))
        times.append(best)
    return max(times[0] - times[1], 1e-6) / reps


def _tune(key, args, cands, run=None, reference=None):
    """Time every candidate (CUDA-graph replay, L2 flushed; ``do_bench`` if capture fails) and keep the
    fastest whose output matches the dequantize + cuBLAS reference: a config the compiler gets wrong on
    this GPU is dropped, never picked. ``run(cfg)``/``reference()`` replace the single-linear runner and
    reference (grouped launches); ``args[-1]`` is the output either way."""
    from triton.testing import do_bench

    y = args[-1]
    if run is None:
        run = lambda cfg: _runner(cfg)(cfg, *args)  # noqa: E731
    if reference is None:
        reference = lambda: _run_dequant_cublas(None, *args[:-1], torch.empty_like(y))  # noqa: E731
    ref = reference().float()
    ref_norm = ref.norm().clamp_min(1e-30)
    results = []
    for cfg in cands:
        try:
            run(cfg)
            err = ((y.float() - ref).norm() / ref_norm).item()
            if not err < 2e-2:
                results.append((cfg.name, f"wrong: rel err {err:.2e}"))
                continue
            fn = lambda: run(cfg)  # noqa: E731
            try:
                ms = _graph_ms(fn, y.device)
            except Exception:  # noqa: BLE001  (capture refused: time it eagerly)
                ms = do_bench(fn, warmup=3, rep=10, return_mode="median")
        except Exception as e:  # a config the compiler refuses (shared memory, registers)
            results.append((cfg.name, f"failed: {type(e).__name__}"))
            continue
        results.append((cfg.name, ms))
    TUNE_LOG.append((key, results))
    timed = [(ms, i) for i, (_, ms) in enumerate(results) if isinstance(ms, float)]
    if not timed:
        raise SpearError(f"spear_compile.lowering.dispatch: no kernel config ran for {key}")
    best = min(timed)[1]
    return next(c for c in cands if c.name == results[best][0])


def _config_for(x2, args, k, n, group_size, has_ec, gated):
    m = x2.shape[0]
    key = _key(m, k, n, group_size, x2.dtype, has_ec, gated)
    if key in _TUNED:
        return _TUNED[key]
    sms = _num_sms(x2.device)
    if not _can_tune(x2):
        return default_config(m, k, n, group_size, sms, has_ec)
    if has_ec and m <= MAX_DECODE_M:  # the EC rides on the W4 key's fastest configs
        x2_, q, sc, z, b, gs = args[:6]
        _config_for(x2, (x2_, q, sc, z, b, gs, None, None, None, None, None, torch.empty_like(args[-1])),
                    k, n, group_size, False, False)
        cands = decode_ec_candidates(_ranked(_key(m, k, n, group_size, x2.dtype, False, False),
                                             decode_candidates(k, n, group_size, sms, False, m)), k, n, sms)
    else:
        cands = (decode_candidates(k, n, group_size, sms, has_ec, m) if m <= MAX_DECODE_M
                 else prefill_candidates(m, k, group_size, has_ec, gated))
    # issue 18 hook: the batched-decode W4 (+EC) kernel for 2 <= M <= 512 (lowering/batched.py)
    if args[10] is None:  # (a given u, the tensor-parallel hook, is not the batched kernel's case)
        cands = cands + batched.candidates_for(m, k, [n], group_size, sms, has_ec, args[7].shape[1] if has_ec else 0)
    _TUNED[key] = _tuned_or_cached(key, x2.device, cands, lambda: _tune(key, args, cands))
    return _TUNED[key]


def _last_log(key):
    """The timed results of ``key``'s last tuning (or cache hit) in ``TUNE_LOG``; [] if none."""
    return next((res for kk, res in reversed(TUNE_LOG) if kk == key), [])


def _ranked(key, cands):
    """``cands`` that ran for ``key`` in its last tuning, fastest first."""
    log = _last_log(key)
    by_name = {c.name: c for c in cands}
    timed = sorted((ms, name) for name, ms in log if isinstance(ms, float) and name in by_name)
    return [by_name[name] for _, name in timed] or cands[:1]


def choose(m: int, k: int, n: int, group_size: int, dtype=torch.bfloat16, ec_rank: int = 0, gated: bool = False) -> str:
    """Human-readable name of the kernel + config ``launch`` would use for this call."""
    group_size = group_size or k
    ec_rank = ec_rank or 0
    key = _key(m, k, n, group_size, dtype, ec_rank > 0, gated)
    ec = "" if ec_rank <= 0 else f" + EC r={ec_rank}{' gated' if gated else ' static'}"
    if key in _TUNED:
        return f"{_TUNED[key].name}{ec} (tuned, bucket M<={key[4]})"
    return f"{default_config(m, k, n, group_size, has_ec=ec_rank > 0).name}{ec} (default; tuned on first CUDA call)"


def _rows_and_out(x: torch.Tensor, n: int):
    """``x`` as ``[M, K]`` rows with unit stride, M, and an empty ``[M, n]`` output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.shape[0], torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)


def launch(x, qdata, scale, zero, bias, group_size, ec_A=None, ec_B=None, gate_w=None, gate_b=None,
           u: Optional[torch.Tensor] = None, config=None):
    """Quantized linear (+ bias) (+ gated/static EC) on the 4-bit container; x is ``[..., K]``.

    ``u``: precomputed ``x Aᵀ`` ``[M, r]`` (e.g. all-reduced across GPUs); ``config``: force one.
    """
    _check(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u)
    k = x.shape[-1]
    n = qdata.shape[0]
    x2, m, y = _rows_and_out(x, n)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    if u is not None:
        u = u.reshape(m, -1)
    args = (x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    cfg = config or _config_for(x2, args, k, n, group_size, ec_B is not None, gate_w is not None)
    if isinstance(cfg, DecodeConfig) and m > MAX_DECODE_M:
        raise SpearError(f"spear_compile.lowering.dispatch: decode config given for M={m} > {MAX_DECODE_M}")
    _runner(cfg)(cfg, *args)
    return y.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------ grouped linears (same x)
def _check_group(x, qdatas, scales, zeros, biases, group_size):
    where = "spear_compile.lowering.dispatch.launch_grouped"
    g = len(qdatas)
    if not 1 <= g or len(scales) != g or len(zeros) != g or (biases is not None and len(biases) != g):
        raise SpearError(f"{where}: qdata/scale/zero/bias lists must have the same length >= 1, got "
                         f"{g}/{len(scales)}/{len(zeros)}/{None if biases is None else len(biases)}")
    for i in range(g):
        _check(x, qdatas[i], scales[i], zeros[i], None if biases is None else biases[i], group_size,
               None, None, None, None, None)


def _members_into(x2, qdatas, scales, zeros, biases, group_size, y, config=None):
    """One launch per member (its own tuned config, or ``config`` for all) into column slices of ``y``."""
    col = 0
    for i, q in enumerate(qdatas):
        n = q.shape[0]
        yi = y[:, col:col + n]
        args = (x2, q, scales[i], zeros[i], biases[i], group_size, None, None, None, None, None, yi)
        cfg = config or _config_for(x2, args, x2.shape[1], n, group_size, False, False)
        _runner(cfg)(cfg, *args)
        col += n
    return y


def _grouped_kernel_ok(cfg, x2, qdatas):
    m, k = x2.shape
    return (not cfg.per_member and len(qdatas) <= MAX_GROUP and m <= MAX_DECODE_M and (m == 1 or cfg.tc)
            and all(gemv_ok(k, q) for q in qdatas))


def _run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y):
    """``y [M, ΣN] = [x W_1ᵀ | x W_2ᵀ | ...] (+ biases)``: one grouped launch where the kernel applies, else per member."""
    if isinstance(cfg, batched.BatchedConfig):  # issue 18 hook
        return batched.run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y)
    if not _grouped_kernel_ok(cfg, x2, qdatas):
        return _members_into(x2, qdatas, scales, zeros, biases, group_size, y)
    m, k = x2.shape
    g = len(qdatas)
    ns = [q.shape[0] for q in qdatas]
    n_total = sum(ns)
    split = min(cfg.split_k, triton.cdiv(k, cfg.block_k))
    tiles = [triton.cdiv(n, cfg.block_n) * split for n in ns]
    starts = list(itertools.accumulate(tiles))  # P_1, P_2, ... (first program of members 1..)
    cols = list(itertools.accumulate(ns))
    acc, arrive = _workspace(x2.device).for_group(n_total) if split > 1 else (y, y)
    has_bias = biases[0] is not None
    ptrs = []
    for i in range(MAX_GROUP):
        j = min(i, g - 1)  # unused slots repeat the last member (never read)
        ptrs += [qdatas[j].view(torch.int32), scales[j], zeros[j], biases[j] if has_bias else x2]
    pad = lambda v: (list(v) + [v[-1]] * MAX_GROUP)[:MAX_GROUP - 1]  # noqa: E731
    w4_gemv_grouped_kernel[(starts[-1],)](
        x2, y, acc, arrive, *ptrs,
        *(ns + [ns[-1]] * (MAX_GROUP - g)), *pad(starts[:-1] or [starts[-1]]), *pad(cols[:-1] or [cols[-1]]),
        m, k, group_size, k // group_size, x2.stride(0), n_total, split,
        MEMBERS=g, BLOCK_M=16 if cfg.tc else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SPLIT=split > 1,
        PER_CHANNEL=group_size == k, WIDE=group_size < k and cfg.block_k > group_size, TC=cfg.tc,
        X_BF16=x2.dtype == torch.bfloat16, HAS_BIAS=has_bias, INTERPRET=_interpret(), GPB=_gpb(cfg, m, k, group_size),
        **_load_kwargs(cfg, x2), num_warps=cfg.num_warps,
    )
    return y


def _group_key(m, k, ns, group_size, dtype, has_bias):
    return ("grouped", k, sum(ns), tuple(ns), group_size, str(dtype), m_bucket(m), bool(has_bias))


def _grouped_config_for(x2, qdatas, scales, zeros, biases, group_size, y):
    m, k = x2.shape
    ns = [q.shape[0] for q in qdatas]
    key = _group_key(m, k, ns, group_size, x2.dtype, biases[0] is not None)
    if key in _TUNED:
        return _TUNED[key]
    sms = _num_sms(x2.device)
    extra = batched.candidates_for(m, k, ns, group_size, sms) if _can_tune(x2) else []  # issue 18 hook
    if m > MAX_DECODE_M and not extra:
        return GroupedConfig(per_member=True)  # prefill: each member its own tuned GEMM
    if not _can_tune(x2):
        return default_grouped_config(m, k, ns, group_size, sms)
    args = (x2, qdatas, scales, zeros, biases, group_size, y)

    def reference():
        return _members_into(x2, qdatas, scales, zeros, biases, group_size, torch.empty_like(y), DequantCublasConfig())

    cands = (grouped_candidates(k, ns, group_size, sms, m) if m <= MAX_DECODE_M
             else [GroupedConfig(per_member=True)]) + extra  # issue 18 hook
    _TUNED[key] = _tuned_or_cached(key, x2.device, cands,
                                   lambda: _tune(key, args, cands, run=lambda cfg: _run_grouped(cfg, *args),
                                                 reference=reference))
    return _TUNED[key]


def choose_grouped(m: int, k: int, ns, group_size: int, dtype=torch.bfloat16, bias: bool = False) -> str:
    """Human-readable name of what ``launch_grouped`` would run for members of widths ``ns``."""
    group_size = group_size or k
    key = _group_key(m, k, list(ns), group_size, dtype, bias)
    if key in _TUNED:
        return f"{_TUNED[key].name} (tuned, bucket M<={key[6]})"
    if m > MAX_DECODE_M:
        return "grouped[per-member launches] (prefill)"
    return f"{default_grouped_config(m, k, list(ns), group_size).name} (default; tuned on first CUDA call)"


def launch_grouped(x, qdatas, scales, zeros, biases, group_size, config=None):
    """Several quantized linears of the same ``x [..., K]`` (same K, group size, dtype; biases all given or
    all None) as one ``[..., N_1 + ... + N_g]`` output, member i in columns ``[C_i, C_i + N_i)``.

    ``biases``: a list (entries None for no bias) or None; ``config``: a ``GroupedConfig`` to force one.
    """
    qdatas, scales, zeros = list(qdatas), list(scales), list(zeros)
    biases = [None] * len(qdatas) if biases is None else list(biases)
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise SpearError("spear_compile.lowering.dispatch.launch_grouped: biases must be all given or all None")
    _check_group(x, qdatas, scales, zeros, biases, group_size)
    n_total = sum(q.shape[0] for q in qdatas)
    x2, m, y = _rows_and_out(x, n_total)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_total)
    cfg = config or _grouped_config_for(x2, qdatas, scales, zeros, biases, group_size, y)
    _run_grouped(cfg, x2, qdatas, scales, zeros, biases, group_size, y)
    return y.reshape(*x.shape[:-1], n_total)


def warm_grouped(k: int, ns, group_size: int, dtype=torch.bfloat16, bias: bool = False, ms=(1,), device="cuda") -> None:
    """Tune (and allocate the workspaces of) the grouped key for members of widths ``ns`` before CUDA-graph
    capture, like ``optimize.warm_kernels`` does for single linears: tuning is keyed by shapes only, so
    random weights of those shapes do."""
    device = torch.device(device)
    g = len(ns)
    qs = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device) for n in ns]
    ss = [torch.full((n, k // group_size), 0.01, dtype=dtype, device=device) for n in ns]
    zs = [torch.full((n, k // group_size), 8.0, dtype=dtype, device=device) for n in ns]
    bs = [torch.zeros(n, dtype=dtype, device=device) for n in ns] if bias else [None] * g
    for m in ms:
        launch_grouped(torch.randn(m, k, dtype=dtype, device=device), qs, ss, zs, bs, group_size)
