"""Decode attention over a paged KV cache in one kernel: one program per (sequence, KV head) walks the sequence's
block table, loads K and V straight from the cache blocks, and keeps an online softmax for the KV head's group of
query heads (GQA), padded to 16 rows so both products run on tensor cores.

The engine's default decode attention is four to six kernels per layer: it gathers K and V into dense tensors, then
runs two batched matmuls and a masked softmax. RoPE and the two cache writes before it are three more. In a
decode-only step, ``paged_decode_rope_attention_kernel`` does all of it in one launch; a mixed step's decode rows
use ``paged_decode_attention_kernel`` over the cache its prefill path already wrote. It exists because a
bf16 decode step measured 3x its weight-read roofline on an H200 (``bench/results/serving_throughput.md``), and it is
selected by ``EngineConfig(decode_attention="triton")``."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


@triton.jit
def _scan_cache(q, k_cache, v_cache, tables, b, kvh, n_pos, stride_cb, stride_ct, stride_ch, stride_tb, scale,
                m_i, l_i, acc, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Online softmax of ``q [GROUP_PAD, HEAD_DIM]`` over cache positions ``0 .. n_pos - 1`` of sequence ``b``
    (KV head ``kvh``), continuing ``(m_i, l_i, acc)``."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n_pos, BLOCK_N):
        pos = start + offs_n
        valid = pos < n_pos
        block = tl.load(tables + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        k = tl.load(k_cache + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = dot(q, tl.trans(k), tl.zeros((GROUP_PAD, BLOCK_N), tl.float32), INTERPRET) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def paged_decode_attention_kernel(
    q_ptr, k_cache, v_cache, tables, ctx_lens, out_ptr,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``out[b, h] = softmax(q[b, h] · K[b]ᵀ · scale) V[b]`` over the first ``ctx_lens[b]`` positions, for the
    query heads ``h`` of KV head ``program_id(1)``. Cache ``[blocks, BLOCK_SIZE, kv_heads, HEAD_DIM]``; position
    ``p`` of sequence ``b`` is in block ``tables[b, p // BLOCK_SIZE]``, row ``p % BLOCK_SIZE``."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_lens + b)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _scan_cache(q, k_cache, v_cache, tables, b, kvh, ctx, stride_cb, stride_ct, stride_ch, stride_tb,
                                scale, m_i, l_i, acc, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, INTERPRET)
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None])


@triton.jit
def _rope_halves(x1, x2, cos1, cos2, sin1, sin2):
    """HF's rotate-half RoPE on the two halves of the last dim: ``x * cos + cat(-x2, x1) * sin``."""
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def paged_decode_rope_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache, v_cache, cos_ptr, sin_ptr, slot_block, slot_off, tables, ctx_lens, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb,
    stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """A whole decode step's attention for one (sequence, KV head): RoPE on the new token's query heads and key,
    the key and value written to the cache at ``(slot_block[b], slot_off[b])``, then attention over the
    ``ctx_lens[b] - 1`` earlier positions from the cache and the new token from registers (never read back: no
    barrier between the write and the reads). ``cos``/``sin``: ``[B, HEAD_DIM]`` rows at each token's position."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_lens + b)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    cos1 = tl.load(cos_ptr + b * stride_rb + offs_h).to(tl.float32)
    cos2 = tl.load(cos_ptr + b * stride_rb + HALF + offs_h).to(tl.float32)
    sin1 = tl.load(sin_ptr + b * stride_rb + offs_h).to(tl.float32)
    sin2 = tl.load(sin_ptr + b * stride_rb + HALF + offs_h).to(tl.float32)
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q1 = tl.load(q_rows + offs_h[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + offs_h[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q1, q2 = _rope_halves(q1, q2, cos1[None, :], cos2[None, :], sin1[None, :], sin2[None, :])
    k_row = k_ptr + b * stride_kb + kvh * stride_kh
    k1, k2 = _rope_halves(tl.load(k_row + offs_h).to(tl.float32), tl.load(k_row + HALF + offs_h).to(tl.float32),
                          cos1, cos2, sin1, sin2)
    dtype = k_cache.dtype.element_ty
    k1, k2 = k1.to(dtype), k2.to(dtype)                      # as the cache holds them
    v_new = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + offs_d)
    slot = tl.load(slot_block + b).to(tl.int64) * stride_cb + tl.load(slot_off + b) * stride_ct + kvh * stride_ch
    tl.store(k_cache + slot + offs_h, k1)
    tl.store(k_cache + slot + HALF + offs_h, k2)
    tl.store(v_cache + slot + offs_d, v_new.to(dtype))
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GROUP_PAD, HEAD_DIM)).to(dtype)   # [q1 | q2]
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _scan_cache(q, k_cache, v_cache, tables, b, kvh, ctx - 1, stride_cb, stride_ct, stride_ch,
                                stride_tb, scale, m_i, l_i, acc, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, BLOCK_N, INTERPRET)
    # the new token from registers: q · k_new (both as rounded to the cache dtype, as the cache scan sees them)
    s_new = (tl.sum(q1.to(dtype).to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
             + tl.sum(q2.to(dtype).to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scale
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    p_new = tl.exp(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(dtype).to(tl.float32)[None, :]
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None])
