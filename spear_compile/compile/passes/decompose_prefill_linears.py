"""Post-grad pass (last): W4 linears (+ EC) at a static prefill M become ``dequantize + aten.mm`` inside the graph.

Without CUDA graphs, a ``spear::fused_linear`` / ``spear::grouped_linear`` call costs ~100 µs of host time
(custom-op dispatch, checks, the Triton launcher, the cuBLAS call) against ~60 µs of GPU time for a Llama-3.2-1B
linear at M = 2048: a compiled prefill is host-bound (bench/results/prefill_e2e.md). At a prefill-sized M
the runtime dispatch would pick dequantize + cuBLAS anyway (``lowering.candidates.default_config``, M > 64), so when the
graph's M is static and above that threshold and the graph is not CUDA-graphed, the node is replaced by
the dequantize and ``mm``/``addmm`` (Inductor's extern cuBLAS call) in the graph, all launched from Inductor's
generated wrapper. On CUDA the dequantize is our int32-word Triton kernel (``prefill.dequantize_w4``) traced in
through ``torch.library.wrap_triton`` (a grouped node: one launch per member into its rows of one buffer); where
our kernels do not fit (CPU, fp32, unaligned rows) or that trace fails, aten ops (``ops.dequantize_packed``) that
Inductor turns into one pointwise kernel (bench/results/prefill_s7.md: ours is 6-12% faster per layer). Same math
as the reference op up to cuBLAS's own reduction order.

A node with an EC gets the EC in the same structures the runtime dispatch uses (``DequantCublasConfig``),
picked by shape, with ``v = g(u) ⊙ u``, ``u = x Aᵀ`` (ours: the runtime's split-K prologue kernels, fp32; aten
fallback: a cuBLAS mm and a pointwise gate):

* ``kcat``: ``[x | v] [W | B]ᵀ``, the EC as r more columns of K of one cuBLAS GEMM; the dequantize kernel writes
  ``[W | B]``. ``[x | v]``: when x comes from a pointwise op (RMSNorm's scale, SiLU·up: ``pad_x``), aten's
  ``pad(x)``, which Inductor writes from that op's own kernel, and an x pass and a gate launch read x from it
  and write v into it in place (no copy of x; every EC's A and gate read from its own tensors:
  ``prefill.ec_prologue_in_place``); else our prologue copies x beside v (aten fallback: ``cat``);
* ``c_in`` (K > N, e.g. down_proj, unless ``pad_x``): ``v Bᵀ (+ bias)`` first, then cuBLAS ``addmm`` with it as
  C: one round trip of an ``[M, N]`` tile instead of a copy of the wider ``x``.

**EC siblings merged.** Nodes that read the same x (same K, group size, dtype, bias-ness) of which at least one
has an EC (q|k|v, gate|up; plain siblings may already be a ``grouped_linear``) become one ``kcat`` GEMM over
``[W_1; W_2; ...]``: the ECs are stacked into one of rank R = Σ r_i (``A = [A_1; A_2; ...]``; each B in its own
tail columns of its rows, zeros elsewhere; each gate applied to its own columns), so x is read once for all of
them, not once per EC (R <= ``MAX_MERGED_RANK``, at most ``prefill.MAX_IN_PLACE_BLOCKS`` ECs; in place, each
EC's A and gate are read from its own tensors, not stacked per call). Each node's uses read its columns of the
output.
(``bench/results/prefill_s8.md``, ``prefill_s9.md``; compiled decoder layer, bf16 linears-equivalent: 1B 1.48-1.54
-> 1.38-1.44× merged -> 1.345-1.349× with each EC's own tensors in place; 7B 1.31-1.39 -> 1.30-1.32 -> 1.30-1.32×.)
Off: ``SPEAR_EC_MERGE=0``; ``SPEAR_EC_PAD_X=0`` / ``1`` never / always pads (default ``auto``).

Symbolic or small M, or a CUDA-graphed graph (where host time is not paid per call and the tuned runtime
dispatch runs) are left as they are. Each decomposed node is marked on its ``MatchRecord`` / ``GroupRecord``
(``decomposed``; ``decomposed_ec`` names the EC structure, ``decomposed_with`` whose kernels,
``decomposed_merged`` the other nodes of the same GEMM, ``decomposed_pad_x`` whether ``[x | 0]`` came by pad).
Off: ``SPEAR_DECOMPOSE_PREFILL=0`` or ``options={"spear_decompose_prefill": False}``.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ... import options
from ...ec.module import gated
from ...errors import SpearError
from ...lowering import fused_linear  # noqa: F401  (registers spear::fused_linear, spear::grouped_linear)
from ...lowering import prefill
from ...lowering.configs import COPY_X_MAX_BLOCK_R, MAX_IN_PLACE_BLOCKS, block_r
from ...lowering.dispatch import check_linear
from ...lowering.prefill import contiguous_ec
from ...quant.qlinear import dequantize_packed
from ..records import PassContext
from .base import SpearGraphPass

FUSED = torch.ops.spear.fused_linear.default
GROUPED = torch.ops.spear.grouped_linear.default
MIN_M = 65  # dispatch: M > 64 runs dequantize + cuBLAS (``default_config``)


class Member(NamedTuple):
    """One linear of a decomposed GEMM (graph nodes at rewrite time, tensors inside the traced function); the EC
    entries are None for a member without one, the gate's without a gate."""
    qdata: object
    scale: object
    zero: object
    bias: object
    ec_A: object
    ec_B: object
    gate_w: object
    gate_b: object


