"""Decode kernel (M <= 16, memory-bound): W4 GEMV on int32 words, EC fused in the same launch.

The packed weights ``[N, K/2]`` uint8 are read as ``[N, K/8]`` int32 words (8 nibbles; nibble i of
word j is k = 8j + i). A program owns ``BLOCK_N`` rows and one of ``SPLIT_K`` K ranges, and streams
its range with the next block's words loaded before the current block is used (register double
buffer: one DRAM latency per program, not one per K block).

M = 1 (FMA path): ``sum_k q_k x_k`` by 8 nibble planes against 8 strided views of x, scale per
block (grouped) or once at the end (per-channel); the zero point is one term per row,
``zero * scale * sum(x)``, so the inner loop has no subtraction. Load-path knobs (session 5, M = 1 FMA):
``STAGES`` (the K loop pipelined by Triton: words by cp.async into shared memory), ``XW`` (x as int32 pairs,
pipelined too and read back in the words' layout), ``LEAN`` (nibbles as ``128 + q``, one lop3 each, the 128
folded into the zero term), ``KW_DIV`` (row alignment known to Triton: 16-byte word loads), ``TMA``. Grouped scales with K blocks of
several whole groups (``GPB`` > 0, ``_w_tile_seg``): 3-D word tiles, one ``[BLOCK_N, GPB]`` scale tile.
M 2..16 (tensor cores): per nibble plane ``tl.dot(x_i, (q_i - zero)ᵀ)`` ((q - zero) is exact in
bf16/fp16), scaled per block.

``USE_SPLIT`` (``SPLIT_K > 1``): partials go to an fp32 workspace by atomics, and the last split to arrive at an N
tile (per-tile counter) finishes it. EC (``HAS_EC``): the first ``NUM_U_TILES`` dynamic tile ids
(taken from an atomic counter, so their programs already run: no deadlock, any scheduling order)
compute ``u = A x`` partials; each tile's finishing program waits for them only in its epilogue
(gate, ``u Bᵀ``, add). The last finishing program resets the counters and ``u``, so every call and
every CUDA-graph replay starts clean with no memset launch (``EC_MODE`` 0, "spin"). ``U_READY``: ``u`` is given
(the tensor-parallel hook: u partials all-reduced across GPUs before this launch). ``EC_MODE`` 1 ("epoch", the
tuner's usual pick) and 2 ("pdl"/"2k": ``ec_u_kernel`` runs first) publish the gated u once as epoch-tagged words
that the finishing programs read beside their split-K partial sums; see ``ec_tiles`` and
bench/results/decode_ec.md.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ec_tiles import (_ec_apply, _ec_epilogue, _ec_operands, _gate_operands, _gu_check_epoch, _gu_slots, _gu_value,
                       _gu_words, _load_b, _slot_words, _u_tile, _u_tile_slot, _wait_for_u, _ec_split_program,
                       _ec_term, _ec_term_words)
from .tl_helpers import dot, half_bits as _half

MAGIC_I = tl.constexpr(0x4B000000) # bits of the float 2^23; 0x4B00000q is 2^23 + q
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _nibble(q, i: tl.constexpr):
    """Nibble ``i`` of every int32 word as an exact fp32 (no I2F: OR into 2^23's mantissa)."""
    return (((q >> (4 * i)) & 0xF) | MAGIC_I).to(tl.float32, bitcast=True) - MAGIC_F


@triton.jit
def _nib128(q, i: tl.constexpr, ASM: tl.constexpr):
    """``128 + nibble i`` of every int32 word as an exact fp32 (``LEAN``): the nibble moved to mantissa bits 16..19
    (one shift; none for nibble 4) under the exponent of 2^7. The 128 comes off with the zero point
    (``(zero + 128) * scale * sum(x)`` per row), so the inner loop has no subtraction (``_nibble`` needs one).
    ``ASM``: the and-or as one inline ``lop3`` (written as and + or, ptxas emits two LOP3: a LOP3 takes one
    immediate; SASS 40 -> 32 instructions per word, bench/results/load_path.md); the interpreter runs the plain ops."""
    if i < 4:
        t = q << (16 - 4 * i)
    elif i == 4:
        t = q
    else:
        t = q >> (4 * i - 16)
    if ASM:
        v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 983040, 1124073472, 0xEA;", "=r,r",  # (a & 0xF0000) | 0x43000000
                                      [t], dtype=tl.int32, is_pure=True, pack=1)
    else:
        v = (t & 0x000F0000) | 0x43000000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nib_pair(q, i: tl.constexpr, ASM: tl.constexpr):
    """Nibble ``i`` of every int32 word as an exact fp32, one shift per nibble *pair* (``LEAN`` 3/4): the word shifted
    so that nibble ``2p`` sits at mantissa bits 15..18 and ``2p + 1`` at 19..22 (the same shift for both, so the
    compiler computes it once per byte: 4 shifts a word instead of 7), then one and-or each under the exponent of
    2^8 (even: ``256 + q``) or 2^4 (odd: ``16 + q``). Exact; the offsets come off with the zero point as
    ``(zero + 16) * sum(x) + 240 * sum(x_even)`` by each body's zero term. ``ASM``: one inline ``lop3`` each."""
    SH: tl.constexpr = 15 - 8 * (i // 2)
    if SH > 0:
        t = q << SH
    else:
        t = q >> (-SH)  # arithmetic shift: the bits above the nibble are masked off
    if i % 2 == 0:
        if ASM:  # (a & 0x78000) | 0x43800000
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 491520, 1132462080, 0xEA;", "=r,r",
                                          [t], dtype=tl.int32, is_pure=True, pack=1)
        else:
            v = (t & 0x00078000) | 0x43800000
    else:
        if ASM:  # (a & 0x780000) | 0x41800000
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 7864320, 1098907648, 0xEA;", "=r,r",
                                          [t], dtype=tl.int32, is_pure=True, pack=1)
        else:
            v = (t & 0x00780000) | 0x41800000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nib(q, i: tl.constexpr, LEAN: tl.constexpr):
    """Nibble ``i`` as fp32: ``q`` (``LEAN`` 0), ``128 + q`` by plain ops (1) or by one lop3 (2, GPU only), pairs
    ``256 + q`` / ``16 + q`` by one lop3 (3, GPU only) or plain ops (4) (``_nib_pair``). ``LEAN`` may carry the
    seg tile flag (+8, ``_w_tile_seg``): only its low three bits pick the scheme."""
    NIB: tl.constexpr = LEAN % 8
    if NIB >= 3:
        return _nib_pair(q, i, NIB == 3)
    elif NIB:
        return _nib128(q, i, NIB == 2)
    else:
        return _nibble(q, i)


