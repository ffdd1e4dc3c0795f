"""Post-grad pass (first of the manager's): a row-parallel W4 + EC linear whose ``u`` is all-reduced ->
``spear::peer_reduce_row_ec`` (issue 19, item 4).

The row-parallel fallback (``distributed/layers.py: RowParallelCompensatedLinear``) traces to::

    y = wait(all_reduce(qlinear(x), "sum", group)) [+ bias]
    u = wait(all_reduce(x Aᵀ, "sum", group))              # the EC's partial u, summed over the ranks
    out = y + (g(u) ⊙ u) Bᵀ                               # g(u) = 2 sigmoid(u W_gᵀ [+ b_g]), or 1 (static EC)

In a layer given a symmetric-memory workspace slot (``distributed.peer_reduce.enable_peer_reduce``), ``x Aᵀ``
is marked by ``spear::peer_reduce_slot`` (the slot's counters and offsets). This pass removes every mark, and
where the chain above matches (2-D / 3-D input, gated with or without gate bias / static, bias or not), the
layer has a slot, both reductions are sums over one group and the epilogue applies (static M <= 16 rows; a
CUDA input, or the Triton interpreter at TP = 1, where one launch cannot wait on other ranks), it rewrites::

    out = wait(all_reduce(peer_reduce_row_ec(x, W4, A, B, gate, slot), "sum", group)) [+ bias]

(the kernel adds the EC term on the output tiles this rank owns, so the y all-reduce sums it once). Every
row-parallel EC linear (a qlinear whose output and whose input's ``x Aᵀ`` are both all-reduced) gets a
``PeerReduceRecord``; one left on the fallback for any reason but "no workspace" also gets a warning.
Runs before ``FuseQuantizedLinearPass``, which then fuses the fallbacks' qlinears as plain linears.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Optional

import torch
from torch._inductor.pattern_matcher import (
    MULTIPLE, CallFunction, KeywordArg, Match, PatternMatcherPass, register_graph_pattern,
)

from ... import options
from ...quant import qlinear as _qlinear_op  # noqa: F401  (registers spear::qlinear)
from ..records import MatchRecord, PassContext, PeerReduceRecord
from .base import SpearGraphPass
from .fuse_quantized_linear import _reshape, _val, _wt, check_operands, gated_products, module_of

aten = torch.ops.aten
QLINEAR = torch.ops.spear.qlinear.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
MAX_M = 16  # = distributed.peer_reduce.MAX_M (the compiler layer does not import distributed/)
SLOT_FIELDS = ("buffer_ptrs", "signal_pad_ptrs", "rank", "world", "r_split", "block_r", "buf_offset", "flag_offset")
NO_WORKSPACE = "no symmetric-memory workspace slot (enable_peer_reduce was not called)"


def _op(name: str):
    """``torch.ops.spear.<name>.default`` once ``distributed.peer_reduce`` registered it, else None."""
    packet = getattr(torch.ops.spear, name, None) if hasattr(torch.ops, "spear") else None
    return None if packet is None else packet.default


# ---- patterns ------------------------------------------------------------------------------------
def _reduced(p, op: str, group: str, users=1):
    return CallFunction(WAIT, CallFunction(ALL_REDUCE, p, KeywordArg(op), KeywordArg(group)), _users=users)


def _ec_terms(nd: int, gate: str):
    """Alternatives for ``(g(u) ⊙ u) Bᵀ`` (in x's rank) with ``u`` the all-reduced ``x Aᵀ``."""
    x2 = KeywordArg("x") if nd == 2 else _reshape(KeywordArg("x"), users=MULTIPLE)
    ua = CallFunction(aten.mm.default, x2, _wt("ec_A"))
    u = _reduced(ua if nd == 2 else _reshape(ua), "u_op", "u_group", users=1 if gate == "none" else 2)
    vs = [u if nd == 2 else _reshape(u)] if gate == "none" else gated_products(u, nd, gate)
    out = []
    for v in vs:
        ec = CallFunction(aten.mm.default, v, _wt("ec_B"))
        out.append((ec if nd == 2 else _reshape(ec), v))
    return out


def _y(bias: bool):
    q = CallFunction(QLINEAR, KeywordArg("x"), KeywordArg("qdata"), KeywordArg("scale"), KeywordArg("zero"),
                     KeywordArg("qbias"), KeywordArg("group_size"))
    y = _reduced(q, "y_op", "y_group")
    return CallFunction(aten.add.Tensor, y, KeywordArg("bias")) if bias else y


def patterns():
    """``(pattern, gate)`` for every variant of the row-parallel fallback."""
    out = []
    for nd, gate, bias in itertools.product((2, 3), ("sigmoid", "sigmoid-nobias", "none"), (True, False)):
        for ec, v in _ec_terms(nd, gate):
            y = _y(bias)
            roots = [CallFunction(aten.add.Tensor, y, ec), CallFunction(aten.add.Tensor, ec, y)]
            if nd == 2:
                roots.append(CallFunction(aten.addmm.default, y, v, _wt("ec_B")))
            out += [(root, gate) for root in roots]
    return out


# ---- the pass ------------------------------------------------------------------------------------
def _static_rows(xv) -> Optional[int]:
    dims = xv.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def _u_reduction(x: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The all_reduce of an ``x Aᵀ`` (through reshapes), or None: what makes a row-parallel linear an EC one."""
    frontier, seen = [x], set()
    for _ in range(4):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.target is ALL_REDUCE and node is not x:
                    return user
                if user.target in RESHAPES or user.target is aten.mm.default:
                    nxt.append(user)
        frontier = nxt
    return None


class PeerReduceRowEcPass(SpearGraphPass):
    """Rewrites matched row-parallel W4 + EC fallbacks (see the module docstring); returns their count."""

    def __init__(self):
        self.pattern_pass = PatternMatcherPass(pass_name="spear_peer_reduce_row_ec")
        self._state: dict = {}
        for pattern, gate in patterns():
            register_graph_pattern(pattern, extra_check=self._check, pass_dict=self.pattern_pass)(self._rewrite)

    def settings(self) -> tuple:
        return ("interpret",) if options.interpret() else ()  # CPU rewrites only under the interpreter

    # -- matching --
    @staticmethod
    def _nodes(match: Match):
        q = next(n for n in match.nodes if n.target is QLINEAR)
        u_reduce = next(n for n in match.nodes if n.target is ALL_REDUCE and n.args[0] is not q)
        return q, u_reduce

    def _why_not(self, match: Match) -> str:
        kw = match.kwargs
        q, u_reduce = self._nodes(match)
        slot = self._state["slots"].get(u_reduce)
        if kw["qbias"] is not None:
            return "the quantized linear carries its own bias (row-parallel adds it after the reduction)"
        for side in ("y", "u"):
            if kw[f"{side}_op"] != "sum":
                return f"{side} is reduced with {kw[f'{side}_op']!r}, the epilogue sums"
        if kw["y_group"] != kw["u_group"]:
            return f"y and u are reduced over different groups ({kw['y_group']!r}, {kw['u_group']!r})"
        why = check_operands({k: v for k, v in kw.items() if k not in ("qbias", "y_op", "u_op", "y_group", "u_group")})
        if why:
            return why
        order = self._state["order"]
        late = [n.name for n in (kw[k] for k in ("ec_A", "ec_B", "gate_w", "gate_b", "bias") if k in kw)
                if isinstance(n, torch.fx.Node) and order[n] > order[q]]
        if late:
            return f"EC operands {late} are computed after the quantized linear"
        if slot is None:
            return NO_WORKSPACE
        xv = _val(kw["x"])
        m = _static_rows(xv)
        if m is None:
            return "M (rows per call) is symbolic; the epilogue needs a static M <= 16"
        if m > MAX_M:
            return f"M = {m} rows > {MAX_M} (the epilogue is for decode)"
        r = _val(kw["ec_A"]).shape[0]
        if r > slot["block_r"]:
            return f"EC rank {r} above the workspace's {slot['block_r']}"
        if xv.device.type != "cuda" and not (options.interpret() and slot["world"] == 1):
            return (f"{xv.device.type} input: the epilogue runs on CUDA (or under TRITON_INTERPRET=1 at TP = 1; "
                    f"this is TP = {slot['world']})")
        return ""

    def _check(self, match: Match) -> bool:
        q, _ = self._nodes(match)
        why = self._why_not(match)
        if why:
            self._state["reasons"][q] = why
        return not why

    def _rewrite(self, match: Match, **kw):
        q, u_reduce = self._nodes(match)
        slot = self._state["slots"][u_reduce]
        graph, root = match.graph, match.output_node()
        y_reduce = next(iter(q.users))
        y_wait = next(iter(y_reduce.users))
        y_out = y_wait if root in y_wait.users else next(iter(y_wait.users))  # + bias
        args = (kw["x"], kw["qdata"], kw["scale"], kw["zero"], kw["group_size"], kw["ec_A"], kw["ec_B"],
                kw.get("gate_w"), kw.get("gate_b"), slot["epoch"], slot["done"], *(slot[k] for k in SLOT_FIELDS))
        with graph.inserting_before(q):
            new = graph.call_function(self._state["op"], args)
        new.meta.update({k: v for k, v in q.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        rec = self._record(q, kw, True, "spear::peer_reduce_row_ec", True)  # (before q is erased)
        y_reduce.replace_input_with(q, new)
        root.replace_all_uses_with(y_out)
        match.erase_nodes()
        self._state["rewritten"][q.name] = rec
        self._state["matches"][q.name] = (MatchRecord(  # its row among the quantized linears (inspect)
            node=q.name, module=rec.module, matched=True, kind="peer-reduce",
            reason="row-parallel W4 + EC + u all-reduce -> spear::peer_reduce_row_ec",
            x_shape=tuple(_val(kw["x"]).shape),
            n=rec.n, k=rec.k, group_size=kw["group_size"], dtype=str(_val(kw["x"]).dtype).replace("torch.", ""),
            rank=rec.rank, gated=rec.gated, bias=rec.bias, graph=rec.graph))

    # -- records --
    def _record(self, q, kw, rewritten, reason, workspace) -> PeerReduceRecord:
        xv, qv = _val(q.args[0]), _val(q.args[1])
        a = _val(kw.get("ec_A")) if kw else None
        return PeerReduceRecord(
            graph=self._state["graph"], node=q.name, module=module_of(q), rewritten=rewritten, reason=reason,
            workspace=workspace, m=_static_rows(xv) if xv is not None else None,
            n=qv.shape[0] if qv is not None else 0, k=xv.shape[-1] if xv is not None else 0,
            rank=a.shape[0] if a is not None else 0, gated=bool(kw) and "gate_w" in kw,
            bias=bool(kw) and "bias" in kw)

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        slot_op = _op("peer_reduce_slot")
        slots = {}
        if slot_op is not None:  # remove every mark, remembering which u reduction it stood before
            for mark in list(graph.find_nodes(op="call_function", target=slot_op)):
                u, epoch, done, *fields = mark.args
                for user in mark.users:
                    slots[user] = dict(epoch=epoch, done=done, **dict(zip(SLOT_FIELDS, fields)))
                mark.replace_all_uses_with(u)
                graph.erase_node(mark)
        candidates = [q for q in graph.find_nodes(op="call_function", target=QLINEAR)
                      if len(q.users) == 1 and next(iter(q.users)).target is ALL_REDUCE and _u_reduction(q.args[0])]
        orphans = set(slots) - {_u_reduction(q.args[0]) for q in candidates}
        if orphans:
            warnings.warn(f"spear_compile: {len(orphans)} workspace slot mark(s) stood before "
                          f"{sorted(n.name for n in orphans)}, which belong to no row-parallel W4 + EC linear (a "
                          f"qlinear whose output and whose input's x Aᵀ are all-reduced): removed, not used",
                          stacklevel=2)
        if not candidates:
            return 0
        self._state = dict(slots=slots, reasons={}, rewritten={}, matches={}, graph=ctx.graph,
                           op=_op("peer_reduce_row_ec"), order={n: i for i, n in enumerate(graph.nodes)})
        count = self.pattern_pass.apply(graph)
        records = []
        for q in candidates:
            if q.name in self._state["rewritten"]:
                records.append(self._state["rewritten"].pop(q.name))
                continue
            u_reduce = _u_reduction(q.args[0])
            workspace = u_reduce in slots
            reason = self._state["reasons"].get(
                q, "the fallback's chain (qlinear + EC + u all-reduce) matches no pattern")
            rec = self._record(q, {}, False, reason, workspace)
            records.append(rec)
            if reason != NO_WORKSPACE:
                warnings.warn(f"spear_compile: row-parallel EC linear {rec.module or q.name} keeps the u all-reduce "
                              f"fallback, not spear::peer_reduce_row_ec: {reason}", stacklevel=2)
        records += self._state["rewritten"].values()  # rewritten nodes that were no candidate (none expected)
        ctx.records.peer_reduce.extend(records)
        ctx.records.matches.extend(self._state["matches"][q.name] for q in candidates
                                   if q.name in self._state["matches"])
        self._state = {}
        return count