def _warn_once(msg: str) -> None:
    """Python's default warning filter shows each (message, location) once per process."""
    warnings.warn(msg, stacklevel=2)


def enabled_by_default() -> bool:
    return options.current().decompose_prefill


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def static_m(xv) -> Optional[int]:
    """M = the product of x's leading dims when every dim is a plain int, else None."""
    if xv is None or not all(isinstance(d, int) for d in xv.shape):
        return None
    return math.prod(xv.shape[:-1])


def _linear(x, w, bias):
    """``x [..., K] @ wᵀ (+ bias)`` as the mm/addmm Inductor lowers to its extern cuBLAS call."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    return y.reshape(*x.shape[:-1], w.shape[0])


def _weight(qdata, scale, zero, k, dtype, group_size, ours):
    """The dequantized ``[N, K]`` weight: our int32-word Triton kernel traced in (``ours``), else aten ops Inductor
    fuses into one kernel."""
    if ours:
        return prefill.dequantize_w4(qdata, scale, zero, group_size, dtype, traceable=True)
    return dequantize_packed(qdata, scale, zero, k, dtype)


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
    return _linear(x, _rows_side_by_side([(q, s, z, None, 0) for q, s, z in zip(qdatas, scales, zeros)], k, 0,
                                         group_size, x.dtype, x.device), bias)


def _rows_side_by_side(parts, k, tail_width, group_size, dtype, device):
    """``[W_1 | t_1; W_2 | t_2; ...]`` by our dequantize kernel, one launch per member into its rows of one buffer.
    ``parts``: per member ``(qdata, scale, zero, tail or None, tail_col0)``; the tails (``[N_i, r_i]``) sit in
    columns ``K + tail_col0 ..`` of their rows, zeros elsewhere (``tail_width`` = 0: plain W)."""
    w = torch.empty(sum(p[0].shape[0] for p in parts), k + tail_width, dtype=dtype, device=device)
    row0 = 0
    for q, s, z, tail, col0 in parts:
        w = prefill.dequantize_w4(q, s, z, group_size, dtype, tail=tail, tail_width=tail_width, tail_col0=col0,
                                   out=w, row0=row0, traceable=True)
        row0 += q.shape[0]
    return w


def ec_structure(k: int, n: int) -> str:
    """How a decomposed node's EC joins its GEMM: ``kcat`` copies x (M·K), ``c_in`` round-trips y (M·N)."""
    return "kcat" if k <= n else "c_in"


def _ec_term(x2, ec_A, gate_w, gate_b):
    """``v = g(u) ⊙ u``, ``u = x Aᵀ`` (``[M, r]``), with the EC module's own ops (``ec.CompensatedLinear``)."""
    u = torch.mm(x2, ec_A.t())
    if gate_w is not None:  # (with gate_b: the pass leaves a gate without one to the runtime op)
        u = gated(u, gate_w, gate_b)
    return u


