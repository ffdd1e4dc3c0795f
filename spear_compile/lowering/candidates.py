"""The candidate tables the tuner times per key, and the untuned defaults.

Every row here won at least one shape of a recorded sweep (bench/results/, bench/NOTES_kernels.md says which);
configs that never won are not listed (force one with ``launch(..., config=)``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import torch

from .configs import (MAX_DECODE_M, DecodeConfig, DequantCublasConfig, GroupedConfig, Nibbles, PrefillConfig, cdiv,
                      valid_block_k)


def num_sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def split_for(n_tiles: int, k: int, block_k: int, sms: int) -> int:
    """Enough programs to keep ~8 tiles of loads in flight per SM, each split >= 2 K blocks long."""
    split = 1
    while n_tiles * split < 8 * sms and cdiv(k, block_k) >= 4 * split and split < 32:
        split *= 2
    return split


def block_k_choices(k, group_size, wanted):
    ks = [bk for bk in wanted if valid_block_k(bk, k, group_size)]
    return ks or [min(group_size, 32)]


def gemv_splits(n_tiles, k, block_k, sms):
    """Split-K factors that bring the launch to ~1-4 waves of programs (1 when the N tiles already do)."""
    n_kb = cdiv(k, block_k)
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
                for split in gemv_splits(cdiv(n, bn), k, bk, sms):
                    out.append(DecodeConfig(bn, bk, split, warps))
        if not pc:
            for bn, bk, warps in _SEG_M1:
                if bk < k and bk % group_size == 0 and bk > group_size:
                    for split in gemv_splits(cdiv(n, bn), k, bk, sms):
                        out.append(DecodeConfig(bn, bk, split, warps, seg=True))
    tc_bks = [bk for bk in ((128, 256) if pc else (128,)) if valid_block_k(bk, k, group_size)]
    tc_bns = (32,) if m == 1 and not has_ec else (16, 32, 64)  # W4-only M = 1: tensor cores never won (one kept)
    for bn, bk, warps in itertools.product(tc_bns, tc_bks[:1] if m == 1 and not has_ec else tc_bks,
                                           (4,) if m == 1 else (4, 8)):
        # split 1 only: fp32 atomics on a tensor-core accumulator layout summed replicated lanes on H100
        # (bench/decode_sweep.py, run 1: rel err 0.1-0.3 with BN=64, 4 warps, split >= 2)
        out.append(DecodeConfig(bn, bk, 1, warps, tc=True))
    if m > 1:
        for bn, bk, warps in ((32, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 4)):
            for bk2 in block_k_choices(k, group_size, [bk]):
                base = split_for(cdiv(n, bn), k, bk2, sms)
                for split in sorted({base, max(1, base // 2)}):
                    if cdiv(k, bk2) >= split:
                        out.append(DecodeConfig(bn, bk2, split, warps, kernel="v3"))
    return list(dict.fromkeys(out))


def decode_ec_candidates(w4_ranked, k=None, n=None, sms=132, top=3):
    """EC decode configs the tuner times, derived from the W4-only key's ranking (the EC adds ~5-9% bytes, so the
    W4 stream's best tilings stay the candidates): the ``top`` fastest, and the fastest whose programs fit one per
    SM (the EC lengthens each tile's finishing program; with several waves of programs that delay is paid once per
    wave: bench/results/decode_ec.md), each with the modes "epoch" and "pdl" (and "slots", "ecterm" where the config is
    the M = 1 FMA GEMV); and the fastest with the "spin" mode (the session-3 kernel) as the reference."""
    picks = list(w4_ranked[:top])
    if k is not None and n is not None:
        one_wave = [c for c in w4_ranked
                    if cdiv(n, c.block_n) * min(c.split_k, cdiv(k, c.block_k)) <= sms]
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
        for bk2 in block_k_choices(k, group_size, [bk, 32]):
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
        bk = block_k_choices(k, group_size, [128, 64, 32])[0]
        if m == 1:
            return DecodeConfig(32, bk, gemv_splits(cdiv(n, 32), k, bk, sms)[0], 2,
                                ec="slots" if has_ec else "spin", lean=2)
        return DecodeConfig(32, bk, split_for(cdiv(n, 32), k, bk, sms), 4, kernel="v3",
                            ec="epoch" if has_ec else "spin")
    if m > 64:  # measured faster than our Triton GEMM at M=256/2048 on H100 (bench/results/kernels.md)
        return DequantCublasConfig(ec="kcat", pad=64, split=True) if has_ec else DequantCublasConfig()
    return prefill_candidates(m, k, group_size)[0]


# grouped scales, K blocks of several whole groups (seg): long contiguous rows as per-channel's best blocks

class M1Row(NamedTuple):
    """One W4-only M = 1 FMA tiling (single and grouped launches)."""
    block_n: int
    block_k: int
    warps: int
    stages: int
    xw: bool
    lean: int  # a ``Nibbles`` value
    maxnreg: int = 0
    seg: bool = False
    rt: bool = False


# grouped scales, K blocks of several whole groups (seg): long contiguous rows as per-channel's best blocks
_SEG_M1 = ((8, 512, 2), (16, 512, 2), (16, 256, 2), (32, 512, 4))
_GROUPED_TC = ((16, 128, 4), (32, 128, 4), (64, 128, 8))

# W4-only M = 1 FMA configs, from bench/load_floor.py on H100 (run 1 of session 5: every group of both models, pc
# and g128; results/load_path.md). cp.async 3 deep with x as int32 pairs won every big launch (stages 5 and TMA never
# did); xw only on the wide word tiles, where plane loads need a layout shuffle through shared memory. Session 6
# (results/g128_body.md, A/B in one run): the rows-inner seg tile (rt: x unpacked once for 4 rows) took 7B g128
# gate|up 27.3 -> 24.3 us and q|k|v 16.2 -> 14.6; nibble pairs won 3 of 4 pc groups by 1-3% and the 7B g128 single
# launches (o, down), but lost 1-2% to lop3 on the rt grouped tiles: both schemes stay listed. The plain and-or
# scheme and old-tile seg r96 rows lost every group of that A/B and left; the old seg BN 8 stays (1B q|k|v, 1B o).
# The rt pair r96 row (10 programs per SM) never won a sweep and left in the restructure (NOTES_kernels.md).
_LOP3, _PAIR = Nibbles.LOP3, Nibbles.PAIR
_M1_PC = (M1Row(8, 1024, 4, 3, True, _LOP3), M1Row(16, 512, 2, 3, True, _LOP3), M1Row(16, 1024, 4, 3, True, _LOP3),
          M1Row(32, 256, 2, 0, False, _LOP3),
          M1Row(8, 1024, 4, 3, True, _PAIR), M1Row(16, 512, 2, 3, True, _PAIR), M1Row(16, 1024, 4, 3, True, _PAIR))
_M1_G = (M1Row(8, 512, 2, 3, True, _LOP3, seg=True), M1Row(64, 128, 2, 0, False, _LOP3),
         M1Row(16, 512, 2, 3, True, _LOP3, seg=True, rt=True), M1Row(16, 512, 2, 3, True, _PAIR, seg=True, rt=True),
         M1Row(32, 512, 2, 3, True, _PAIR, seg=True, rt=True), M1Row(16, 1024, 4, 3, True, _PAIR, seg=True, rt=True))


def _m1_load_candidates(k, ns, group_size, sms, cls):
    """W4-only M = 1 FMA candidates for members of widths ``ns`` (one: a single linear), split-K factors from
    ``gemv_splits`` over all members' N tiles. Grouped scales: ``seg`` blocks where the group divides a block of
    2+ whole groups, else blocks of one group (``BLOCK_K = min(128, group)``, the register path's shape)."""
    pc = group_size >= k
    out = []
    for row in _M1_PC if pc else _M1_G:
        bn, bk = row.block_n, row.block_k
        if not pc:
            if row.seg:
                if not (bk < k and bk % group_size == 0 and bk > group_size):
                    continue
            else:
                bk = min(bk, group_size)
        elif bk > max(k, 256):
            continue
        if bn * bk // 8 < 32 * row.warps:
            continue
        tiles = sum(cdiv(n, bn) for n in ns)
        for split in gemv_splits(tiles, k, bk, sms):
            out.append(cls(bn, bk, split, row.warps, seg=row.seg, stages=row.stages, xw=row.xw, lean=int(row.lean),
                           maxnreg=row.maxnreg, rt=row.rt))
    return out


def grouped_candidates(k, ns, group_size, sms=132, m=1):
    """Grouped decode configs the tuner times (M <= 16): M = 1 the FMA GEMV over all members' tiles;
    M 2..16 the tensor-core GEMV (split 1, see decode_candidates) and per-member launches."""
    pc = group_size >= k
    out = []
    if m == 1:
        out += _m1_load_candidates(k, ns, group_size, sms, GroupedConfig)
    else:
        tc_bks = [bk for bk in ((128, 256) if pc else (128,)) if valid_block_k(bk, k, group_size)]
        for (bn, bk, warps), bk2 in itertools.product(_GROUPED_TC, tc_bks[:1]):
            out.append(GroupedConfig(bn, bk2, 1, warps, tc=True))
        out.append(GroupedConfig(per_member=True))
    return list(dict.fromkeys(out))


def default_grouped_config(m, k, ns, group_size, sms=132):
    if m == 1:
        bk = block_k_choices(k, group_size, [128, 64, 32])[0]
        tiles = sum(cdiv(n, 32) for n in ns)
        return GroupedConfig(32, bk, gemv_splits(tiles, k, bk, sms)[0], 2, lean=2)
    return GroupedConfig(per_member=True)


