"""Sibling quantized linears (q|k|v, gate|up: they read the same input) laid out as one buffer's adjacent row blocks.

``pack_siblings(model)`` copies each group's packed codes, scales and zero points (and biases) into one buffer per
part and makes the members' weights views of their row blocks: same values, shapes and state dict, the same memory
once the old tensors are freed. ``spear::grouped_linear`` then may run the group at M > 16 as one linear of
``N_1 + ... + N_g`` outputs (``lowering.grouped``: one wide GEMM instead of 2-4 narrow ones, each with its fixed
costs). Groups are those the grouping pass fuses (``compile.api.sibling_groups``).

With ``SPEAR_MERGE_SIBLING_ECS=1`` (off by default: measured slower at M >= 16, below), siblings that all carry an
EC of one rank and gate (``spear::grouped_linear_ec``) are packed too, their ECs laid out as one EC of rank
``g·r``: ``A = [A_1; ...]`` and the gate bias as adjacent row blocks, ``B`` and the gate weight as the diagonal
blocks of one zero matrix (``B: [ΣN, g·r]``, ``W_g: [g·r, g·r]``), each member's EC parameters views of its blocks
(B and W_g views with row stride ``g·r``). The group then may run as one linear with one EC
(``lowering.grouped.merged_ec``): one launch at M = 1 instead of one a member. The zeros cost memory (a
Llama-3.2-1B layer's, r = 32: 1.5 MB); the state dict keeps each member's own values and shapes. On an H100
(session 35, ``bench/results/merged_ec_h100_s35.md``) the merged linear won the M = 1 q|k|v groups (1B 13.2 ->
10.8 µs) but every other pick paid copies of the members' strided views (1B q|k|v at M = 16 13.6 -> 27.5 µs).
Since session 36 none copies: the batched kernel reads B and W_g with their row stride, and a member launched
alone takes A and the gate whole and its own rows of the merged B (``lowering.grouped.solo_members``; B's zero
blocks make that its own EC, at rank g·r); only a member's forward outside the group op copies its views
(``lowering.prefill.contiguous_ec``). Not yet timed on a GPU, so merging stays opt-in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import options
from ..quant.weight import QuantizedWeight

PARTS = ("qdata", "scale", "zero")


def _ec_members(members) -> bool:
    """All members carry an EC (``ec.CompensatedLinear`` of rank > 0) of one rank, gate and dtype."""
    from ..ec.module import CompensatedLinear
    if not all(isinstance(m, CompensatedLinear) and m.rank > 0 for m in members):
        return False
    return len({(m.rank, m.gate, m.ec_A.dtype, m.ec_A.device) for m in members}) == 1


def _ec_views(members):
    """The members' EC parameters, as ``lowering.grouped.merged_ec`` takes them."""
    return [[getattr(m, p) for m in members] for p in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b")]


@torch.no_grad()
def merged_ec_views(ec_As, ec_Bs, gate_ws, gate_bs) -> list:
    """Copies of sibling ECs of one rank (gates all given or all None) laid out as one EC of rank ``g·r`` (see the
    module docstring): per member, its ``(A, B, gate_w, gate_b)`` as views of the merged tensors."""
    g, r = len(ec_As), ec_As[0].shape[0]
    a = torch.cat([t.detach() for t in ec_As])
    b = ec_Bs[0].new_zeros(sum(t.shape[0] for t in ec_Bs), g * r)
    gated = gate_ws[0] is not None
    gw = gate_ws[0].new_zeros(g * r, g * r) if gated else None
    gb = torch.cat([t.detach() for t in gate_bs]) if gated else None
    out, row = [], 0
    for i, (bi, gwi) in enumerate(zip(ec_Bs, gate_ws)):
        cols, n = slice(i * r, (i + 1) * r), bi.shape[0]
        b[row:row + n, cols] = bi
        if gated:
            gw[cols, cols] = gwi
        out.append((a[cols], b[row:row + n, cols], gw[cols, cols] if gated else None, gb[cols] if gated else None))
        row += n
    return out


def _pack_ecs(members) -> None:
    """The members' ECs as one EC of rank ``g·r`` (``merged_ec_views``); each member's parameters become views of
    its blocks (same values, shapes and ``requires_grad``)."""
    names = ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b")
    for m, views in zip(members, merged_ec_views(*_ec_views(members))):
        for name, view in zip(names, views):
            if view is not None:
                setattr(m, name, nn.Parameter(view, requires_grad=getattr(m, name).requires_grad))


@torch.no_grad()
def pack_members(members) -> bool:
    """Lay out one group's weights (and biases, and ECs when all carry one: ``_pack_ecs``) as adjacent row blocks;
    False when they already are."""
    from ..lowering.grouped import adjacent_members, merged_ec
    with_ec = _ec_members(members)
    weights_done = adjacent_members(*([getattr(m.weight, p) for m in members] for p in PARTS),
                                    [m.bias for m in members]) is not None
    ecs_done = not with_ec or merged_ec(*_ec_views(members)) is not None
    if weights_done and ecs_done:
        return False
    if not weights_done:
        weights = [m.weight for m in members]
        joined = {p: torch.cat([getattr(w, p) for w in weights]) for p in PARTS}
        bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
        row = 0
        for mod, w in zip(members, weights):
            rows = slice(row, row + w.shape[0])
            packed = QuantizedWeight(joined["qdata"][rows], joined["scale"][rows], joined["zero"][rows], w.bits,
                                     w.group_size, w.symmetric, w.shape)
            mod.weight = nn.Parameter(packed, requires_grad=False)
            if bias is not None:
                mod.bias = nn.Parameter(bias[rows], requires_grad=mod.bias.requires_grad)
            row += w.shape[0]
    if not ecs_done:
        _pack_ecs(members)
    return True


def pack_siblings(model: nn.Module, example: Optional[dict] = None, group_linears: Optional[bool] = None) -> int:
    """Pack every sibling group of ``model`` (``sibling_groups(model, example)``: found by one eager forward; none
    for a model that is not a Hugging Face causal LM unless ``example`` is given). Returns the groups re-laid.
    Returns 0 without packing when ``SPEAR_PACK_SIBLINGS=0``, when sibling linears are not grouped (``group_linears``,
    default ``SPEAR_GROUP_LINEARS``), or under tensor parallelism (that forward's collectives would need every rank
    to join it). EC'd groups only with ``SPEAR_MERGE_SIBLING_ECS=1``."""
    from .api import sibling_groups
    opts = options.current()
    if not (opts.pack_siblings and (opts.group_linears if group_linears is None else group_linears)):
        return 0
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return 0
    groups = sibling_groups(model, example, with_ec=opts.group_ec_linears and opts.merge_sibling_ecs)
    return sum(pack_members(members) for members in groups)
