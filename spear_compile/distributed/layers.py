"""Row-parallel linears (o_proj, down_proj): each rank holds a K-slice; the partial sums are all-reduced.

The reductions are ``torch.distributed._functional_collectives.all_reduce`` (traceable: under
``torch.compile`` they become ``_c10d_functional.all_reduce`` + ``wait_tensor`` nodes, and CUDA graphs
capture them), on the process group named by ``tp_group`` (a string, so Dynamo treats it as a constant).

With an EC, ``u = A x`` is a partial sum too (``A`` is sliced like ``W``), so it is all-reduced before the
gate (the "fallback" of issue 19; on GPUs the ``spear`` backend's pass ``compile/passes/peer_reduce_row_ec.py``
replaces it with ``peer_reduce.py``'s epilogue in layers given a workspace slot). ``B`` and the gate
are whole on every rank and act on the full ``u``, so the EC term ``v`` (and the bias) are added once,
after the y all-reduce:

    y = all_reduce(W_local x_local) + b + B (g(u) ⊙ u),   u = all_reduce(A_local x_local)

The local product reads the quantized weight's inner tensors (registered as non-persistent buffers, as
``spear_compile.unwrap`` does), so a compiled graph sees plain tensors and the same ``spear::qlinear``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import qlinear as _qlinear_op  # noqa: F401  (registers spear::qlinear)
from ..ec.module import CompensatedLinear
from ..quant.weight import QuantizedWeight, check_linear_input
from .peer_reduce import SLOT_FIELDS  # (also registers spear::peer_reduce_row_ec / _slot)

if torch.distributed.is_available():  # (builds without it: ``parallelize`` refuses before any layer runs)
    from torch.distributed import _functional_collectives as funcol

_INNER = ("_spear_qdata", "_spear_scale", "_spear_zero")


def all_reduce_sum(t: torch.Tensor, group: str) -> torch.Tensor:
    """Sum over the tensor-parallel group (functional: returns a new tensor, traceable)."""
    return funcol.all_reduce(t, "sum", group)


class _RowParallel:
    """Shared by the two row-parallel classes: the local (bias-free) product on the K-slice."""

    tp_group: str
    tp_rank: int
    tp_world: int

    def _local_product(self, x: torch.Tensor) -> torch.Tensor:
        if "_spear_qdata" in self._buffers:
            check_linear_input(x, (self.out_features, self.in_features), self._spear_scale.dtype)
            return torch.ops.spear.qlinear(x, self._spear_qdata, self._spear_scale, self._spear_zero, None,
                                           self._spear_group_size)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, row_parallel=rank {self.tp_rank}/{self.tp_world}"


class RowParallelLinear(_RowParallel, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_sum(self._local_product(x), self.tp_group)
        return y if self.bias is None else y + self.bias


class RowParallelCompensatedLinear(_RowParallel, CompensatedLinear):
    peer_args = None  # set by ``peer_reduce.enable_peer_reduce``: this layer's slot of the u exchange

    def attach_peer_reduce(self, args: dict, epoch: torch.Tensor, done: torch.Tensor) -> None:
        """Give the layer a workspace slot (``PeerReduceWorkspace.slot_args`` and the slot's counters): its
        forward then marks ``u``'s partial with ``spear::peer_reduce_slot``, which the ``spear`` backend's pass
        turns into the peer-reduction epilogue where it applies (CUDA, M <= 16) and removes elsewhere."""
        self.peer_args = dict(args)
        self.register_buffer("_peer_epoch", epoch, persistent=False)
        self.register_buffer("_peer_done", done, persistent=False)

    def compensation(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(x, self.ec_A)
        if self.peer_args is not None:
            u = torch.ops.spear.peer_reduce_slot(u, self._peer_epoch, self._peer_done,
                                                 *(self.peer_args[k] for k in SLOT_FIELDS))
        u = all_reduce_sum(u, self.tp_group)
        if self.gate == "sigmoid":
            u = u * (2.0 * torch.sigmoid(F.linear(u, self.ec_gate_w, self.ec_gate_b)))
        return F.linear(u, self.ec_B)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_sum(self._local_product(x), self.tp_group)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fallback, always: the pass matches exactly this form (qlinear -> all_reduce -> wait [+ bias],
        # x Aᵀ -> [slot mark] -> all_reduce -> wait -> gate -> Bᵀ, add) and rewrites it.
        y = all_reduce_sum(self._local_product(x), self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y + self.compensation(x)


_ROW_CLASS = {nn.Linear: RowParallelLinear, CompensatedLinear: RowParallelCompensatedLinear}


def make_row_parallel(mod: nn.Linear, group: str, rank: int, world: int) -> nn.Linear:
    """Turn an (already K-sliced) ``nn.Linear`` / ``CompensatedLinear`` into its row-parallel class in
    place; call again after its weight is replaced (the inner-tensor buffers are re-bound)."""
    base = next(b for b in type(mod).__mro__ if b in _ROW_CLASS)
    mod.__class__ = _ROW_CLASS[base]
    mod.tp_group, mod.tp_rank, mod.tp_world = group, rank, world
    for name in _INNER:
        mod._buffers.pop(name, None)
    w = mod.weight
    if isinstance(w, QuantizedWeight):
        for name, t in zip(_INNER, (w.qdata, w.scale, w.zero)):
            mod.register_buffer(name, t, persistent=False)
        mod._spear_group_size = w.group_size
    return mod

