"""Decode attention over the engine's paged KV cache as custom ops, so torch.compile keeps each as one launch:
``spear::paged_decode_attention`` (over a cache already holding the new token) and
``spear::paged_decode_rope_attention`` (RoPE, the cache writes and the attention of a decode-only step). The kernels
(``kernels/paged_decode_attention.py``) run on CUDA bf16/fp16 or under the Triton interpreter; elsewhere the same
math in torch ops, which is also the engine's default decode attention."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import options
from ..errors import SpearError
from ..kernels.paged_decode_attention import paged_decode_attention_kernel, paged_decode_rope_attention_kernel
from .precompile import launcher


# Both ops read q / k / v through their strides (the kernels need only a unit inner stride, else the reference
# runs): Inductor may hand them the slices of a grouped q|k|v output as they are. Without the tag it copies each
# slice to the contiguous layout the graph was traced with (3 copy kernels per layer of a W4 decode step: session 32's
# profile, about 4 % of the step at 64 rows).
_ANY_STRIDES = (torch.Tag.flexible_layout,)


def gather_blocks(cache, tables, kv_heads: int, block_size: int, head_dim: int) -> torch.Tensor:
    """The cache rows of each table's blocks as dense K or V: ``[N, L]`` block ids -> ``[N, kv_heads, L * block_size,
    head_dim]`` (the sizes as ints: see ``reference_paged_decode_attention``)."""
    n, nb = tables.shape
    return cache[tables].reshape(n, nb * block_size, kv_heads, head_dim).transpose(1, 2)


def reference_paged_decode_attention(q, k_cache, v_cache, tables, ctx_lens, scale: float,
                                     kv_heads: Optional[int] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """q ``[B, H, D]``, one query per sequence at its last position; caches ``[blocks, block_size, kv_heads, D]``;
    tables ``[B, W]`` block ids; ctx_lens ``[B]`` tokens in the cache. Returns ``[B, H, D]``. Under torch.compile
    pass ``kv_heads`` and ``block_size`` as ints: the cache buffers' sizes may be symbolic there, and a symbolic
    head size would reach the linears after attention."""
    b, h, d = q.shape
    kv_heads = kv_heads or k_cache.shape[2]
    block_size = block_size or k_cache.shape[1]
    group = h // kv_heads
    k = gather_blocks(k_cache, tables, kv_heads, block_size, d)         # [B, Hkv, S, D]
    v = gather_blocks(v_cache, tables, kv_heads, block_size, d)
    qg = q.view(b, kv_heads, group, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale        # [B, Hkv, G, S]
    keep = torch.arange(k.shape[2], device=q.device)[None, :] < ctx_lens[:, None]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, d)


def kernel_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The Triton kernel's case: CUDA bf16/fp16 (or the interpreter), a power-of-two head dim, unit inner strides."""
    d = q.shape[-1]
    on_device = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    return ((on_device or options.interpret()) and d >= 16 and d & (d - 1) == 0 and q.stride(-1) == 1
            and k_cache.is_contiguous())


def check_inputs(q, k_cache, v_cache, tables, ctx_lens) -> None:
    where = "spear_compile.lowering.attention.paged_decode_attention"
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise SpearError(f"{where}: q must be [B, H, D] and the caches [blocks, block_size, kv_heads, D] of one shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    b, h, d = q.shape
    if k_cache.shape[-1] != d or h % k_cache.shape[2]:
        raise SpearError(f"{where}: q {tuple(q.shape)} does not fit caches of {k_cache.shape[2]} KV heads x {k_cache.shape[-1]}")
    if tables.dim() != 2 or tables.shape[0] != b or ctx_lens.shape != (b,):
        raise SpearError(f"{where}: tables must be [B={b}, W] and ctx_lens [B={b}]; got {tuple(tables.shape)}, "
                         f"{tuple(ctx_lens.shape)}")


# Both ops are registered on a Library fragment (as ``fused_linear``'s are), not with ``torch.library.custom_op``, whose
# Python autograd, redispatch and aliasing-check layers every eager call pays (a mixed step's first run and its
# capture: one call a layer; ``bench/results/attention_op_host_time_cpu_s37.md``). Inference ops: no autograd kernel.
_LIB = torch.library.Library("spear", "FRAGMENT")   # kept alive with the module: dropping it unregisters the ops


def _paged_decode_attention(q, k_cache, v_cache, tables, ctx_lens, scale):
    check_inputs(q, k_cache, v_cache, tables, ctx_lens)
    if not kernel_ok(q, k_cache):
        return reference_paged_decode_attention(q, k_cache, v_cache, tables, ctx_lens, scale)
    b, h, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = h // kv_heads
    out = torch.empty_like(q)
    launcher(paged_decode_attention_kernel, (b, kv_heads))(
        q, k_cache, v_cache, tables, ctx_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=64 if d <= 64 else 32, INTERPRET=options.interpret(), num_warps=4,
    )
    return out


_LIB.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor ctx_lens, "
            "float scale) -> Tensor", tags=_ANY_STRIDES)
