"""Post-grad pass (last): W4 linears (+ EC) at a static prefill M become ``dequantize + aten.mm`` inside the graph.

Without CUDA graphs, a ``spear::fused_linear`` / ``spear::grouped_linear`` call costs ~100 µs of host time
(custom-op dispatch, checks, the Triton launcher, the cuBLAS call) against ~60 µs of GPU time for a Llama-3.2-1B
linear at M = 2048: a compiled prefill is host-bound (bench/results/prefill_e2e.md). At a prefill-sized M
the runtime dispatch would pick dequantize + cuBLAS anyway (``dispatch.default_config``, M > 64), so when the
graph's M is static and above that threshold and the graph is not CUDA-graphed, the node is replaced by
the dequantize and ``mm``/``addmm`` (Inductor's extern cuBLAS call) in the graph, all launched from Inductor's
generated wrapper. On CUDA the dequantize is our int32-word Triton kernel (``dispatch.dequantize_w4``) traced in
through ``torch.library.wrap_triton`` (a grouped node: one launch per member into its rows of one buffer); where
our kernels do not fit (CPU, fp32, unaligned rows) or that trace fails, aten ops (``ops.dequantize_packed``) that
Inductor turns into one pointwise kernel (bench/results/prefill_s7.md: ours is 6-12% faster per layer). Same math
as the reference op up to cuBLAS's own reduction order.

A node with an EC gets the EC in the same structures the runtime dispatch uses (``DequantCublasConfig``),
picked by shape, with ``v = g(u) ⊙ u``, ``u = x Aᵀ`` (ours: the runtime's split-K prologue kernels, fp32; aten
fallback: a cuBLAS mm and a pointwise gate):

* ``kcat`` (K <= N): ``[x | v] [W | B]ᵀ``, the EC as r more columns of K of one cuBLAS GEMM (``v = g(u) ⊙ u``):
  our prologue copies x and writes v beside it, the dequantize kernel writes ``[W | B]`` (aten fallback:
  ``cat``, which Inductor writes from the producers' kernels);
* ``c_in`` (K > N, e.g. down_proj): ``v Bᵀ (+ bias)`` first, then cuBLAS ``addmm`` with it as C: one round trip
  of an ``[M, N]`` tile instead of a copy of the wider ``x``.

Symbolic or small M, or a CUDA-graphed graph (where host time is not paid per call and the tuned runtime
dispatch runs) are left as they are. Each decomposed node is marked on its ``MatchRecord`` / ``GroupRecord``
(``decomposed``; ``decomposed_ec`` names the EC structure, ``decomposed_with`` whose kernels).
Off: ``SPEAR_DECOMPOSE_PREFILL=0`` or ``options={"spear_decompose_prefill": False}``.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import SpearError
from ..lowering import dispatch, fused_linear  # noqa: F401  (registers spear::fused_linear, spear::grouped_linear)
from ..ops import dequantize_packed
from . import registry

FUSED = torch.ops.spear.fused_linear.default
GROUPED = torch.ops.spear.grouped_linear.default
ENV = "SPEAR_DECOMPOSE_PREFILL"
MIN_M = 65  # dispatch: M > 64 runs dequantize + cuBLAS (``default_config``)


_WARNED = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=2)


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


def _weight(qdata, scale, zero, k, dtype, group_size, ours, tail=None, tail_width=0):
    """The dequantized ``[N, K]`` weight, or ``[W | tail]`` (``[N, K + tail_width]``, zeros past the tail's
    width): our int32-word Triton kernel traced in (``ours``), else aten ops Inductor fuses into one kernel."""
    if ours:
        return dispatch.dequantize_w4(qdata, scale, zero, group_size, dtype, tail=tail, tail_width=tail_width,
                                      traceable=True)
    w = dequantize_packed(qdata, scale, zero, k, dtype)
    if tail is None:
        return w
    pad = tail_width - tail.shape[1]
    return torch.cat([w, tail] + ([tail.new_zeros(tail.shape[0], pad)] if pad else []), 1)


def _dequantized(x, qdatas, scales, zeros, biases, group_size, ours):
    """``x [..., K] @ [W_1; W_2; ...]ᵀ (+ [b_1; b_2; ...])``: the members' weights dequantized side by side (ours:
    one launch per member into its rows of one buffer; Inductor: one kernel) and one mm."""
    k = x.shape[-1]
    bias = biases[0] if len(biases) == 1 or biases[0] is None else torch.cat(list(biases), 0)
    if len(qdatas) == 1:
        return _linear(x, _weight(qdatas[0], scales[0], zeros[0], k, x.dtype, group_size, ours), bias)
    if not ours:
        return _linear(x, torch.cat([dequantize_packed(q, s, z, k, x.dtype)
                                     for q, s, z in zip(qdatas, scales, zeros)], 0), bias)
    w = torch.empty(sum(q.shape[0] for q in qdatas), k, dtype=x.dtype, device=x.device)
    row0 = 0
    for q, s, z in zip(qdatas, scales, zeros):
        w = dispatch.dequantize_w4(q, s, z, group_size, x.dtype, out=w, row0=row0, traceable=True)
        row0 += q.shape[0]
    return _linear(x, w, bias)


def ec_structure(k: int, n: int) -> str:
    """How a decomposed node's EC joins its GEMM: ``kcat`` copies x (M·K), ``c_in`` round-trips y (M·N)."""
    return "kcat" if k <= n else "c_in"


