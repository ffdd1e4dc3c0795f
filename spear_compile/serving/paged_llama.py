"""The paged-KV forward the serving engine compiles: ``PagedLlama`` over a Hugging Face Llama-family model's own
modules.

It runs the HF model's embedding, norms, rotary tables and linears (our quantized linears and their ECs, called as
modules, so the ``spear`` pass fuses them exactly as under ``optimize``) over a flattened token batch, gpt-fast style,
with per-layer KV caches ``[num_blocks, block_size, kv_heads, head_dim]`` written through a slot mapping (block,
offset) and read through block tables. Attention is PyTorch ops: decode rows gather their blocks and run a
grouped-query ``matmul``/``softmax``/``matmul``; prefill chunks gather theirs and run SDPA with a causal mask over
logical positions. ``model_runner.py`` compiles its entry points and captures the decode graphs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ec.module import CompensatedLinear
from ..errors import SpearError
from ..lowering.attention import (gather_blocks, paged_decode_attention, paged_decode_rope_attention,
                                 reference_paged_decode_attention, rope)


def has_ec(mod: nn.Module) -> bool:
    return isinstance(mod, CompensatedLinear) and getattr(mod, "rank", 0) > 0


def base_linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod``'s quantized (or plain) linear without its EC (row-parallel layers still all-reduce)."""
    return mod.base_forward(x) if isinstance(mod, CompensatedLinear) else mod(x)


def check_llama_like(model: nn.Module) -> None:
    base = getattr(model, "model", None)
    ok = base is not None and all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
        and hasattr(model, "lm_head")
    if ok:
        layer = base.layers[0]
        ok = all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
            all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if not ok:
        raise SpearError(f"serving engine: {type(model).__name__} is not a Llama-family causal LM "
                         "(needs model.embed_tokens, "
                         "layers with self_attn.q/k/v/o_proj and mlp.gate/up/down_proj, norm, rotary_emb, lm_head)")


def merge_siblings(*mods):
    """``(weight, bias, sizes)`` of plain ``nn.Linear`` siblings (same input) stacked into one, each module's weight
    (and bias) then a view of its rows, so no memory is added; None when any is quantized, has an EC or hooks, or
    they differ in dtype, device or bias."""
    first = mods[0]
    plain = all(type(m) is nn.Linear and type(m.weight) is nn.Parameter and not m._forward_hooks
                and not m._forward_pre_hooks for m in mods)
    if not plain or len({(m.weight.dtype, m.weight.device, m.in_features, m.bias is None) for m in mods}) != 1:
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods]) if first.bias is not None else None
        sizes, row = [], 0
        for m in mods:
            n = m.out_features
            m.weight.data = weight[row:row + n]
            if bias is not None:
                m.bias.data = bias[row:row + n]
            sizes.append(n)
            row += n
    # parameters: Dynamo keeps their shapes static (a plain tensor attribute would get symbolic sizes)
    return (nn.Parameter(weight, requires_grad=False),
            None if bias is None else nn.Parameter(bias, requires_grad=False), sizes)