_LIB.impl("paged_decode_attention", _paged_decode_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("spear::paged_decode_attention", lib=_LIB)
def _(q, k_cache, v_cache, tables, ctx_lens, scale):
    return torch.empty_like(q)


paged_decode_attention = torch.ops.spear.paged_decode_attention.default


def rope(x, cos, sin):
    """HF's rotate-half RoPE: x ``[T, H, D]``, cos/sin ``[T, D]`` (the op order of ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def reference_paged_decode_rope_attention(q, k, v, k_cache, v_cache, cos, sin, slot_block, slot_off, tables, ctx_lens,
                                          scale: float, kv_heads: Optional[int] = None,
                                          block_size: Optional[int] = None) -> torch.Tensor:
    """RoPE on ``q [B, H, D]`` and ``k [B, kv_heads, D]``, ``k`` and ``v`` written to the caches at
    ``(slot_block, slot_off)``, then ``reference_paged_decode_attention`` (ctx_lens include the new token)."""
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k_cache.index_put_((slot_block, slot_off), k)
    v_cache.index_put_((slot_block, slot_off), v)
    return reference_paged_decode_attention(q, k_cache, v_cache, tables, ctx_lens, scale, kv_heads, block_size)


def _paged_decode_rope_attention(q, k, v, k_cache, v_cache, cos, sin, slot_block, slot_off, tables, ctx_lens, scale):
    check_inputs(q, k_cache, v_cache, tables, ctx_lens)
    b, h, d = q.shape
    kv_heads = k_cache.shape[2]
    if k.shape != (b, kv_heads, d) or v.shape != k.shape or cos.shape != (b, d) or sin.shape != (b, d):
        raise SpearError(f"spear_compile.lowering.attention.paged_decode_rope_attention: k and v must be "
                         f"[{b}, {kv_heads}, {d}] and cos/sin [{b}, {d}]; got k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cos {tuple(cos.shape)}")
    half = d // 2
    if not (kernel_ok(q, k_cache) and half >= 16 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous()):
        return reference_paged_decode_rope_attention(q, k, v, k_cache, v_cache, cos, sin, slot_block, slot_off, tables,
                                                     ctx_lens, scale)
    group = h // kv_heads
    out = torch.empty_like(q)
    launcher(paged_decode_rope_attention_kernel, (b, kv_heads))(
        q, k, v, k_cache, v_cache, cos, sin, slot_block, slot_off, tables, ctx_lens, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1), scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=64 if d <= 64 else 32, INTERPRET=options.interpret(), num_warps=4,
    )
    return out


_LIB.define("paged_decode_rope_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor cos, Tensor sin, Tensor slot_block, Tensor slot_off, Tensor tables, Tensor ctx_lens, float scale) "
            "-> Tensor", tags=_ANY_STRIDES)
_LIB.impl("paged_decode_rope_attention", _paged_decode_rope_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("spear::paged_decode_rope_attention", lib=_LIB)
def _(q, k, v, k_cache, v_cache, cos, sin, slot_block, slot_off, tables, ctx_lens, scale):
    return torch.empty_like(q)


paged_decode_rope_attention = torch.ops.spear.paged_decode_rope_attention.default