def _ec_term(x2, ec_A, gate_w, gate_b):
    """``v = g(u) ⊙ u``, ``u = x Aᵀ`` (``[M, r]``), with the EC module's own ops (``ec.CompensatedLinear``)."""
    u = torch.mm(x2, ec_A.t())
    if gate_w is not None:  # (with gate_b: the pass leaves a gate without one to the runtime op)
        u = u * (2.0 * torch.sigmoid(torch.addmm(gate_b, u, gate_w.t())))
    return u


def _dequantized_ec(x, qdata, scale, zero, bias, ec_A, ec_B, gate_w, gate_b, group_size, ours):
    """``x Wᵀ (+ bias) + B v`` with the EC joined as ``ec_structure`` says (see the module docstring). ``ours``:
    ``v`` (and the copy of x beside it) by our split-K prologue kernels, fp32 u and gate, as the runtime does."""
    k, n, r = x.shape[-1], qdata.shape[0], ec_B.shape[1]
    x2 = x.reshape(-1, k)
    rp = r + (-r % 8)  # rows of [x | v] and [W | B] 16-byte aligned for cuBLAS
    kcat = ec_structure(k, n) == "kcat"
    if ours:
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        out = torch.empty(x2.shape[0], k + rp, dtype=x.dtype, device=x.device) if kcat else None
        v = dispatch.ec_prologue(x2, ec_A, None, gate_w, gate_b, r, out=out, col0=k if kcat else 0,
                                 width=rp if kcat else r, copy_x=kcat, split=True, traceable=True)
        xv = v  # kcat: [x | v]
    else:
        v = _ec_term(x2, ec_A, gate_w, gate_b)
        xv = torch.cat([x2, v] + ([v.new_zeros(v.shape[0], rp - r)] if rp > r else []), 1) if kcat else None
    if kcat:
        wb = _weight(qdata, scale, zero, k, x.dtype, group_size, ours, tail=ec_B, tail_width=rp)
        y = torch.mm(xv, wb.t()) if bias is None else torch.addmm(bias, xv, wb.t())
    else:
        c = torch.mm(v, ec_B.t()) if bias is None else torch.addmm(bias, v, ec_B.t())
        y = torch.addmm(c, x2, _weight(qdata, scale, zero, k, x.dtype, group_size, ours).t())
    return y.reshape(*x.shape[:-1], n)


def _our_kernels_fit(x, qdatas, scales, zeros, group_size, ec_vals) -> bool:
    """Our Triton dequantize / EC prologue can be traced in for these (fake) arguments: CUDA, what the runtime op
    accepts (``dispatch._check``: bf16/fp16, group size, scale shapes and dtype, EC shapes and rank), packed rows the
    int32-word kernel reads (``dispatch.gemv_ok``'s rule on a fake tensor's storage offset) and the EC in x's dtype."""
    ec = list(ec_vals) + [None] * (4 - len(ec_vals))
    try:
        for i, (q, s, z) in enumerate(zip(qdatas, scales, zeros)):
            dispatch._check(x, q, s, z, None, group_size, *(ec if i == 0 else [None] * 4), None)
    except SpearError:
        return False
    rows_ok = all(q.is_contiguous() and q.storage_offset() % 4 == 0 for q in qdatas)
    return x.is_cuda and x.shape[-1] % 8 == 0 and rows_ok and all(t.dtype == x.dtype for t in ec_vals)