def _placed(t, col0, width):
    """``t`` (``[n, r]``) in columns ``col0 .. col0 + r`` of an ``[n, width]`` matrix of zeros (aten ops)."""
    parts = [t.new_zeros(t.shape[0], col0), t, t.new_zeros(t.shape[0], width - col0 - t.shape[1])]
    return torch.cat([p for p in parts if p.shape[1]], 1)


def _tail_offsets(members):
    """Each member's first column in ``[W | B]``'s tail: the ranks of the EC members before it."""
    offsets, col = [], 0
    for m in members:
        offsets.append(col)
        col += m.ec_B.shape[1] if m.ec_A is not None else 0
    return offsets


def _stacked_ec(members):
    """The ECs of members merged into one GEMM as one EC of rank R = Σ r_i (the copy-mode prologue and the aten
    path): ``A = [A_1; A_2; ...]`` (``[R, K]``), the gate block-diagonal (a static member's block and bias are
    zero: 2σ(0) = 1, its v = u exactly). Returns (A, gate_w or None, gate_b or None)."""
    ecs = [m for m in members if m.ec_A is not None]
    ranks = [m.ec_B.shape[1] for m in ecs]
    total = sum(ranks)
    if len(ecs) == 1:
        return ecs[0].ec_A, ecs[0].gate_w, ecs[0].gate_b
    a = torch.cat([m.ec_A for m in ecs], 0)
    if all(m.gate_w is None for m in ecs):
        return a, None, None
    rows, gbs, c = [], [], 0
    for m, r in zip(ecs, ranks):
        gw = m.gate_w if m.gate_w is not None else m.ec_A.new_zeros(r, r)
        rows.append(_placed(gw, c, total))
        gbs.append(m.gate_b if m.gate_b is not None else m.ec_A.new_zeros(r))
        c += r
    return a, torch.cat(rows, 0), torch.cat(gbs, 0)


