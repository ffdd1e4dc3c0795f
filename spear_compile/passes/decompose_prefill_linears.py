"""Post-grad pass (last): W4 linears at a static prefill M become ``dequantize + aten.mm`` inside the graph.

Without CUDA graphs, a ``spear::fused_linear`` / ``spear::grouped_linear`` call costs ~100 µs of host time
(custom-op dispatch, checks, the Triton launcher, the cuBLAS call) against ~60 µs of GPU time for a Llama-3.2-1B
linear at M = 2048: a compiled prefill is host-bound (bench/results/prefill_e2e.md). At a prefill-sized M
the runtime dispatch would pick dequantize + cuBLAS anyway (``dispatch.default_config``, M > 64), so when the
graph's M is static and above that threshold and the graph is not CUDA-graphed, the node is replaced by
the same computation in aten ops: ``ops.dequantize_packed`` (unpack, ``(q - zero) * scale``, cast; Inductor
generates one pointwise kernel, the members of a grouped node concatenated along N by the same kernel)
and ``mm``/``addmm`` (Inductor's extern cuBLAS call, launched from its generated wrapper). Same math as the
reference op, bit for bit up to cuBLAS's own reduction order. Nodes with an EC, a symbolic or small M, or
a CUDA-graphed graph (where host time is not paid per call and our dequantize kernel is faster) are left
as they are. Each decomposed node is marked on its ``MatchRecord`` / ``GroupRecord`` (``decomposed``).
Off: ``SPEAR_DECOMPOSE_PREFILL=0`` or ``options={"spear_decompose_prefill": False}``.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ..lowering import fused_linear  # noqa: F401  (registers spear::fused_linear, spear::grouped_linear)
from ..ops import dequantize_packed
from . import registry

FUSED = torch.ops.spear.fused_linear.default
GROUPED = torch.ops.spear.grouped_linear.default
ENV = "SPEAR_DECOMPOSE_PREFILL"
MIN_M = 65  # dispatch: M > 64 runs dequantize + cuBLAS (``default_config``)


def enabled_by_default() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _static_m(xv) -> Optional[int]:
    """M = the product of x's leading dims when every dim is a plain int, else None."""
    if xv is None or not all(isinstance(d, int) for d in xv.shape):
        return None
    return math.prod(xv.shape[:-1])


def _linear(x, w, bias):
    """``x [..., K] @ wᵀ (+ bias)`` as the mm/addmm Inductor lowers to its extern cuBLAS call."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    return y.reshape(*x.shape[:-1], w.shape[0])


def _dequantized(x, qdatas, scales, zeros, biases):
    """``x [..., K] @ [W_1; W_2; ...]ᵀ (+ [b_1; b_2; ...])``: the members' weights dequantized (concatenated along N
    when there are several: one Inductor kernel writes them side by side) and one mm."""
    k = x.shape[-1]
    ws = [dequantize_packed(q, s, z, k, x.dtype) for q, s, z in zip(qdatas, scales, zeros)]
    bias = None if biases[0] is None else (biases[0] if len(biases) == 1 else torch.cat(list(biases), 0))
    return _linear(x, ws[0] if len(ws) == 1 else torch.cat(ws, 0), bias)


class DecomposePrefillLinearsPass:
    """Replaces plain W4 ``fused_linear`` / ``grouped_linear`` nodes at a static M >= ``MIN_M`` by aten
    ``dequantize + mm`` when the graph is not CUDA-graphed (see the module docstring); returns the count."""

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = enabled_by_default() if enabled is None else bool(enabled)

    def active(self) -> bool:
        """On, and this compile does not record CUDA graphs (read from the Inductor config in force)."""
        return self.enabled and not torch._inductor.config.triton.cudagraphs

    def __call__(self, graph: torch.fx.Graph) -> int:
        if not self.active():
            return 0
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (FUSED, GROUPED):
                continue
            args = node.args
            if node.target is FUSED and any(a is not None for a in args[6:10]):
                continue  # an EC: the runtime dispatch's EC structures stay in charge
            m = _static_m(_val(args[0]))
            if m is None or m < MIN_M:
                continue
            if self._replace(graph, node):
                count += 1
        if count:
            graph.eliminate_dead_code()
        return count

    @staticmethod
    def _replace(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        grouped = node.target is GROUPED
        x, qs, ss, zs, bs = node.args[:5]
        if not grouped:
            qs, ss, zs, bs = [qs], [ss], [zs], [bs]
        g, has_bias = len(qs), bs[0] is not None
        tensor_args = [x, *qs, *ss, *zs, *(bs if has_bias else [])]
        vals = [_val(a) for a in tensor_args]
        if any(v is None for v in vals):
            return False

        def fn(x_, *rest):
            q_, s_, z_ = rest[:g], rest[g:2 * g], rest[2 * g:3 * g]
            return _dequantized(x_, q_, s_, z_, rest[3 * g:] if has_bias else [None])

        # one trace per node (each copy gets its own fake values), with Inductor's decompositions: a post-grad
        # graph holds decomposed aten ops
        with detect_fake_mode(vals):
            sub = make_fx(fn, decomposition_table=select_decomp_table())(*vals)
        if any(n.op == "get_attr" for n in sub.graph.nodes):
            return False  # constants would need copying into the owning module: leave the node as it is
        env = {}
        placeholders = iter(tensor_args)
        out = None
        with graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    env[n] = next(placeholders)
                elif n.op == "output":
                    out = env[n.args[0]] if not isinstance(n.args[0], (tuple, list)) else env[n.args[0][0]]
                else:
                    new = graph.node_copy(n, lambda a: env[a])
                    new.meta["stack_trace"] = node.meta.get("stack_trace")
                    env[n] = new
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        DecomposePrefillLinearsPass._record(node.name, node.meta.get("spear_qlinear", node.name), grouped)
        return True

    @staticmethod
    def _record(name: str, source: str, grouped: bool) -> None:
        gid = registry._graph_counter[0]
        if grouped:
            for rec in registry.GROUPS:
                if rec.graph == gid and rec.node == name:
                    rec.decomposed = True
                    for r in registry.RECORDS:
                        if r.graph == gid and r.group == rec.index:
                            r.decomposed = True
        else:
            for r in registry.RECORDS:
                if r.graph == gid and r.node == source:
                    r.decomposed = True
