"""Where each rank's shard lies, and the slicing of one linear (plain or ``QuantizedWeight``, with its EC).

Pure functions of ``(rank, world_size)``: no process group, so the shard math is tested in one process.

Split rule: a dimension is cut on boundaries of a *unit* (an attention head, a KV-head group, a
quantization group, a fixed block of MLP channels) and ranks get ``units // world`` or one more unit
(the first ``units % world`` ranks), so TP = 3 works where heads and widths do not divide evenly.

Column-parallel (q/k/v/gate/up): a rank keeps some output rows ``N``: the packed codes, scales and zeros
are row-sliced (any granularity), the EC keeps ``A`` and the gate whole and slices ``B`` by the same rows.
Row-parallel (o/down): a rank keeps a slice ``[k0, k1)`` of the input columns ``K``: codes on even
columns (two per byte), scales and zeros on group boundaries (per-channel: whole, the local group being
``k1 - k0``), the EC's ``A`` by the same columns, ``B`` and the gate whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..ec.module import CompensatedLinear
from ..errors import SpearError
from ..quant.weight import QuantizedWeight


def split_counts(units: int, world: int, what: str = "dimension") -> List[int]:
    """``units`` split over ``world`` ranks as evenly as possible (sizes differ by at most one)."""
    if world < 1:
        raise SpearError(f"tensor parallel: world size must be >= 1, got {world}")
    if units < world:
        raise SpearError(f"tensor parallel: {what} has {units} unit(s), fewer than the {world} ranks")
    base, extra = divmod(units, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def split_range(total: int, unit: int, rank: int, world: int, what: str = "dimension") -> Tuple[int, int]:
    """``[start, stop)`` of ``rank``'s part of ``total`` elements cut on multiples of ``unit``."""
    if unit <= 0 or total % unit:
        raise SpearError(f"tensor parallel: {what} of size {total} is not a multiple of the shard unit {unit}")
    counts = split_counts(total // unit, world, what)
    start = sum(counts[:rank]) * unit
    return start, start + counts[rank] * unit


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads ``[q0, q1)`` and, in local order, the KV heads it
    keeps (a KV head is repeated on every rank that has one of its query heads; when the local
    query heads do not map onto the local KV heads in equal runs, one KV head per query head)."""

    q0: int
    q1: int
    kv_heads: Tuple[int, ...]

    @property
    def num_heads(self) -> int:
        return self.q1 - self.q0

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world: int) -> HeadShard:
    """Query heads cut on KV-group boundaries when there are at least as many KV heads as ranks
    (sizes differ by one group), else on head boundaries (sizes differ by one head)."""
    if num_heads % num_kv_heads:
        raise SpearError(f"tensor parallel: {num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        k0, k1 = split_range(num_kv_heads, 1, rank, world, "KV heads")
        return HeadShard(k0 * group, k1 * group, tuple(range(k0, k1)))
    q0, q1 = split_range(num_heads, 1, rank, world, "attention heads")
    owners = [q // group for q in range(q0, q1)]
    kv = tuple(dict.fromkeys(owners))
    runs = [owners.count(h) for h in kv]
    if len(set(runs)) != 1:  # e.g. heads {2, 3, 4} of groups of 3: KV 0 serves one, KV 1 two
        kv = tuple(owners)
    return HeadShard(q0, q1, kv)


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a ``[heads * head_dim, K]`` projection."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


# ---- slicing one linear ------------------------------------------------------------------------
def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, rows.to(t.device)).contiguous()


def slice_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output rows ``rows`` of a linear weight (``QuantizedWeight`` or float)."""
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(_rows(weight.qdata, rows), _rows(weight.scale, rows), _rows(weight.zero, rows),
                               weight.bits, weight.group_size, weight.symmetric,
                               torch.Size((rows.numel(), weight.shape[1])))
    return _rows(weight.detach(), rows)


def check_column_cut(weight: torch.Tensor, k0: int, k1: int, name: str) -> None:
    """A row-parallel cut ``[k0, k1)`` must fall on a quantization group (and a packed byte)."""
    if not isinstance(weight, QuantizedWeight):
        return
    per_channel = weight.group_size == weight.shape[1]
    unit = 2 if per_channel else weight.group_size
    if k0 % unit or k1 % unit:
        raise SpearError(f"tensor parallel: {name}: the row-parallel cut [{k0}, {k1}) of K={weight.shape[1]} "
                         "does not fall "
                         f"on {'a packed byte (even column)' if per_channel else f'a quantization group of {unit}'} "
                         f"boundary; use a per-channel config or a shard unit that is a multiple of {unit}")


def slice_columns(weight: torch.Tensor, k0: int, k1: int, name: str = "linear") -> torch.Tensor:
    """The input columns ``[k0, k1)`` of a linear weight (``QuantizedWeight`` or float)."""
    if not isinstance(weight, QuantizedWeight):
        return weight.detach()[:, k0:k1].contiguous()
    check_column_cut(weight, k0, k1, name)
    n, k = weight.shape
    per_channel = weight.group_size == k
    codes_per_byte = 2 if weight.container_bits == 4 else 1
    qdata = weight.qdata[:, k0 // codes_per_byte:k1 // codes_per_byte].contiguous()
    if per_channel:  # one scale per row, valid for any subset of its columns
        scale, zero, group = weight.scale.clone(), weight.zero.clone(), k1 - k0
    else:
        g0, g1 = k0 // weight.group_size, k1 // weight.group_size
        scale, zero, group = weight.scale[:, g0:g1].contiguous(), weight.zero[:, g0:g1].contiguous(), weight.group_size
    return QuantizedWeight(qdata, scale, zero, weight.bits, group, weight.symmetric, torch.Size((n, k1 - k0)))


def _param(t: Optional[torch.Tensor], like: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t, requires_grad=bool(like is not None and like.requires_grad) and t.is_floating_point()
                        and not isinstance(t, QuantizedWeight))


@torch.no_grad()
def shard_column_(mod: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """Keep output rows ``rows`` of ``mod`` (and of its bias and EC ``B``), in place."""
    mod.weight = _param(slice_rows(mod.weight, rows), mod.weight)
    if mod.bias is not None:
        mod.bias = _param(_rows(mod.bias.detach(), rows), mod.bias)
    if isinstance(mod, CompensatedLinear):
        mod.ec_B = _param(_rows(mod.ec_B.detach(), rows), mod.ec_B)
    mod.out_features = rows.numel()
    return mod


@torch.no_grad()
def shard_row_(mod: nn.Linear, k0: int, k1: int, name: str = "linear") -> nn.Linear:
    """Keep input columns ``[k0, k1)`` of ``mod`` (and of its EC ``A``), in place. The bias, ``B`` and
    the gate stay whole: a row-parallel layer adds them once, after the reductions."""
    mod.weight = _param(slice_columns(mod.weight, k0, k1, name), mod.weight)
    if isinstance(mod, CompensatedLinear):
        mod.ec_A = _param(mod.ec_A.detach()[:, k0:k1].contiguous(), mod.ec_A)
    mod.in_features = k1 - k0
    return mod
