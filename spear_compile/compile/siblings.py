"""Sibling quantized linears (q|k|v, gate|up: they read the same input) laid out as one buffer's adjacent row blocks.

``pack_siblings(model)`` copies each group's packed codes, scales and zero points (and biases) into one buffer per
part and makes the members' weights views of their row blocks: same values, shapes and state dict, the same memory
once the old tensors are freed. ``spear::grouped_linear`` then may run the group at M > 16 as one linear of
``N_1 + ... + N_g`` outputs (``lowering.grouped``: one wide GEMM instead of 2-4 narrow ones, each with its fixed
costs). Groups are those the grouping pass fuses (``compile.api.sibling_groups``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import options
from ..quant.weight import QuantizedWeight

PARTS = ("qdata", "scale", "zero")


@torch.no_grad()
def pack_members(members) -> bool:
    """Lay out one group's weights (and biases) as adjacent row blocks; False when they already are."""
    from ..lowering.grouped import adjacent_members
    if adjacent_members(*([getattr(m.weight, p) for m in members] for p in PARTS),
                        [m.bias for m in members]) is not None:
        return False
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
    return True


def pack_siblings(model: nn.Module, example: Optional[dict] = None, group_linears: Optional[bool] = None) -> int:
    """Pack every sibling group of ``model`` (``sibling_groups(model, example)``: found by one eager forward; none
    for a model that is not a Hugging Face causal LM unless ``example`` is given). Returns the groups re-laid.
    Returns 0 without packing when ``SPEAR_PACK_SIBLINGS=0``, when sibling linears are not grouped (``group_linears``,
    default ``SPEAR_GROUP_LINEARS``), or under tensor parallelism (that forward's collectives would need every rank
    to join it)."""
    from .api import sibling_groups
    opts = options.current()
    if not (opts.pack_siblings and (opts.group_linears if group_linears is None else group_linears)):
        return 0
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return 0
    return sum(pack_members(members) for members in sibling_groups(model, example))