@triton.jit
def _load_sz(s_ptr, z_ptr, offs_n, n_mask, kb, kb_hi, n_groups, group_size, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_N, 1]`` scale and zero of K block ``kb`` (one group per block; zeros past ``kb_hi``)."""
    live = n_mask & (offs_n * 0 + kb < kb_hi)
    g = (kb * BLOCK_K) // group_size
    s = tl.load(s_ptr + offs_n * n_groups + g, mask=live, other=0.0).to(tl.float32)[:, None]
    z = tl.load(z_ptr + offs_n * n_groups + g, mask=live, other=0.0).to(tl.float32)[:, None]
    return s, z


@triton.jit
def _load_block(q_rows, s_ptr, z_ptr, offs_n, n_mask, offs_j, kb, kb_hi, K8, n_groups, group_size,
                BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr):
    """The words of K block ``kb`` (nothing past ``kb_hi``) and its scale/zero: none per-channel, one per
    row when the block sits in one group, one per (row, word) when it spans groups (``WIDE``)."""
    j = kb * (BLOCK_K // 8) + offs_j
    jm = (j < K8) & (offs_j * 0 + kb < kb_hi)
    q = tl.load(q_rows + j[None, :], mask=n_mask[:, None] & jm[None, :], other=0)
    if PER_CHANNEL:
        s = tl.zeros((1, 1), dtype=tl.float32)
        z = s
    elif WIDE:
        idx = offs_n[:, None] * n_groups + (8 * j // group_size)[None, :]
        sm = n_mask[:, None] & jm[None, :]
        s = tl.load(s_ptr + idx, mask=sm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + idx, mask=sm, other=0.0).to(tl.float32)
    else:
        live = n_mask & (offs_n * 0 + kb < kb_hi)
        g = (kb * BLOCK_K) // group_size
        s = tl.load(s_ptr + offs_n * n_groups + g, mask=live, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + offs_n * n_groups + g, mask=live, other=0.0).to(tl.float32)[:, None]
    return q, s, z


@triton.jit
def _w_tile(x_ptr, q_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, K, group_size, n_groups, stride_xm,
            SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr,
            WIDE: tl.constexpr, TC: tl.constexpr, X_BF16: tl.constexpr, INTERPRET: tl.constexpr,
            STAGES: tl.constexpr, LEAN: tl.constexpr, XW: tl.constexpr, KW_DIV: tl.constexpr, TMA: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_N]`` partial of ``x Wᵀ`` over the ``pid_k``-th of ``SPLIT_K`` K ranges for the
    rows ``offs_n`` of one W4 matrix (``q_ptr``: its int32 words): the body every W program of both GEMV
    kernels (one linear, grouped linears) runs. ``STAGES > 0`` (M = 1 FMA, one group per block or
    per-channel): the words stream through a ``STAGES``-deep cp.async pipeline (``_w_tile_piped``), else a
    register double buffer. ``LEAN``: nibbles as ``128 + q`` (``_nib128``, FMA path)."""
    if STAGES > 0 and not TC and not WIDE:
        acc = _w_tile_piped(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                            BLOCK_N, BLOCK_K, PER_CHANNEL, STAGES, LEAN, X_BF16, XW, KW_DIV, TMA)
    else:
        acc = _w_tile_reg(x_ptr, q_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, K, group_size, n_groups,
                          stride_xm, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, PER_CHANNEL, WIDE, TC, X_BF16, INTERPRET, LEAN,
                          KW_DIV)
    return acc


@triton.jit
def _x_pair(xw, HIGH: tl.constexpr, X_BF16: tl.constexpr):
    """fp32 of the low/high 16-bit half of int32 ``xw`` (two consecutive bf16/fp16 x values)."""
    if X_BF16:
        if HIGH:
            v = (xw & -65536).to(tl.float32, bitcast=True)
        else:
            v = (xw << 16).to(tl.float32, bitcast=True)
    else:
        v = _half(xw, HIGH, tl.float16).to(tl.float32)
    return v