def _dequantized_ec(x, members, group_size, ours, in_place, structure="kcat"):
    """``x [W_1; W_2; ...]ᵀ (+ bias) + the members' ECs`` (see the module docstring): ``structure`` ``c_in`` (one
    member), else ``kcat`` over all members, one GEMM ``[x | v] [W | B]ᵀ`` with the members' ECs stacked
    (``_stacked_ec``). ``members``: ``(qdata, scale, zero, bias, A, B, gate_w, gate_b)`` (EC entries None for a
    member without one). ``ours``: ``v`` (and ``[x | v]``) by our split-K prologue kernels, fp32 u and gate, as
    the runtime does; ``in_place`` (ours only): ``[x | 0]`` by aten ``constant_pad_nd`` (which Inductor can write
    from x's producer kernel) and every v written into it in place by two launches that read each EC's own A and
    gate (``prefill.ec_prologue_in_place``), instead of the prologue copying x beside the stacked EC's v."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    # (a member of a merged EC, ``compile.siblings.pack_members``, holds views into a block-diagonal B and gate)
    members = [m._replace(**dict(zip(Member._fields[4:], contiguous_ec(*m[4:])))) for m in members]
    ns = [m.qdata.shape[0] for m in members]
    biases = [m.bias for m in members]
    bias = None if biases[0] is None else biases[0] if len(members) == 1 else torch.cat(biases, 0)
    ecs = [m for m in members if m.ec_A is not None]
    ranks = [m.ec_B.shape[1] for m in ecs]
    r = sum(ranks)
    offsets = _tail_offsets(members)
    rp = r + (-r % 8)  # rows of [x | v] and [W | B] 16-byte aligned for cuBLAS
    if structure == "c_in":
        q, s, z, _, ec_A, ec_B, gate_w, gate_b = members[0]
        if ours:
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            v = prefill.ec_prologue(x2, ec_A, None, gate_w, gate_b, r, split=True, traceable=True)
        else:
            v = _ec_term(x2, ec_A, gate_w, gate_b)
        c = torch.mm(v, ec_B.t()) if bias is None else torch.addmm(bias, v, ec_B.t())
        y = torch.addmm(c, x2, _weight(q, s, z, k, x.dtype, group_size, ours).t())
        return y.reshape(*x.shape[:-1], ns[0])
    if ours:
        if in_place:
            own = [tuple(t.contiguous() if t is not None else None for t in (m.ec_A, m.gate_w, m.gate_b)) for m in ecs]
            xv = prefill.ec_prologue_in_place(torch.nn.functional.pad(x2, (0, rp)), k, own, traceable=True)
        else:
            ec_A, gate_w, gate_b = _stacked_ec(members)
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            xv = torch.empty(x2.shape[0], k + rp, dtype=x.dtype, device=x.device)
            xv = prefill.ec_prologue(x2, ec_A, None, gate_w, gate_b, r, out=xv, col0=k, width=rp, copy_x=True,
                                      split=True, traceable=True)
        wb = _rows_side_by_side([(q, s, z, b if a is not None else None, c0)
                                 for (q, s, z, _, a, b, _, _), c0 in zip(members, offsets)],
                                k, rp, group_size, x.dtype, x.device)
    else:
        ec_A, gate_w, gate_b = _stacked_ec(members)
        v = _ec_term(x2, ec_A, gate_w, gate_b)
        xv = torch.cat([x2, v] + ([v.new_zeros(v.shape[0], rp - r)] if rp > r else []), 1)
        wb = torch.cat([torch.cat([dequantize_packed(q, s, z, k, x.dtype),
                                   _placed(b, c0, rp) if a is not None else q.new_zeros(n, rp, dtype=x.dtype)], 1)
                        for (q, s, z, _, a, b, _, _), n, c0 in zip(members, ns, offsets)], 0)
    y = torch.mm(xv, wb.t()) if bias is None else torch.addmm(bias, xv, wb.t())
    return y.reshape(*x.shape[:-1], sum(ns))


def _our_kernels_fit(x, qdatas, scales, zeros, group_size, ecs) -> bool:
    """Our Triton dequantize / EC prologue can be traced in for these (fake) arguments: CUDA, what the runtime op
    accepts (``prefill._check``: bf16/fp16, group size, scale shapes and dtype, EC shapes and rank), packed rows the
    int32-word kernel reads (``prefill.gemv_ok``'s rule on a fake tensor's storage offset) and the EC in x's dtype.
    ``ecs``: per member, its (A, B, gate_w, gate_b) (Nones without an EC)."""
    try:
        for q, s, z, ec in zip(qdatas, scales, zeros, ecs):
            check_linear(x, q, s, z, None, group_size, *ec, None)
    except SpearError:
        return False
    rows_ok = all(q.is_contiguous() and q.storage_offset() % 4 == 0 for q in qdatas)
    ec_dtype_ok = all(t.dtype == x.dtype for ec in ecs for t in ec if t is not None)
    return x.is_cuda and x.shape[-1] % 8 == 0 and rows_ok and ec_dtype_ok


def _members(node):
    """``(x, [(qdata, scale, zero, bias, A, B, gate_w, gate_b) per member])`` (nodes, EC entries None without one)
    of a fused/grouped node, or None for an EC this pass does not write (A without B, a gate weight without its bias:
    the runtime op checks and reports those)."""
    if node.target is GROUPED:
        x, qs, ss, zs, bs = node.args[:5]
        return x, [Member(q, s, z, b, None, None, None, None) for q, s, z, b in zip(qs, ss, zs, bs)]
    x, q, s, z, b = node.args[:5]
    ec = list(node.args[6:10])  # ec_A, ec_B, gate_w, gate_b
    present = [a is not None for a in ec]
    if any(present) and (not (present[0] and present[1]) or present[2] != present[3]):
        return None
    return x, [Member(q, s, z, b, *ec)]


def _labels(node, ctx: PassContext) -> tuple:
    """The module paths (else qlinear node names) behind a fused or grouped node, for the records."""
    if node.target is GROUPED:
        for rec in ctx.records.groups_of(ctx.graph):
            if rec.node == node.name:
                return tuple(m or s for m, s in zip(rec.modules, rec.members))
        return (node.name,)
    return (node.meta.get("spear_module") or node.meta.get("spear_qlinear", node.name),)


def _merge_key(node):
    """What nodes merged into one GEMM share (x, K, group size, dtype, bias-ness), or None."""
    mem = _members(node)
    xv = _val(node.args[0])
    if mem is None or xv is None:
        return None
    return (node.args[0], xv.shape[-1], node.args[5], xv.dtype, mem[1][0].bias is not None)


def _fusible_producer(x) -> bool:
    """x comes from a pointwise aten op (RMSNorm's scale, SiLU·up), which Inductor can let write ``[x | 0]``
    directly: the EC's ``[x | v]`` then costs no copy of x (``pad_x``). Graph inputs and extern kernels' outputs
    (cuBLAS, attention) would be copied by the pad, a pass more than the prologue's own copy."""
    if not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return False
    target = x.target
    if target is torch.ops.prims.convert_element_type.default:
        return True
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


MAX_MERGED_RANK = 128  # the stacked EC's rank: the x pass holds a BLOCK_R-wide A tile and fp32 partials


class DecomposePrefillLinearsPass(SpearGraphPass):
    """Replaces W4 ``fused_linear`` (with or without EC) / ``grouped_linear`` nodes at a static M >= ``MIN_M`` by aten
    ``dequantize + mm`` when the graph is not CUDA-graphed (see the module docstring); returns the count of GEMMs
    written. Nodes with the same x of which one has an EC (an EC linear and its siblings: q|k|v, gate|up) become one
    GEMM with their ECs side by side (each from its own tensors in place, else stacked by ``_stacked_ec``): x is
    read once for all of them."""

    def __init__(self, enabled: Optional[bool] = None):
        opts = options.current()
        self.enabled = opts.decompose_prefill if enabled is None else bool(enabled)
        self.merge_ec = opts.ec_merge  # SPEAR_EC_MERGE=0: each EC node keeps its own GEMM
        self.pad_x = opts.ec_pad_x  # "auto": pad when x's producer is pointwise; "1" / "0": always / never
        self.xpass = opts.xpass_in_place  # traced into the graph: part of what it writes

    def settings(self) -> tuple:
        """What changes the graph it writes besides its sources (part of the pass manager's cache ``uuid``)."""
        return (self.enabled, self.merge_ec, self.pad_x, tuple(self.xpass))

    def active(self) -> bool:
        """On, and this compile does not record CUDA graphs (read from the Inductor config in force)."""
        return self.enabled and not torch._inductor.config.triton.cudagraphs

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        if not self.active():
            return 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        cands = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (FUSED, GROUPED):
                continue
            m = static_m(_val(node.args[0]))
            if m is not None and m >= MIN_M:
                cands.append(node)
        buckets: dict = {}
        for node in cands:
            key = _merge_key(node)
            if key is not None:
                buckets.setdefault(key, []).append(node)
        units, taken = [], set()
        for nodes in buckets.values():
            if self.merge_ec and len(nodes) >= 2 and self._mergeable(nodes, order):
                units.append(nodes)
                taken.update(nodes)
        units += [[n] for n in cands if n not in taken]
        count = 0
        for unit in units:
            if self._replace(graph, unit, ctx):
                count += 1
        if count:
            graph.eliminate_dead_code()
        return count

    @staticmethod
    def _mergeable(nodes, order) -> bool:
        """Worth one GEMM: some member has an EC, the stacked rank fits, K <= the total N (``kcat``), and every
        operand exists where the merged GEMM goes (before the first node)."""
        mems = [m for n in nodes for m in _members(n)[1]]
        ranks = [_val(m.ec_B).shape[1] for m in mems if m.ec_A is not None]
        if not ranks or sum(ranks) > MAX_MERGED_RANK or len(ranks) > MAX_IN_PLACE_BLOCKS:
            return False
        k = _val(nodes[0].args[0]).shape[-1]
        if k > sum(_val(m.qdata).shape[0] for m in mems):
            return False
        first = min(order[n] for n in nodes)
        return all(order[a] < first for n in nodes for a in n.all_input_nodes)

    def _replace(self, graph: torch.fx.Graph, nodes, ctx: PassContext) -> bool:
        """Writes ``nodes`` (in graph order; more than one: merged into one GEMM) as dequantize + mm."""
        parts = [_members(n) for n in nodes]
        if any(p is None for p in parts):
            return False
        x = parts[0][0]
        members = [m for _, mem in parts for m in mem]
        g = len(members)
        has_bias = members[0].bias is not None
        has_ec = [m.ec_A is not None for m in members]
        gated = [m.gate_w is not None for m in members]
        flat = [a for m in members for a in m if a is not None]  # per member: q, s, z, [b], [A, B, [gw, gb]]
        tensor_args = [x, *flat]
        vals = [_val(a) for a in tensor_args]
        if any(v is None for v in vals):
            return False
        xv = vals[0]
        group_size = nodes[0].args[5] or xv.shape[-1]
        mvals = [tuple(_val(a) for a in m) for m in members]
        ours = _our_kernels_fit(xv, [mv[0] for mv in mvals], [mv[1] for mv in mvals], [mv[2] for mv in mvals],
                                group_size, [mv[4:] for mv in mvals])
        any_ec = any(has_ec)
        n_tot = sum(mv[0].shape[0] for mv in mvals)
        pad_x = any_ec and (self.pad_x == "1" or (self.pad_x == "auto" and _fusible_producer(x)))
        # kcat copies x unless x's producer writes [x | 0] (pad_x): then it costs no copy at any K
        structure = "" if not any_ec else "kcat" if g > 1 or pad_x else ec_structure(xv.shape[-1], n_tot)
        ranks = sum(mv[5].shape[1] for mv in mvals if mv[4] is not None)
        # [x | 0] by pad (our kernels only): x's producer can write it, or the stack is too wide for the
        # prologue's own copy (it would copy x in a pass of its own first, ``COPY_X_MAX_BLOCK_R``)
        in_place = structure == "kcat" and (pad_x or block_r(ranks) > COPY_X_MAX_BLOCK_R)

        def fn(x_, *rest):
            rest = list(rest)
            mem = []
            for i in range(g):
                q_, s_, z_ = rest.pop(0), rest.pop(0), rest.pop(0)
                b_ = rest.pop(0) if has_bias else None
                a_, bb_ = (rest.pop(0), rest.pop(0)) if has_ec[i] else (None, None)
                gw_, gb_ = (rest.pop(0), rest.pop(0)) if gated[i] else (None, None)
                mem.append(Member(q_, s_, z_, b_, a_, bb_, gw_, gb_))
            if not any_ec:
                return _dequantized(x_, [m.qdata for m in mem], [m.scale for m in mem], [m.zero for m in mem],
                                    [m.bias for m in mem], group_size, ours)
            return _dequantized_ec(x_, mem, group_size, ours, in_place, structure)

        # one trace per unit (each copy gets its own fake values), with Inductor's decompositions: a post-grad
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
        with graph.inserting_before(nodes[0]):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    env[n] = next(placeholders)
                elif n.op == "output":
                    out = env[n.args[0]] if not isinstance(n.args[0], (tuple, list)) else env[n.args[0][0]]
                else:
                    new = graph.node_copy(n, lambda a: env[a])
                    new.meta["stack_trace"] = nodes[0].meta.get("stack_trace")
                    env[n] = new
            if len(nodes) == 1:
                nodes[0].replace_all_uses_with(out)
            else:  # each node's uses read its columns of the merged output (a view)
                col, dim = 0, xv.dim() - 1
                for node in nodes:
                    n = _val(node).shape[-1]
                    sl = graph.call_function(torch.ops.aten.slice.Tensor, (out, dim, col, col + n))
                    sl.meta["val"] = _val(node)
                    sl.meta["stack_trace"] = node.meta.get("stack_trace")
                    node.replace_all_uses_with(sl)
                    col += n
        labels = [_labels(n, ctx) for n in nodes]
        for i, node in enumerate(nodes):
            graph.erase_node(node)
            others = tuple(lb for j, lbs in enumerate(labels) if j != i for lb in lbs)
            DecomposePrefillLinearsPass._record(ctx, node.name, node.meta.get("spear_qlinear", node.name),
                                                node.target is GROUPED, structure, "spear" if ours else "inductor",
                                                others, ours and in_place)
        return True

    @staticmethod
    def _record(ctx: PassContext, name: str, source: str, grouped: bool, structure: str, kernels: str, merged=(),
                pad_x=False) -> None:
        recs = []
        if grouped:
            for rec in ctx.records.groups_of(ctx.graph):
                if rec.node == name:
                    rec.decomposed = True
                    recs += [r for r in ctx.records.matches_of(ctx.graph) if r.group == rec.index]
        else:
            recs = [r for r in ctx.records.matches_of(ctx.graph) if r.node == source]
        for r in recs:
            r.decomposed, r.decomposed_with = True, kernels
            r.decomposed_ec = structure if (not grouped or merged) else ""
            r.decomposed_merged, r.decomposed_pad_x = tuple(merged), pad_x