class DecomposePrefillLinearsPass:
    """Replaces W4 ``fused_linear`` (with or without EC) / ``grouped_linear`` nodes at a static M >= ``MIN_M`` by aten
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
            m = _static_m(_val(node.args[0]))
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
        ec = [] if grouped else list(node.args[6:10])  # ec_A, ec_B, gate_w, gate_b
        if not grouped:
            qs, ss, zs, bs = [qs], [ss], [zs], [bs]
        g, has_bias = len(qs), bs[0] is not None
        ec_present = [a is not None for a in ec]
        tensor_args = [x, *qs, *ss, *zs, *(bs if has_bias else []), *(a for a in ec if a is not None)]
        vals = [_val(a) for a in tensor_args]
        if any(v is None for v in vals):
            return False
        structure = ""
        if any(ec_present):
            if not (ec_present[0] and ec_present[1]) or ec_present[2] != ec_present[3]:
                return False  # not an EC this pass knows how to write (the runtime op checks and reports it)
            structure = ec_structure(vals[0].shape[-1], vals[1].shape[0])
        group_size = node.args[5] or vals[0].shape[-1]
        ec_vals = vals[len(vals) - sum(ec_present):]
        ours = _our_kernels_fit(vals[0], vals[1:1 + g], vals[1 + g:1 + 2 * g], vals[1 + 2 * g:1 + 3 * g], group_size,
                                ec_vals)

        def fn(x_, *rest):
            q_, s_, z_ = rest[:g], rest[g:2 * g], rest[2 * g:3 * g]
            rest = list(rest[3 * g:])
            b_ = [rest.pop(0) for _ in range(g)] if has_bias else [None]
            if not structure:
                return _dequantized(x_, q_, s_, z_, b_, group_size, ours)
            ec_ = [rest.pop(0) if present else None for present in ec_present]
            return _dequantized_ec(x_, q_[0], s_[0], z_[0], b_[0], *ec_, group_size, ours)

        # one trace per node (each copy gets its own fake values), with Inductor's decompositions: a post-grad
        # graph holds decomposed aten ops; our kernels enter as Triton-kernel HOPs (wrap_triton), which
        # Inductor launches from its wrapper. If that trace fails on this torch, Inductor's own kernels do it.
        # Functionalized: a kernel that writes an empty buffer is then a functional HOP whose output is used (a
        # mutating one would be dead code); Inductor's later post-grad passes reinplace it and emit the launch.
        decomp = select_decomp_table()
        with detect_fake_mode(vals):
            try:
                sub = make_fx(torch.func.functionalize(fn) if ours else fn, decomposition_table=decomp)(*vals)
            except Exception as e:  # noqa: BLE001
                if not ours:
                    raise
                _warn_once(f"spear: tracing our dequantize kernels into the graph failed ({type(e).__name__}: {e}); "
                           "the decomposed prefill linears use Inductor's kernels")
                ours = False
                sub = make_fx(fn, decomposition_table=decomp)(*vals)
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
        DecomposePrefillLinearsPass._record(node.name, node.meta.get("spear_qlinear", node.name), grouped, structure,
                                            "spear" if ours else "inductor")
        return True

    @staticmethod
    def _record(name: str, source: str, grouped: bool, structure: str, kernels: str) -> None:
        gid = registry._graph_counter[0]
        if grouped:
            for rec in registry.GROUPS:
                if rec.graph == gid and rec.node == name:
                    rec.decomposed = True
                    for r in registry.RECORDS:
                        if r.graph == gid and r.group == rec.index:
                            r.decomposed, r.decomposed_with = True, kernels
        else:
            for r in registry.RECORDS:
                if r.graph == gid and r.node == source:
                    r.decomposed, r.decomposed_ec, r.decomposed_with = True, structure, kernels
