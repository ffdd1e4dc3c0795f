"""Post-grad pass (after ``FuseQuantizedLinearPass``): horizontal fusion of sibling quantized linears.

``spear::fused_linear`` nodes without EC that read the same ``x`` node with the same K, group size and
dtype, and either all or none with a bias (q|k|v and gate|up of a decoder layer), become one
``spear::grouped_linear`` (one kernel launch at decode) whose output columns are the members' outputs
side by side; each member's uses read an ``aten.slice`` of it along the last dim. Inductor lowers the
slices to views of the grouped buffer (``ReinterpretView``): consumers index into it, no copy.

Members are taken in graph order, at most ``MAX_GROUP`` (4) per group; a bigger set is split into
balanced groups (5 -> 3 + 2). Siblings that all carry an EC of one rank (all gated or all static) become one
``spear::grouped_linear_ec`` instead (``SPEAR_GROUP_EC_LINEARS=0``: off), unless their M is static and large
enough for ``DecomposePrefillLinearsPass`` to take them; an EC node is never grouped with one without. Nodes with
a different bias-ness or an input defined after the first member stay as they were. Every group is logged in the
compile's ``CompileRecords.groups`` and marked on the members' ``MatchRecord`` (``group`` field). Off:
``SPEAR_GROUP_LINEARS=0`` in the environment, or ``options={"spear_group_linears": False}`` for
``torch.compile(..., backend="spear")``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch._guards import detect_fake_mode

from ... import options
from ...lowering import fused_linear  # noqa: F401  (registers the spear::fused_linear / grouped_linear(_ec) ops)
from ...lowering.configs import MAX_GROUP
from ..records import GroupRecord, PassContext
from .base import SpearGraphPass
from .decompose_prefill_linears import MIN_M as DECOMPOSE_MIN_M, static_m

aten = torch.ops.aten
FUSED = torch.ops.spear.fused_linear.default
GROUPED = torch.ops.spear.grouped_linear.default
GROUPED_EC = torch.ops.spear.grouped_linear_ec.default


def enabled_by_default() -> bool:
    return options.current().group_linears


def balanced_chunks(items: list, size: int = MAX_GROUP) -> list:
    """``items`` in order, split into the fewest chunks of at most ``size``, balanced (5 -> 3 + 2, not 4 + 1)."""
    n_chunks = -(-len(items) // size)
    bounds = [len(items) * i // n_chunks for i in range(n_chunks + 1)]
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _key(node: torch.fx.Node, with_ec: bool):
    """What members of one group share, or None when the node cannot be grouped. An EC node's key holds its EC's
    rank and gating (``with_ec``: EC nodes may group; not at a static M the prefill decomposition takes)."""
    x, q, s, z, bias, gs, ec_a, ec_b, gate_w = node.args[:9]
    xv, qv, sv = _val(x), _val(q), _val(s)
    if xv is None or qv is None or sv is None or not isinstance(gs, int):
        return None
    ec = None
    if ec_a is not None:
        bv = _val(ec_b)
        m = static_m(xv)
        if not with_ec or bv is None or (m is not None and m >= DECOMPOSE_MIN_M):
            return None
        ec = (bv.shape[-1], gate_w is not None)
    return (x, xv.shape[-1], gs, xv.dtype, sv.dtype, bias is not None, ec)


class GroupSiblingLinearsPass(SpearGraphPass):
    """Groups sibling ``spear::fused_linear`` nodes (see the module docstring); returns the group count."""

    def __init__(self, enabled: Optional[bool] = None, with_ec: Optional[bool] = None):
        self.enabled = enabled_by_default() if enabled is None else bool(enabled)
        self.with_ec = options.current().group_ec_linears if with_ec is None else bool(with_ec)

    def settings(self) -> tuple:
        return (() if self.enabled else ("group_linears=off",)) + (() if self.with_ec else ("group_ec_linears=off",))

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        if not self.enabled:
            return 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        buckets: dict = {}
        for node in graph.find_nodes(op="call_function", target=FUSED):
            key = _key(node, self.with_ec)
            if key is not None:
                buckets.setdefault(key, []).append(node)
        count = 0
        for nodes in buckets.values():
            nodes.sort(key=order.__getitem__)
            for chunk in balanced_chunks(nodes):
                if len(chunk) >= 2 and self._inputs_ready(chunk, order):
                    self._rewrite(graph, chunk, ctx)
                    count += 1
        if count:
            graph.eliminate_dead_code()
        return count

    @staticmethod
    def _inputs_ready(members: List[torch.fx.Node], order: dict) -> bool:
        """Every member's operands exist where the grouped node goes (before the first member)."""
        first = order[members[0]]
        return all(order[a] < first for m in members for a in m.all_input_nodes)

    def _rewrite(self, graph: torch.fx.Graph, members: List[torch.fx.Node], ctx: PassContext) -> None:
        x, gs = members[0].args[0], members[0].args[5]
        qs, ss, zs, bs = ([m.args[j] for m in members] for j in (1, 2, 3, 4))
        ecs = [[m.args[j] for m in members] for j in (6, 7, 8, 9)] if members[0].args[6] is not None else []
        ns = [_val(q).shape[0] for q in qs]
        xv = _val(x)
        dim = xv.dim() - 1
        fake_mode = detect_fake_mode([xv])
        op = GROUPED_EC if ecs else GROUPED
        with graph.inserting_before(members[0]):
            grouped = graph.call_function(op, (x, qs, ss, zs, bs, gs, *ecs))
            vals = lambda nodes: [None if n is None else _val(n) for n in nodes]  # noqa: E731
            with fake_mode:
                gval = op(xv, vals(qs), vals(ss), vals(zs), vals(bs), gs, *(vals(e) for e in ecs))
            grouped.meta["val"] = gval
            grouped.meta["stack_trace"] = members[0].meta.get("stack_trace")
            start = 0
            for m, n in zip(members, ns):
                sl = graph.call_function(aten.slice.Tensor, (grouped, dim, start, start + n))
                with fake_mode:
                    sl.meta["val"] = aten.slice.Tensor(gval, dim, start, start + n)
                sl.meta["stack_trace"] = m.meta.get("stack_trace")
                m.replace_all_uses_with(sl)
                start += n
        for m in members:
            graph.erase_node(m)
        self._record(ctx, grouped, members, ns, xv, gs, bs[0] is not None, _val(ecs[1][0]).shape[-1] if ecs else 0)

    @staticmethod
    def _record(ctx, grouped, members, ns, xv, gs, bias, ec_rank):
        gid = ctx.graph
        sources = [m.meta.get("spear_qlinear", m.name) for m in members]
        modules = [m.meta.get("spear_module") for m in members]
        rec = GroupRecord(
            index=len(ctx.records.groups), graph=gid, node=grouped.name, members=tuple(sources),
            modules=tuple(mod or src for mod, src in zip(modules, sources)), ns=tuple(ns), k=xv.shape[-1],
            group_size=gs, dtype=str(xv.dtype).replace("torch.", ""), bias=bias, ec_rank=ec_rank)
        ctx.records.groups.append(rec)
        by_node = {r.node: r for r in ctx.records.matches_of(gid)}
        for src in sources:
            if src in by_node:
                by_node[src].group = rec.index
