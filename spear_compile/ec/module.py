"""Error Compensator: a gated low-rank correction beside a quantized linear.

``y = W_q x + b + B (g(A x) ⊙ A x)`` with ``A: [r, K]``, ``B: [N, r]`` and, for the
``"sigmoid"`` gate, ``g(u) = 2·sigmoid(u W_gᵀ + b_g)`` (``W_g: [r, r]``; zeros give g ≡ 1).
``gate="none"`` is the static (EoRA/QERA-like) correction ``B A x``.

The forward is plain aten ops on top of the quantized linear's op so that the compiler pass
can match the whole chain and fuse it into one kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SpearError

GATES = ("sigmoid", "none")


def gated(u: torch.Tensor, gate_w: torch.Tensor, gate_b) -> torch.Tensor:
    """``g(u) ⊙ u`` with ``g(u) = 2·sigmoid(u W_gᵀ + b_g)``: the EC gate, written here only (the module's forward,
    the reference ops, the compiler's fallbacks and the tuner's reference call this; the kernels implement it)."""
    return u * (2.0 * torch.sigmoid(F.linear(u, gate_w, gate_b)))


def ec_shapes(n: int, k: int, rank: int, gate: str) -> dict:
    """``{param name: shape}`` of an EC on an ``[N, K]`` linear: ``A [r, K]``, ``B [N, r]`` and,
    gated, ``W_g [r, r]``, ``b_g [r]``."""
    shapes = {"ec_A": (rank, k), "ec_B": (n, rank)}
    if gate == "sigmoid":
        shapes.update(ec_gate_w=(rank, rank), ec_gate_b=(rank,))
    return shapes


class CompensatedLinear(nn.Linear):
    """An ``nn.Linear`` (weight usually a ``QuantizedWeight``) plus an EC.

    Keeps the parameter names ``weight``/``bias`` so state dicts of the base model still apply;
    the EC's own parameters are ``ec_A``, ``ec_B``, ``ec_gate_w``, ``ec_gate_b``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, gate: str = "sigmoid",
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_ec(rank, gate, device, dtype)

    def _init_ec(self, rank: int, gate: str, device, dtype):
        k, n = self.in_features, self.out_features
        if gate not in GATES:
            raise SpearError(f"CompensatedLinear: unknown gate {gate!r}; supported: {GATES}")
        if rank < 0 or rank > min(n, k):
            raise SpearError(f"CompensatedLinear: rank={rank} must be in [0, min(N={n}, K={k})]")
        self.rank, self.gate = rank, gate
        self.ec_gate_w = self.ec_gate_b = None
        for name, shape in ec_shapes(n, k, rank, gate).items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, gate: str = "sigmoid", dtype=None) -> "CompensatedLinear":
        """A CompensatedLinear sharing ``linear``'s weight and bias, with a zero EC (output unchanged)."""
        if not isinstance(linear, nn.Linear):
            raise SpearError(f"CompensatedLinear.wrap: expected nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_ec(rank, gate, linear.weight.device, dtype or linear.weight.dtype)
        return new

    def unwrap(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def compensation(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(x, self.ec_A)
        if self.gate == "sigmoid":
            u = gated(u, self.ec_gate_w, self.ec_gate_b)
        return F.linear(u, self.ec_B)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear without its EC (what serving runs with the ECs switched off)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.compensation(x)

    def ec_parameters(self):
        return [p for p in (self.ec_A, self.ec_B, self.ec_gate_w, self.ec_gate_b) if p is not None]

    def ec_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ec_parameters())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, gate={self.gate}"
