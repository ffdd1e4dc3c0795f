"""Decode attention over a paged KV cache in one kernel: one program per (sequence, KV head) walks the sequence's
block table, loads K and V straight from the cache blocks, and keeps an online softmax for the KV head's group of
query heads (GQA), padded to 16 rows so both products run on tensor cores.

The engine's default decode attention is four to six kernels per layer: it gathers K and V into dense tensors, then
runs two batched matmuls and a masked softmax. This kernel is the one-launch alternative. It exists because a
bf16 decode step measured 3x its weight-read roofline on an H200 (``bench/results/serving_throughput.md``), and it is
selected by ``EngineConfig(decode_attention="triton")``."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


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
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + offs_n
        valid = pos < ctx
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
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None])
