"""Before compiling: quantized linears read plain tensors instead of the ``QuantizedWeight`` subclass.

A compiled graph whose inputs are tensor subclasses pays on every call for AOT autograd's runtime
unwrapping (``__tensor_flatten__`` per subclass) and for Dynamo's per-subclass metadata guards: host
time per call that grows with the number of quantized linears and that CUDA graphs do not remove.
``unwrap_quantized(model)`` swaps each quantized linear's class for one whose ``forward`` calls
``spear::qlinear`` on the weight's inner tensors, registered as non-persistent buffers (the same
storage, no copy; the state dict is unchanged). The compiler sees the same op with the same
arguments, so the fusion pass matches exactly as before. ``rewrap_quantized`` undoes it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ec.module import CompensatedLinear
from ..quant.weight import QuantizedWeight, check_linear_input

_BUFFERS = ("_spear_qdata", "_spear_scale", "_spear_zero")


def _qlinear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    check_linear_input(x, (mod.out_features, mod.in_features), mod._spear_scale.dtype)  # the subclass's checks
    return torch.ops.spear.qlinear(x, mod._spear_qdata, mod._spear_scale, mod._spear_zero, mod.bias,
                                   mod._spear_group_size)


class PlainQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` with a ``QuantizedWeight`` whose forward reads the weight's inner tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _qlinear(self, x)


class PlainCompensatedLinear(CompensatedLinear):
    """A ``CompensatedLinear`` with a ``QuantizedWeight`` whose forward reads the weight's inner tensors."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _qlinear(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _qlinear(self, x) + self.compensation(x)


_PLAIN = {nn.Linear: PlainQuantizedLinear, CompensatedLinear: PlainCompensatedLinear}
_BACK = {v: k for k, v in _PLAIN.items()}


def unwrap_quantized(model: nn.Module) -> int:
    """Point every quantized linear of ``model`` at plain tensors (in place); returns how many.
    Idempotent: modules already unwrapped get fresh buffers (their weight may have been replaced)."""
    count = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        cls = _BACK.get(type(mod), type(mod))
        if cls not in _PLAIN or not isinstance(w, QuantizedWeight):
            continue
        for name, t in zip(_BUFFERS, (w.qdata, w.scale, w.zero)):
            mod.register_buffer(name, t, persistent=False)
        mod._spear_group_size = w.group_size
        mod.__class__ = _PLAIN[cls]
        count += 1
    return count


def rewrap_quantized(model: nn.Module) -> int:
    """Undo ``unwrap_quantized``: the modules go back to their own classes and forwards."""
    count = 0
    for mod in model.modules():
        if type(mod) in _BACK:
            for name in _BUFFERS:
                del mod._buffers[name]
            mod.__class__ = _BACK[type(mod)]
            count += 1
    return count
