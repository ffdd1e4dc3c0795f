"""Dequantize kernels of the dequantize + cuBLAS path (``lowering.prefill.run_dequant_cublas``):
``w4_dequant_words_kernel`` writes the bf16/fp16 weight from int32 words at bandwidth (optionally ``[W | B]`` for the
K-concatenated EC, or ``W + B A`` for a static EC); ``w4_dequantize_kernel`` is the byte fallback (unaligned rows).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


@triton.jit
def w4_dequantize_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, group_size, n_groups,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``w[N, K] = (q - zero) * scale`` in the output dtype (the dequantize + cuBLAS path).
    ``BLOCK_K`` divides the group (or the group is K), so one (scale, zero) per row per block."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    n_mask = offs_n < N
    q = tl.load(q_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :],
                mask=n_mask[:, None] & (offs_j < K // 2)[None, :], other=0)
    q = tl.reshape(tl.join(q & 0xF, q >> 4), (BLOCK_N, BLOCK_K))
    g = (tl.program_id(1) * BLOCK_K) // group_size
    s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
    zc = tl.load(z_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32) + 8388608.0
    w = ((q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zc[:, None]) * s[:, None]
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])


@triton.jit
def _plane(words, i: tl.constexpr, zc, s):
    """Nibble ``i`` of every int32 word dequantized in fp32: bits 0x4B00000q are the float 2^23 + q, minus
    (2^23 + zero) is the exact q - zero (no I2F), times the scale."""
    return ((((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zc) * s


@triton.jit
def w4_dequant_words_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, b_ptr, a_ptr,
    N, K, K8, R, TW, group_size, n_groups, stride_wn, row0, tc0,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PER_WORD_SCALE: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_T: tl.constexpr, FOLD: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERPRET: tl.constexpr = False,
):
    """``w[n, k] = (q - zero) * scale`` in the output dtype, read as int32 words (8 nibbles; nibble i of word j
    is k = 8j + i), written as rows of ``8 * BLOCK_W`` contiguous values (16-byte stores).

    Scale/zero: one per row per tile when the tile sits in one group (per-channel: ``n_groups`` = 1), else one
    per (row, word) (``PER_WORD_SCALE``, groups of 16-64). ``TAIL``: the grid has one extra column of programs
    that writes ``B`` (``[N, R]``) into columns ``K + tc0 .. K + tc0 + R`` of ``w`` and zeros into the rest
    of columns ``K .. K + TW``: the ``[W | B]`` operand of the K-concatenated EC GEMM (``tc0 > 0``: sibling
    linears merged into one GEMM, each member's B in its own columns; R = 0: a member without EC, zeros). ``FOLD``: ``w += B A`` (static EC folded into the weight).
    ``K8`` = K / 8, an argument so that its divisibility by 16 (aligned rows: 16-byte word loads) is known.
    ``row0``: the rows are written from row ``row0`` of ``w`` on (grouped weights dequantized side by side)."""
    w_ptr += row0 * stride_wn
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if pid_k >= tl.cdiv(K8, BLOCK_W):  # only the TAIL column of programs gets here
        if TAIL:
            offs_t = tl.arange(0, BLOCK_T)
            offs_b = offs_t - tc0
            b = tl.load(b_ptr + offs_n[:, None] * R + offs_b[None, :],
                        mask=n_mask[:, None] & ((offs_b >= 0) & (offs_b < R))[None, :], other=0.0)
            tl.store(w_ptr + offs_n[:, None] * stride_wn + K + offs_t[None, :], b.to(w_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & (offs_t < TW)[None, :])
    else:
        offs_w = pid_k * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = n_mask[:, None] & (offs_w < K8)[None, :]
        words = tl.load(q_ptr + offs_n[:, None] * K8 + offs_w[None, :], mask=mask, other=0)
        if PER_WORD_SCALE:
            idx = offs_n[:, None] * n_groups + (offs_w * 8 // group_size)[None, :]
            s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32) + 8388608.0
        else:
            g = (pid_k * BLOCK_W * 8) // group_size
            s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            zc = tl.load(z_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)[:, None] + 8388608.0
        # nested joins put the 8 nibbles of a word next to each other in k order (flat index 4a + 2b + c)
        even = tl.join(tl.join(_plane(words, 0, zc, s), _plane(words, 4, zc, s)),
                       tl.join(_plane(words, 2, zc, s), _plane(words, 6, zc, s)))
        odd = tl.join(tl.join(_plane(words, 1, zc, s), _plane(words, 5, zc, s)),
                      tl.join(_plane(words, 3, zc, s), _plane(words, 7, zc, s)))
        w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_W * 8))
        offs_k = pid_k * (BLOCK_W * 8) + tl.arange(0, BLOCK_W * 8)
        if FOLD:
            offs_r = tl.arange(0, BLOCK_R)
            bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                         mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                         mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = dot(bt, at, w, INTERPRET)
        tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (offs_k < K)[None, :])
