"""``QuantizedWeight``: a torchao tensor subclass holding a packed low-bit linear weight.

``F.linear(x, qweight, bias)`` dispatches to the opaque op ``spear::qlinear`` so that
``torch.compile`` sees one node per quantized linear, which the compiler pass then fuses.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torchao.utils import TorchAOBaseTensor

from . import qlinear as ops  # noqa: F401  (registers spear::qlinear)
from ..errors import SpearError
from .packing import pack, unpack
from .rtn import check_weight, dequantize, rtn

aten = torch.ops.aten


class QuantizedWeight(TorchAOBaseTensor):
    """Packed weight ``[N, K]``.

    Tensor data: ``qdata`` uint8 (``[N, K/2]`` two codes per byte for bits <= 4, ``[N, K]`` for 8),
    ``scale`` and ``zero`` ``[N, K / group_size]`` in the activation dtype.
    Attributes: ``bits`` (nominal), ``group_size`` (``K`` for per-channel), ``symmetric``, ``shape``.
    """

    tensor_data_names = ["qdata", "scale", "zero"]
    tensor_attribute_names = ["bits", "group_size", "symmetric", "shape"]

    def __new__(cls, qdata, scale, zero, bits, group_size, symmetric, shape):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, device=qdata.device, dtype=scale.dtype, requires_grad=False
        )

    def __init__(self, qdata, scale, zero, bits, group_size, symmetric, shape):
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.zero = zero
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool) -> "QuantizedWeight":
        n, k = q.shape
        container = 4 if bits <= 4 else 8
        return cls(pack(q, container), scale.contiguous(), zero.contiguous(), bits, group_size,
                   symmetric, torch.Size((n, k)))

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int = 4, group_size: Optional[int] = None,
                   symmetric: bool = False, name: str = "weight") -> "QuantizedWeight":
        gs = w.shape[-1] if group_size is None else group_size
        check_weight(w, gs, name)
        q, scale, zero = rtn(w.detach(), bits, gs, symmetric)
        return cls.from_codes(q, scale, zero, bits, gs, symmetric)

    # ---- views --------------------------------------------------------------------------
    @property
    def container_bits(self) -> int:
        return 4 if self.qdata.shape[-1] * 2 == self.shape[1] else 8

    def codes(self) -> torch.Tensor:
        return unpack(self.qdata, self.shape[1])

    def dequantize(self, dtype=None) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.zero, dtype or self.dtype)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero))

    def _stable_hash_for_caching(self) -> str:
        """Metadata-only key for the AOT autograd cache (values never enter a compiled graph's key)."""
        inner = [(tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in (self.qdata, self.scale, self.zero)]
        meta = (type(self).__qualname__, tuple(self.shape), str(self.dtype), self.device.type,
                self.bits, self.group_size, self.symmetric, inner)
        return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()

    def _quantization_type(self):
        return f"shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


# torch.load(weights_only=True) of a state dict holding QuantizedWeight (as torchao does for its tensors)
torch.serialization.add_safe_globals([QuantizedWeight])

implements = QuantizedWeight.implements
implements_torch_function = QuantizedWeight.implements_torch_function


def check_linear_input(x: torch.Tensor, weight_shape: tuple, dtype: torch.dtype) -> None:
    """The input checks of a quantized linear (the subclass's ``F.linear`` and the unwrapped forward)."""
    if x.shape[-1] != weight_shape[1]:
        raise SpearError(f"quantized linear: input has {x.shape[-1]} features, weight expects K={weight_shape[1]} "
                         f"(weight shape {weight_shape})")
    if x.dtype != dtype:
        raise SpearError(f"quantized linear: activation dtype {x.dtype} does not match the weight's "
                         f"compute dtype {dtype}")


@implements([aten.linear.default])
@implements_torch_function([torch.nn.functional.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    check_linear_input(x, tuple(w.shape), w.dtype)
    return torch.ops.spear.qlinear(x, w.qdata, w.scale, w.zero, bias, w.group_size)


@implements([aten.to.dtype_layout])
def _to_dtype_layout(func, types, args, kwargs):
    return _to_copy(func, types, args, {k: v for k, v in kwargs.items() if k in ("dtype", "device")})


@implements([aten._to_copy.default])
def _to_copy(func, types, args, kwargs):
    """``.to(device)`` moves the inner tensors (torchao's ``_get_to_kwargs``); ``.to(dtype)`` / ``.half()``
    re-expresses the weight in another float dtype: same codes, scale cast (refused if it overflows),
    integer zeros exact. A non-float dtype is refused rather than ignored."""
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype, non_blocking = to["device"], to["dtype"], to.get("non_blocking", False)
    if not dtype.is_floating_point:
        raise SpearError(f"QuantizedWeight: cannot convert a quantized weight to {dtype}; use .dequantize() first")
    qdata = self.qdata.to(device, non_blocking=non_blocking)
    scale = self.scale.to(device=device, dtype=dtype, non_blocking=non_blocking)
    zero = self.zero.to(device=device, dtype=dtype, non_blocking=non_blocking)
    if dtype != self.dtype and not torch.isfinite(scale).all():
        raise SpearError(f"QuantizedWeight {tuple(self.shape)}: its scales overflow {dtype}; keep {self.dtype}")
    return QuantizedWeight(qdata, scale, zero, self.bits, self.group_size, self.symmetric, self.shape)


@implements([aten.t.default])
def _t(func, types, args, kwargs):
    raise SpearError("QuantizedWeight: transposing a packed weight is not supported; use F.linear or .dequantize()")