class PagedLlama(nn.Module):
    """A paged-KV forward over an HF Llama-family model's modules (shared, not copied)."""

    def __init__(self, hf_model: nn.Module, num_blocks: int, block_size: int, max_model_len: int,
                 decode_attention: str = "torch"):
        super().__init__()
        self.decode_attention = decode_attention  # "torch" (gather + matmuls + softmax) | "triton" (one paged kernel)
        check_llama_like(hf_model)
        cfg = hf_model.config
        base = hf_model.model
        self.embed_tokens, self.layers, self.norm, self.lm_head = base.embed_tokens, base.layers, base.norm, \
            hf_model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        self.block_size = block_size
        w = self.embed_tokens.weight
        self.dtype, device = w.dtype, w.device
        with torch.no_grad():  # the HF rotary module's own cos/sin, for every position up front
            pos = torch.arange(max_model_len, device=device)[None]
            cos, sin = base.rotary_emb(torch.empty(1, dtype=self.dtype, device=device), pos)
        self.register_buffer("rope_cos", cos[0].contiguous(), persistent=False)
        self.register_buffer("rope_sin", sin[0].contiguous(), persistent=False)
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in self.layers]
        for i, (k, v) in enumerate(zip(self.k_caches, self.v_caches)):
            self.register_buffer(f"k_cache_{i}", k, persistent=False)
            self.register_buffer(f"v_cache_{i}", v, persistent=False)
        self.has_ecs = any(has_ec(m) for m in self.modules())
        # plain (unquantized, EC-free) sibling linears run as one GEMM, as vLLM's merged QKV / gate-up layers do:
        # (weight, bias, output sizes) per layer, or None; the modules' own weights become views of the merged one
        self.merged_qkv = [merge_siblings(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                           for layer in self.layers]
        self.merged_gate_up = [merge_siblings(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in self.layers]
        for i, (qkv, gate_up) in enumerate(zip(self.merged_qkv, self.merged_gate_up)):
            for name, merged in (("qkv", qkv), ("gate_up", gate_up)):
                if merged is not None:
                    self.register_parameter(f"merged_{name}_weight_{i}", merged[0])
                    self.register_parameter(f"merged_{name}_bias_{i}", merged[1])

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    # ---- pieces -------------------------------------------------------------------------------------------------
    @staticmethod
    def _linear(mod, x, use_ec: bool):
        if use_ec or not has_ec(mod):
            return mod(x)
        return base_linear(mod, x)

    @staticmethod
    def _rope_and_write(q, k, v, kc, vc, cos, sin, slot_block, slot_off):
        """RoPE on q and k, k and v into the caches ``kc``, ``vc`` at their slots; returns the rotated q."""
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kc.index_put_((slot_block, slot_off), k)
        vc.index_put_((slot_block, slot_off), v)
        return q

    def _gather(self, cache, tables):  # [N, L] block ids -> [N, kv_heads, L * block_size, head_dim]
        return gather_blocks(cache, tables, self.num_kv_heads, self.block_size, self.head_dim)

    def _decode_attention(self, q, kc, vc, tables, ctx_lens):
        """q [B, H, D], one query per sequence at its last position; ctx_lens [B] tokens in its cache."""
        if self.decode_attention == "triton":
            return paged_decode_attention(q, kc, vc, tables, ctx_lens, self.scale)
        return reference_paged_decode_attention(q, kc, vc, tables, ctx_lens, self.scale, self.num_kv_heads,
                                                self.block_size)

    def _prefill_attention(self, q_ext, kc, vc, tables, q_index, q_pos):
        """Prefill chunks: q_ext [T + 1, H, D] (row T is a zero pad row); tables [P, L]; q_index [P, Q] rows of
        q_ext (pads -> T); q_pos [P, Q] each query's position. Returns [P, Q, H, D]."""
        p, ql = q_index.shape
        hkv, g, d = self.num_kv_heads, self.group, self.head_dim
        # GQA without a K/V copy per query head: a KV head's G query heads side by side along the query axis
        q = q_ext[q_index].view(p, ql, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(p, hkv, g * ql, d)
        k = self._gather(kc, tables)                          # [P, Hkv, S, D]
        v = self._gather(vc, tables)
        keep = torch.arange(k.shape[2], device=q.device)[None, None, :] <= q_pos[:, :, None]   # causal, logical
        mask = keep[:, None].expand(p, g, ql, k.shape[2]).reshape(p, 1, g * ql, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)      # [P, Hkv, G*Q, D]
        return out.view(p, hkv, g, ql, d).permute(0, 3, 1, 2, 4).reshape(p, ql, hkv * g, d)

    def _layer(self, layer, merged_qkv, merged_gate_up, x, attention, use_ec: bool):
        """One decoder layer; ``attention(q, k, v)`` (pre-RoPE q/k) writes its cache and attends."""
        t = x.shape[0]
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm(x)
        if merged_qkv is not None:
            w, b, sizes = merged_qkv
            q, k, v = F.linear(h, w, b).split(sizes, dim=-1)
        else:
            q, k, v = (self._linear(m, h, use_ec) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = attention(q, k, v)
        x = x + self._linear(attn.o_proj, o.reshape(t, self.num_heads * self.head_dim), use_ec)
        h = layer.post_attention_layernorm(x)
        if merged_gate_up is not None:
            w, b, sizes = merged_gate_up
            gate, up = F.linear(h, w, b).split(sizes, dim=-1)
        else:
            gate, up = self._linear(mlp.gate_proj, h, use_ec), self._linear(mlp.up_proj, h, use_ec)
        g = mlp.act_fn(gate) * up
        return x + self._linear(mlp.down_proj, g, use_ec)

    def _mixed_attention(self, q, k, v, kc, vc, cos, sin, slot_block, slot_off, d_tables, d_ctx_lens, p_tables,
                         p_q_index, p_q_pos):
        """A mixed step's attention: RoPE and cache writes for every token, decode rows (the first
        ``d_tables.shape[0]``) over their blocks, prefill chunks over theirs."""
        num_decodes = d_tables.shape[0]
        q = self._rope_and_write(q, k, v, kc, vc, cos, sin, slot_block, slot_off)
        t = q.shape[0]
        q_ext = torch.cat([q, q.new_zeros(1, self.num_heads, self.head_dim)])
        out = q.new_zeros(t + 1, self.num_heads, self.head_dim)
        out[:num_decodes] = self._decode_attention(q[:num_decodes], kc, vc, d_tables, d_ctx_lens)
        pre = self._prefill_attention(q_ext, kc, vc, p_tables, p_q_index, p_q_pos)
        out.index_put_((p_q_index.reshape(-1),), pre.reshape(-1, self.num_heads, self.head_dim))
        return out[:t]

    # ---- one decoder layer per call, its caches passed in: the entry points below loop over them; regional
    # compilation compiles a layer once, every layer of the same structure reusing its graph ------------------------
    def decode_layer(self, layer, merged_qkv, merged_gate_up, kc, vc, x, cos, sin, slot_block, slot_off, tables,
                     ctx_lens, use_ec: bool = True):
        """``decode_forward``'s work for one layer, its KV caches ``kc``, ``vc`` given."""
        def attention(q, k, v):
            if self.decode_attention == "triton":   # RoPE, the cache writes and the attention: one launch
                return paged_decode_rope_attention(q, k, v, kc, vc, cos, sin, slot_block, slot_off, tables, ctx_lens,
                                                   self.scale)
            q = self._rope_and_write(q, k, v, kc, vc, cos, sin, slot_block, slot_off)
            return self._decode_attention(q, kc, vc, tables, ctx_lens)
        return self._layer(layer, merged_qkv, merged_gate_up, x, attention, use_ec)

    def mixed_layer(self, layer, merged_qkv, merged_gate_up, kc, vc, x, cos, sin, slot_block, slot_off, d_tables,
                    d_ctx_lens, p_tables, p_q_index, p_q_pos, use_ec: bool = True):
        """``mixed_forward``'s work for one layer, its KV caches ``kc``, ``vc`` given."""
        def attention(q, k, v):
            return self._mixed_attention(q, k, v, kc, vc, cos, sin, slot_block, slot_off, d_tables, d_ctx_lens,
                                         p_tables, p_q_index, p_q_pos)
        return self._layer(layer, merged_qkv, merged_gate_up, x, attention, use_ec)

    def embed(self, input_ids, positions):
        """Token embeddings and the RoPE rows of ``positions``."""
        return self.embed_tokens(input_ids), self.rope_cos[positions], self.rope_sin[positions]

    def logits(self, x, logits_index=None):
        """Final norm and LM head, of the rows ``logits_index`` if given."""
        x = x if logits_index is None else x[logits_index]
        return self.lm_head(self.norm(x))

    def decode_loop(self, layer_fn, head_fn, input_ids, positions, slot_block, slot_off, tables, ctx_lens,
                    use_ec: bool = True):
        """A decode step as a loop over ``layer_fn`` (``decode_layer``, or its compiled region) and ``head_fn``
        (``logits``)."""
        x, cos, sin = self.embed(input_ids, positions)
        for i, layer in enumerate(self.layers):
            x = layer_fn(layer, self.merged_qkv[i], self.merged_gate_up[i], self.k_caches[i], self.v_caches[i], x, cos,
                         sin, slot_block, slot_off, tables, ctx_lens, use_ec=use_ec)
        return head_fn(x)

    def mixed_loop(self, layer_fn, head_fn, input_ids, positions, slot_block, slot_off, d_tables, d_ctx_lens,
                   p_tables, p_q_index, p_q_pos, logits_index, use_ec: bool = True):
        """A mixed step as a loop over ``layer_fn`` (``mixed_layer``, or its compiled region) and ``head_fn``."""
        x, cos, sin = self.embed(input_ids, positions)
        for i, layer in enumerate(self.layers):
            x = layer_fn(layer, self.merged_qkv[i], self.merged_gate_up[i], self.k_caches[i], self.v_caches[i], x, cos,
                         sin, slot_block, slot_off, d_tables, d_ctx_lens, p_tables, p_q_index, p_q_pos, use_ec=use_ec)
        return head_fn(x, logits_index)

    # ---- entry points -------------------------------------------------------------------------------------------
    def decode_forward(self, input_ids, positions, slot_block, slot_off, tables, ctx_lens, use_ec: bool = True):
        """Decode-only step: B sequences, one token each. Returns logits [B, vocab]."""
        return self.decode_loop(self.decode_layer, self.logits, input_ids, positions, slot_block, slot_off, tables,
                                ctx_lens, use_ec)

    def decode_forward_static_rows(self, input_ids, positions, slot_block, slot_off, tables, ctx_lens,
                                   use_ec: bool = True):
        """``decode_forward`` under its own code object, so that it compiles apart: called with the batch dimension
        marked static (one graph per batch bucket), which the tensor-parallel peer-reduction pass needs (static
        M <= 16 rows)."""
        return self.decode_forward(input_ids, positions, slot_block, slot_off, tables, ctx_lens, use_ec)

    def mixed_forward(self, input_ids, positions, slot_block, slot_off, d_tables, d_ctx_lens,
                      p_tables, p_q_index, p_q_pos, logits_index, use_ec: bool = True):
        """A step with prefill chunks: tokens [T] = Bd decode rows first, then the chunks' tokens, then padding.
        Returns logits [S, vocab] of the rows ``logits_index``."""
        return self.mixed_loop(self.mixed_layer, self.logits, input_ids, positions, slot_block, slot_off, d_tables,
                               d_ctx_lens, p_tables, p_q_index, p_q_pos, logits_index, use_ec)