@triton.jit
def _words_fma_xw(q, xw_ptr, jw, jm, LEAN: tl.constexpr, PAIR: tl.constexpr, X_BF16: tl.constexpr):
    """The 8 nibble planes of the int32 words ``q`` (rows as the leading axis, then x's tile shape) against x read
    as int32 pairs at word indices ``jw`` (masked by ``jm``): ``(Σ_i nib_i · x_i, Σ x, Σ even-k x)`` per word, the last
    for nibble pairs (``PAIR``)."""
    d = tl.zeros(q.shape, dtype=tl.float32)
    xs = tl.zeros(jw.shape, dtype=tl.float32)
    xe = tl.zeros(jw.shape, dtype=tl.float32)
    for p in tl.static_range(4):
        xw = tl.load(xw_ptr + 4 * jw + p, mask=jm, other=0)
        x_lo = _x_pair(xw, False, X_BF16)
        x_hi = _x_pair(xw, True, X_BF16)
        d += _nib(q, 2 * p, LEAN) * tl.expand_dims(x_lo, 0)
        d += _nib(q, 2 * p + 1, LEAN) * tl.expand_dims(x_hi, 0)
        xs += x_lo + x_hi
        if PAIR:
            xe += x_lo
    return d, xs, xe


@triton.jit
def _words_fma_planes(q, x_ptr, k8, xm, LEAN: tl.constexpr, PAIR: tl.constexpr):
    """``_words_fma_xw`` with x read as 8 strided planes (``x[k8 + i]``, masked by ``xm``)."""
    d = tl.zeros(q.shape, dtype=tl.float32)
    xs = tl.zeros(k8.shape, dtype=tl.float32)
    xe = tl.zeros(k8.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        x_i = tl.load(x_ptr + k8 + i, mask=xm, other=0.0).to(tl.float32)
        d += _nib(q, i, LEAN) * tl.expand_dims(x_i, 0)
        xs += x_i
        if PAIR and i % 2 == 0:
            xe += x_i
    return d, xs, xe


@triton.jit
def _w_tile_piped(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr, STAGES: tl.constexpr,
                  LEAN: tl.constexpr, X_BF16: tl.constexpr, XW: tl.constexpr, KW_DIV: tl.constexpr,
                  TMA: tl.constexpr):
    """``_w_tile`` for M = 1 (FMA) with the K loop software-pipelined by Triton (``tl.range(num_stages=STAGES)``):
    each block's ``[BLOCK_N, BLOCK_K / 8]`` words are copied to shared memory by cp.async ``STAGES - 1`` blocks
    ahead (no registers held while in flight), while the 2-byte scale/zero (too narrow for cp.async) stay
    prefetched one block ahead in registers. ``XW``: x read as int32 pairs (4 bytes, so cp.async-pipelined too,
    and read back from shared memory straight into the words' layout: no per-plane layout conversion
    through shared memory with barriers, which 2-byte plane loads of a wide tile need). ``KW_DIV``: a power of two
    dividing ``K / 8`` (row starts that aligned: 16-byte word loads). ``TMA``: the word tiles by the tensor memory
    accelerator instead of cp.async (a device-made descriptor over this tile's valid rows: rows past N and words
    past K read as zeros; needs ``KW_DIV >= 4`` and a global-scratch allocator). Same math as ``_w_tile_reg``'s
    FMA path."""
    BKW: tl.constexpr = BLOCK_K // 8
    K8 = (K // (8 * KW_DIV)) * KW_DIV
    offs_j = tl.arange(0, BKW)
    n_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, n_kb)
    q_rows = q_ptr + offs_n[:, None] * K8
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    PAIR: tl.constexpr = LEAN % 8 >= 3  # nibble pairs (_nib_pair): offsets 256 (even) / 16 (odd)
    OFF: tl.constexpr = (16.0 if PAIR else 128.0) if LEAN % 8 else 0.0
    acc2 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    zacc2 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    xsum = tl.zeros((BKW,), dtype=tl.float32)
    xesum = tl.zeros((BKW,), dtype=tl.float32)
    if TMA:
        row0 = tl.min(offs_n, axis=0)
        desc = tl.make_tensor_descriptor(q_ptr, shape=[row0 + tl.sum(n_mask.to(tl.int32), axis=0), K8],
                                         strides=[K8, 1], block_shape=[BLOCK_N, BKW])
    if not PER_CHANNEL:
        s_nx, z_nx = _load_sz(s_ptr, z_ptr, offs_n, n_mask, kb_lo, kb_hi, n_groups, group_size, BLOCK_K)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        j = kb * BKW + offs_j
        jm = j < K8
        if TMA:
            q = desc.load([row0, kb * BKW])
        else:
            q = tl.load(q_rows + j[None, :], mask=n_mask[:, None] & jm[None, :], other=0)
        if XW:
            d, xs, xe = _words_fma_xw(q, xw_ptr, j, jm, LEAN, PAIR, X_BF16)
        else:
            d, xs, xe = _words_fma_planes(q, x_ptr, 8 * j, jm, LEAN, PAIR)  # 8 j: the first k of each word
        if PER_CHANNEL:
            acc2 += d
            xsum += xs
            if PAIR:
                xesum += xe
        else:
            s, z = s_nx, z_nx
            s_nx, z_nx = _load_sz(s_ptr, z_ptr, offs_n, n_mask, kb + 1, kb_hi, n_groups, group_size, BLOCK_K)
            acc2 += d * s
            if PAIR:
                zacc2 += s * ((z + OFF) * xs[None, :] + 240.0 * xe[None, :])
            else:
                zacc2 += (s * (z + OFF)) * xs[None, :]
    if PER_CHANNEL:
        s0 = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z0 = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if PAIR:
            acc = (s0 * (tl.sum(acc2, axis=1) - (z0 + OFF) * tl.sum(xsum, axis=0)
                         - 240.0 * tl.sum(xesum, axis=0)))[None, :]
        else:
            acc = (s0 * (tl.sum(acc2, axis=1) - (z0 + OFF) * tl.sum(xsum, axis=0)))[None, :]
    else:
        acc = tl.sum(acc2 - zacc2, axis=1)[None, :]
    return acc


@triton.jit
def _w_tile_reg(x_ptr, q_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, K, group_size, n_groups, stride_xm,
                SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr,
                WIDE: tl.constexpr, TC: tl.constexpr, X_BF16: tl.constexpr, INTERPRET: tl.constexpr,
                LEAN: tl.constexpr, KW_DIV: tl.constexpr):
    """``_w_tile`` with the register double buffer: the next K block's words loaded before the current one is used."""
    PAIR: tl.constexpr = LEAN % 8 >= 3  # nibble pairs (_nib_pair): offsets 256 (even) / 16 (odd)
    OFF: tl.constexpr = (16.0 if PAIR else 128.0) if LEAN % 8 else 0.0
    K8 = (K // (8 * KW_DIV)) * KW_DIV  # K / 8, its divisibility known (16-byte word loads)
    offs_j = tl.arange(0, BLOCK_K // 8)
    n_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, n_kb)
    q_rows = q_ptr + offs_n[:, None] * K8
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if TC:
        # (OFFSET + q) as bf16/fp16 straight from the bits, two nibbles per mask-or; tensor cores sum
        # Σ (OFFSET + q) x exactly in fp32; (OFFSET + zero)·Σx comes off per row below.
        if X_BF16:  # 0x43 0x0q: the bf16 128 + q; fp16: 0x64 0x0q is 1024 + q
            MAGIC16: tl.constexpr = 0x43004300
            OFFSET: tl.constexpr = 128.0
            X_DT: tl.constexpr = tl.bfloat16
        else:
            MAGIC16: tl.constexpr = 0x64006400
            OFFSET: tl.constexpr = 1024.0
            X_DT: tl.constexpr = tl.float16
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xtot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        zacc2 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        xesum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
    q_nx, s_nx, z_nx = _load_block(q_rows, s_ptr, z_ptr, offs_n, n_mask, offs_j, kb_lo, kb_hi, K8, n_groups,
                                   group_size, BLOCK_K, PER_CHANNEL, WIDE)
    for kb in range(kb_lo, kb_hi):
        q, s, z = q_nx, s_nx, z_nx
        q_nx, s_nx, z_nx = _load_block(q_rows, s_ptr, z_ptr, offs_n, n_mask, offs_j, kb + 1, kb_hi, K8,
                                       n_groups, group_size, BLOCK_K, PER_CHANNEL, WIDE)
        k8 = kb * BLOCK_K + 8 * offs_j  # first k of each word
        if TC:
            xm = m_mask[:, None] & (k8 < K)[None, :]
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.float32)
            for i in tl.static_range(4):
                tw = ((q >> (4 * i)) & 0x000F000F) | MAGIC16  # nibbles i (low half) and i + 4 (high half)
                x_lo = tl.load(x_rows + (k8 + i)[None, :], mask=xm, other=0.0)
                x_hi = tl.load(x_rows + (k8 + i + 4)[None, :], mask=xm, other=0.0)
                part = dot(x_lo, tl.trans(_half(tw, False, X_DT)), part, INTERPRET)
                part = dot(x_hi, tl.trans(_half(tw, True, X_DT)), part, INTERPRET)
                xs += x_lo.to(tl.float32) + x_hi.to(tl.float32)
            xb = tl.sum(xs, axis=1)
            if PER_CHANNEL:
                acc += part
                xtot += xb
            else:
                sr = tl.reshape(s, (BLOCK_N,))
                zr = tl.reshape(z, (BLOCK_N,))
                acc += sr[None, :] * (part - (OFFSET + zr)[None, :] * xb[:, None])
        else:
            d, xs, xe = _words_fma_planes(q, x_ptr, k8, k8 < K, LEAN, PAIR)
            if PER_CHANNEL:
                acc2 += d
                xsum += xs
                if PAIR:
                    xesum += xe
            else:
                acc2 += d * s
                if PAIR:
                    zacc2 += s * ((z + OFF) * xs[None, :] + 240.0 * xe[None, :])
                else:
                    zacc2 += (s * (z + OFF)) * xs[None, :]
    if PER_CHANNEL:  # one (scale, zero) per row: both after the loop
        s0 = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z0 = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if TC:
            acc = s0[None, :] * (acc - (OFFSET + z0)[None, :] * xtot[:, None])
        elif PAIR:
            acc = (s0 * (tl.sum(acc2, axis=1) - (z0 + OFF) * tl.sum(xsum, axis=0)
                         - 240.0 * tl.sum(xesum, axis=0)))[None, :]
        else:
            acc = (s0 * (tl.sum(acc2, axis=1) - (z0 + OFF) * tl.sum(xsum, axis=0)))[None, :]
    elif not TC:
        acc = tl.sum(acc2 - zacc2, axis=1)[None, :]
    return acc


@triton.jit
def _w_tile_seg(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPB: tl.constexpr, STAGES: tl.constexpr,
                LEAN: tl.constexpr, X_BF16: tl.constexpr, XW: tl.constexpr, KW_DIV: tl.constexpr):
    """``_w_tile`` for M = 1 with K blocks of ``GPB`` whole groups (``BLOCK_K = GPB * group_size``): the words
    as a 3-D tile ``[BLOCK_N, GPB, words per group]`` (each row one contiguous ``BLOCK_K / 2`` bytes, as
    per-channel's long blocks) and the scales/zeros as one ``[BLOCK_N, GPB]`` tile per block, applied per
    group by broadcast: no per-word scale gather (``WIDE``) and no register reshape. ``STAGES > 0``: the
    words through a cp.async pipeline of that depth (as ``_w_tile_piped``), else a register double buffer;
    the scale/zero tile is prefetched one block ahead in registers either way. ``LEAN >= 8`` (the seg tile flag,
    ``GroupedConfig.rt``): the rows-inner tile of ``_w_tile_seg_t`` (x unpacked once for several rows)."""
    if LEAN >= 8:
        return _w_tile_seg_t(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                             BLOCK_N, BLOCK_K, GPB, STAGES, LEAN % 8, X_BF16, XW, KW_DIV)
    WPG: tl.constexpr = BLOCK_K // 8 // GPB  # int32 words per group
    PAIR: tl.constexpr = LEAN % 8 >= 3  # nibble pairs (_nib_pair): offsets 256 (even) / 16 (odd)
    OFF: tl.constexpr = (16.0 if PAIR else 128.0) if LEAN % 8 else 0.0
    K8 = (K // (8 * KW_DIV)) * KW_DIV
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    offs_g = tl.arange(0, GPB)
    offs_w = tl.arange(0, WPG)
    word = offs_g[:, None] * WPG + offs_w[None, :]  # [GPB, WPG]: word index inside the block
    n_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, n_kb)
    q_rows = q_ptr + offs_n[:, None, None] * K8
    sz_rows = offs_n[:, None] * n_groups
    acc3 = tl.zeros((BLOCK_N, GPB, WPG), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_N, GPB), dtype=tl.float32)
    # scale/zero of block kb_lo (and, without STAGES, its words: the register double buffer of _w_tile_reg)
    gm = n_mask[:, None] & (((offs_g * 0 + kb_lo) < kb_hi) & (kb_lo * GPB + offs_g < n_groups))[None, :]
    s_nx = tl.load(s_ptr + sz_rows + (kb_lo * GPB + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
    z_nx = tl.load(z_ptr + sz_rows + (kb_lo * GPB + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
    if STAGES == 0:
        j = kb_lo * (BLOCK_K // 8) + word
        jm = (j < K8) & (word * 0 + kb_lo < kb_hi)
        q_nx = tl.load(q_rows + j[None, :, :], mask=n_mask[:, None, None] & jm[None, :, :], other=0)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES if STAGES > 0 else None):
        if STAGES == 0:
            q = q_nx
            j = (kb + 1) * (BLOCK_K // 8) + word
            jm = (j < K8) & (word * 0 + kb + 1 < kb_hi)
            q_nx = tl.load(q_rows + j[None, :, :], mask=n_mask[:, None, None] & jm[None, :, :], other=0)
        else:
            j = kb * (BLOCK_K // 8) + word
            q = tl.load(q_rows + j[None, :, :], mask=n_mask[:, None, None] & (j < K8)[None, :, :], other=0)
        s, z = s_nx, z_nx
        gm = n_mask[:, None] & (((offs_g * 0 + kb + 1) < kb_hi) & ((kb + 1) * GPB + offs_g < n_groups))[None, :]
        s_nx = tl.load(s_ptr + sz_rows + ((kb + 1) * GPB + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
        z_nx = tl.load(z_ptr + sz_rows + ((kb + 1) * GPB + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
        jx = kb * (BLOCK_K // 8) + word  # [GPB, WPG]: word index in the row
        # the same math as _words_fma_xw / _words_fma_planes on the 3-D tile, written out: through those helpers the
        # seg tile compiles to a different instruction schedule (same count; not re-timed), so it keeps its own copy
        d = tl.zeros((BLOCK_N, GPB, WPG), dtype=tl.float32)
        xs = tl.zeros((GPB, WPG), dtype=tl.float32)
        xe = tl.zeros((GPB, WPG), dtype=tl.float32)  # sum of the even-k x (PAIR)
        if XW:  # x as int32 pairs, as _w_tile_piped
            for p in tl.static_range(4):
                xw = tl.load(xw_ptr + 4 * jx + p, mask=jx < K8, other=0)
                x_lo = _x_pair(xw, False, X_BF16)
                x_hi = _x_pair(xw, True, X_BF16)
                d += _nib(q, 2 * p, LEAN) * x_lo[None, :, :]
                d += _nib(q, 2 * p + 1, LEAN) * x_hi[None, :, :]
                xs += x_lo + x_hi
                if PAIR:
                    xe += x_lo
        else:
            for i in tl.static_range(8):
                x_i = tl.load(x_ptr + 8 * jx + i, mask=jx < K8, other=0.0).to(tl.float32)
                d += _nib(q, i, LEAN) * x_i[None, :, :]
                xs += x_i
                if PAIR and i % 2 == 0:
                    xe += x_i
        acc3 += d * s[:, :, None]
        if PAIR:
            zacc += s * ((z + OFF) * tl.sum(xs, axis=1)[None, :] + 240.0 * tl.sum(xe, axis=1)[None, :])
        else:
            zacc += (s * (z + OFF)) * tl.sum(xs, axis=1)[None, :]
    return (tl.sum(tl.sum(acc3, axis=2), axis=1) - tl.sum(zacc, axis=1))[None, :]


@triton.jit
def _w_tile_seg_t(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPB: tl.constexpr, STAGES: tl.constexpr,
                  LEAN: tl.constexpr, X_BF16: tl.constexpr, XW: tl.constexpr, KW_DIV: tl.constexpr):
    """``_w_tile_seg`` with the rows innermost: words as ``[GPB, words per group, BLOCK_N]``. Triton orders a tile's
    threads by its pointers' contiguity, ties in dimension order, so the ``[BLOCK_N, GPB, WPG]`` tile put the
    rows (dim 0) before the groups: every thread held one row and unpacked its own copy of x for each of its
    words (8 of ~42 SASS instructions a word). Here the threads run over the words then the groups (the K block,
    each thread 16 contiguous bytes), the rows are the thread's repeats: the x pairs of a word are unpacked once for
    ``BLOCK_N / (threads left over * warps)`` rows. Same math and bytes as ``_w_tile_seg``."""
    WPG: tl.constexpr = BLOCK_K // 8 // GPB  # int32 words per group
    PAIR: tl.constexpr = LEAN % 8 >= 3
    OFF: tl.constexpr = (16.0 if PAIR else 128.0) if LEAN % 8 else 0.0
    K8 = (K // (8 * KW_DIV)) * KW_DIV
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    offs_g = tl.arange(0, GPB)
    offs_w = tl.arange(0, WPG)
    word = offs_g[:, None] * WPG + offs_w[None, :]  # [GPB, WPG]: word index inside the block
    n_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, n_kb)
    q_rows = q_ptr + offs_n[None, None, :] * K8
    sz_cols = offs_n[None, :] * n_groups  # [1, BLOCK_N]
    acc3 = tl.zeros((GPB, WPG, BLOCK_N), dtype=tl.float32)
    gm = n_mask[None, :] & (((offs_g * 0 + kb_lo) < kb_hi) & (kb_lo * GPB + offs_g < n_groups))[:, None]
    s_nx = tl.load(s_ptr + sz_cols + (kb_lo * GPB + offs_g)[:, None], mask=gm, other=0.0).to(tl.float32)
    z_nx = tl.load(z_ptr + sz_cols + (kb_lo * GPB + offs_g)[:, None], mask=gm, other=0.0).to(tl.float32)
    if STAGES == 0:
        j = kb_lo * (BLOCK_K // 8) + word
        jm = (j < K8) & (word * 0 + kb_lo < kb_hi)
        q_nx = tl.load(q_rows + j[:, :, None], mask=jm[:, :, None] & n_mask[None, None, :], other=0)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES if STAGES > 0 else None):
        if STAGES == 0:
            q = q_nx
            j = (kb + 1) * (BLOCK_K // 8) + word
            jm = (j < K8) & (word * 0 + kb + 1 < kb_hi)
            q_nx = tl.load(q_rows + j[:, :, None], mask=jm[:, :, None] & n_mask[None, None, :], other=0)
        else:
            j = kb * (BLOCK_K // 8) + word
            q = tl.load(q_rows + j[:, :, None], mask=(j < K8)[:, :, None] & n_mask[None, None, :], other=0)
        s, z = s_nx, z_nx
        gm = n_mask[None, :] & (((offs_g * 0 + kb + 1) < kb_hi) & ((kb + 1) * GPB + offs_g < n_groups))[:, None]
        s_nx = tl.load(s_ptr + sz_cols + ((kb + 1) * GPB + offs_g)[:, None], mask=gm, other=0.0).to(tl.float32)
        z_nx = tl.load(z_ptr + sz_cols + ((kb + 1) * GPB + offs_g)[:, None], mask=gm, other=0.0).to(tl.float32)
        jx = kb * (BLOCK_K // 8) + word  # [GPB, WPG]: word index in the row
        d = tl.zeros((GPB, WPG, BLOCK_N), dtype=tl.float32)
        xe = tl.zeros((GPB, WPG), dtype=tl.float32)  # sums of the even-k and the odd-k x of each word
        xd = tl.zeros((GPB, WPG), dtype=tl.float32)
        if XW:
            for p in tl.static_range(4):
                xw = tl.load(xw_ptr + 4 * jx + p, mask=jx < K8, other=0)
                x_lo = _x_pair(xw, False, X_BF16)
                x_hi = _x_pair(xw, True, X_BF16)
                d += _nib(q, 2 * p, LEAN) * x_lo[:, :, None]
                d += _nib(q, 2 * p + 1, LEAN) * x_hi[:, :, None]
                xe += x_lo
                xd += x_hi
        else:
            for i in tl.static_range(8):
                x_i = tl.load(x_ptr + 8 * jx + i, mask=jx < K8, other=0.0).to(tl.float32)
                d += _nib(q, i, LEAN) * x_i[:, :, None]
                if i % 2 == 0:
                    xe += x_i
                else:
                    xd += x_i
        # the zero point and the nibble offsets off each word's partial sum (per column: amortized over the rows), no
        # per-block reduction of the x sums (a [GPB, WPG] tile's own layout spans both warps: barriers each block)
        xs = xe + xd
        if PAIR:
            xo = 256.0 * xe + 16.0 * xd
        else:
            xo = OFF * xs
        d = d - xo[:, :, None] - z[:, None, :] * xs[:, :, None]
        acc3 += d * s[:, None, :]
    return tl.sum(tl.sum(acc3, axis=1), axis=0)[None, :]


@triton.jit
def w4_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    a_ptr, b_ptr, gw_ptr, gb_ptr, u_ptr,
    acc_ptr, arrive_ptr, sync_ptr, gu_ptr, phase_ptr,
    M, N, K, R, group_size, n_groups, stride_xm, stride_ym, NUM_U_TILES, N_TILES, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr,
    PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr, TC: tl.constexpr, X_BF16: tl.constexpr,
    BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EC: tl.constexpr, GATED: tl.constexpr, U_READY: tl.constexpr,
    DYNAMIC_IDS: tl.constexpr, INTERPRET: tl.constexpr = False, GPB: tl.constexpr = 0,
    EC_MODE: tl.constexpr = 0, B_EARLY: tl.constexpr = True, GDC: tl.constexpr = False,
    STAGES: tl.constexpr = 0, LEAN: tl.constexpr = 0, XW: tl.constexpr = False, KW_DIV: tl.constexpr = 1,
    TMA: tl.constexpr = False, U_SUB: tl.constexpr = 1, BLOCK_U: tl.constexpr = 1, MAX_SPINS: tl.constexpr = 1 << 20,
):
    """``EC_MODE`` (with ``HAS_EC``): 0 "spin" (u tiles, spin on their counter, last finisher resets; or
    ``U_READY``), 1 "epoch" (u tiles, the last one publishes the gated u as tagged words: see
    ``ec_tiles``), 2 the gated u comes from ``ec_u_kernel`` launched just before (``GDC``: under
    programmatic dependent launch, waited for only in the epilogue). ``B_EARLY`` (modes 1, 2): the tile's B
    rows loaded at program start (else by the finishing program, beside the split-K partial sum). 3 "slots" (M = 1):
    each u tile (``U_SUB`` sub-blocks of ``BLOCK_KU``) stores its own tagged partial, the finishing program loads all
    ``NUM_U_TILES`` slots (``BLOCK_U`` >= that, a power of two) and the gate beside its partial sum, sums and gates
    (``ec_tiles``; phases: u tiles at ``phase_ptr[tile]``, N tiles at ``phase_ptr[NUM_U_TILES + n]``); 4 is free
    (session 6's "slotsw", the u partials in the first W programs, lost everywhere and was removed); 5 "ecsplit": slot
    u tiles, then ``N_TILES`` EC programs (one per N tile: slots, gate, ``gu Bᵀ`` into the split-K accumulator as one
    more arrival), then the W programs (always split-K, ``SPLIT_K + 1`` arrivals; the finisher does no EC work);
    6 "ecterm": the same EC programs publish their term as tagged words (``u_ptr`` is that int64 buffer here), the W
    finisher loads them beside its partial sum and adds them (phases: u tiles, EC programs, then W finishers)."""
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    IN_KERNEL_U: tl.constexpr = HAS_EC and not U_READY and EC_MODE != 2
    SPIN: tl.constexpr = IN_KERNEL_U and EC_MODE == 0
    W_EC: tl.constexpr = HAS_EC and EC_MODE < 5  # the W programs take part in the EC (modes 5, 6: EC programs do it)
    ECT: tl.constexpr = HAS_EC and EC_MODE == 6  # the W finisher adds the EC programs' published term
    EXTRA: tl.constexpr = 1 if HAS_EC and EC_MODE == 5 else 0  # split-K arrivals beyond the W splits
    if SPIN and DYNAMIC_IDS:
        tile = tl.atomic_add(sync_ptr, 1)  # dynamic tile id: u tiles are handed out first
    else:
        tile = tl.program_id(0)  # u tiles are the lowest ids (the launcher checks the grid is co-resident)

    if EC_MODE >= 5:  # "ecsplit"/"ecterm": u tiles, then one EC program per N tile, then the W programs
        u_hi = NUM_U_TILES + N_TILES
    else:
        u_hi = NUM_U_TILES
    if tile < u_hi:
        if EC_MODE >= 5:
            if tile < NUM_U_TILES:
                _u_tile_slot(x_ptr, a_ptr, gu_ptr, phase_ptr, tile, M, K, R, stride_xm, BLOCK_M, BLOCK_KU, U_SUB,
                             BLOCK_R, USE_DOT, INTERPRET)
            else:
                _ec_split_program(gu_ptr, phase_ptr, gw_ptr, gb_ptr, b_ptr, bias_ptr, y_ptr, acc_ptr, arrive_ptr,
                                  tile - NUM_U_TILES, M, N, R, NUM_U_TILES, SPLIT_K, stride_ym, BLOCK_M, BLOCK_N,
                                  BLOCK_U, BLOCK_R, GATED, HAS_BIAS, USE_DOT, INTERPRET, MAX_SPINS, EC_MODE == 6, u_ptr)
        elif EC_MODE == 3:
            _u_tile_slot(x_ptr, a_ptr, gu_ptr, phase_ptr, tile, M, K, R, stride_xm, BLOCK_M, BLOCK_KU, U_SUB, BLOCK_R,
                         USE_DOT, INTERPRET)
        else:
            _u_tile(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, phase_ptr, tile, NUM_U_TILES, M, K, R,
                    stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, GATED, USE_DOT, INTERPRET, EC_MODE)
    else:
        t = tile - u_hi
        pid_n = t // SPLIT_K
        pid_k = t % SPLIT_K
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        if W_EC:
            if EC_MODE == 0:
                bt, gw, gb = _ec_operands(b_ptr, gw_ptr, gb_ptr, offs_n, N, R, GATED, BLOCK_R)
            else:
                if B_EARLY:
                    bt = _load_b(b_ptr, offs_n, N, R, BLOCK_R)
        if GPB > 0:  # M = 1, grouped scales, K blocks of GPB whole groups
            acc = _w_tile_seg(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                              BLOCK_N, BLOCK_K, GPB, STAGES, LEAN, X_BF16, XW, KW_DIV)
        else:
            acc = _w_tile(x_ptr, q_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, K, group_size, n_groups,
                          stride_xm, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, PER_CHANNEL, WIDE, TC, X_BF16, INTERPRET,
                          STAGES, LEAN, XW, KW_DIV, TMA)

        if W_EC:
            if EC_MODE == 2:
                if GDC:  # the u kernel has long finished by now (normally): returns at once
                    tl.extra.cuda.gdc_wait()
        out_mask = m_mask[:, None] & n_mask[None, :]
        acc_ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
        if USE_SPLIT:
            tl.atomic_add(acc_ptrs, acc, mask=out_mask, sem="relaxed")
            tl.debug_barrier()
            arrived = tl.atomic_add(arrive_ptr + pid_n, 1)
        else:
            arrived = SPLIT_K - 1
        if arrived == SPLIT_K - 1 + EXTRA:
            if ECT:  # issued before the partial-sum read: one round trip
                ew, emask = _ec_term_words(u_ptr, offs_m, offs_n, M, N)
                e_w = tl.load(phase_ptr + NUM_U_TILES + N_TILES + pid_n) + 1
            if W_EC:
                if EC_MODE != 0:  # the words, B and the partial sum issued together: one round trip
                    if EC_MODE >= 3:  # every u tile's slot, this tile's expected epoch and the gate
                        words, wmask = _slot_words(gu_ptr, offs_m, M, R, NUM_U_TILES, BLOCK_U, BLOCK_R)
                        e_exp = tl.load(phase_ptr + NUM_U_TILES + pid_n) + 1
                        gw, gb = _gate_operands(gw_ptr, gb_ptr, R, GATED, BLOCK_R)
                    else:
                        words, wmask = _gu_words(gu_ptr, offs_m, M, R, BLOCK_R)
                    if EC_MODE == 1:  # the epoch this tile expects (only its own finisher writes its phase)
                        e_exp = tl.load(phase_ptr + 1 + pid_n) + 1
                    if not B_EARLY:
                        bt = _load_b(b_ptr, offs_n, N, R, BLOCK_R)
            if USE_SPLIT:
                acc = tl.load(acc_ptrs, mask=out_mask, other=0.0, volatile=True)  # coherent (L2) read
                tl.store(acc_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=out_mask)
                tl.store(arrive_ptr + pid_n, 0)
            if W_EC:
                if EC_MODE == 0:
                    if IN_KERNEL_U:
                        acc = _wait_for_u(acc, sync_ptr, NUM_U_TILES)
                    acc = _ec_epilogue(acc, u_ptr, bt, gw, gb, offs_m, M, R, GATED, BLOCK_R, USE_DOT)
                else:
                    if EC_MODE == 1:
                        gu = _gu_check_epoch(words, wmask, e_exp, gu_ptr, offs_m, M, R, BLOCK_R)
                        tl.store(phase_ptr + 1 + pid_n, e_exp)
                    elif EC_MODE >= 3:
                        gu = _gu_slots(words, wmask, e_exp, gu_ptr, offs_m, M, R, NUM_U_TILES, gw, gb, GATED, BLOCK_U,
                                       BLOCK_R, USE_DOT, MAX_SPINS)
                        tl.store(phase_ptr + NUM_U_TILES + pid_n, e_exp)
                    else:  # after the u kernel: the words are final
                        gu = tl.where(wmask, _gu_value(words), 0.0)
                    acc = _ec_apply(acc, gu, bt, USE_DOT, INTERPRET)
            if ECT:
                acc += _ec_term(ew, emask, e_w, u_ptr, offs_m, offs_n, M, N, MAX_SPINS)
                tl.store(phase_ptr + NUM_U_TILES + N_TILES + pid_n, e_w)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
            if SPIN:
                # Every W program has arrived before its tile finishes and every u tile before any finish,
                # so after the last tile's finish nobody reads u or the counters: leave them clean.
                tl.debug_barrier()
                finished = tl.atomic_add(sync_ptr + 2, 1)
                if finished == N_TILES - 1:
                    offs_r = tl.arange(0, BLOCK_R)
                    tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                             tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
                    tl.store(sync_ptr + 1, 0)
                    tl.store(sync_ptr + 2, 0)
                    tl.store(sync_ptr, 0)
