"""Round-to-nearest quantization math: quantization parameters, quantize, dequantize.

Convention (shared by every quantizer and kernel): unsigned codes ``q`` in ``[0, 2^b - 1]``,
``w ≈ (q - zero) * scale`` per group of ``group_size`` consecutive input channels.
Asymmetric: min/max over the group (range widened to include 0), integer zero point.
Symmetric: ``scale = absmax / (2^(b-1) - 1)``, ``zero = 2^(b-1)``.
Scales and zeros have shape ``[N, K // group_size]`` and the weight's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import SpearError


def check_weight(w: torch.Tensor, group_size: int, name: str = "weight") -> None:
    if w.ndim != 2:
        raise SpearError(f"{name}: expected a 2-D linear weight [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise SpearError(f"{name}: expected a floating-point weight, got {w.dtype}")
    n, k = w.shape
    if k % group_size:
        raise SpearError(f"{name}: in_features K={k} (shape {tuple(w.shape)}) is not divisible by "
                         f"group_size={group_size}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise SpearError(f"{name}: weight of shape {tuple(w.shape)} has {bad} NaN/inf values")


def qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Scale and zero ``[N, K // group_size]`` (float32) for weight ``w [N, K]``."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = g.abs().amax(-1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
    else:
        lo = g.amin(-1).clamp(max=0)
        hi = g.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def zeros_problem(zero: torch.Tensor, bits: int) -> Optional[str]:
    """Why ``zero`` is not a valid zero-point tensor (integers in ``[0, 2^bits - 1]``, what ``qparams`` makes; the
    batched kernel's ``zsub`` tile holds ``q - zero`` exactly only then), or None when it is."""
    if not zero.numel():
        return None
    z = zero.float()
    if not bool((z == z.round()).all()):
        return "holds non-integer zero points"
    lo, hi = float(z.min()), float(z.max())
    if lo < 0 or hi > 2 ** bits - 1:
        return f"holds zero points in [{lo:g}, {hi:g}], outside [0, {2 ** bits - 1}] for {bits}-bit codes"
    return None


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` (uint8) for ``w`` under given per-group ``scale``/``zero`` (broadcast over groups)."""
    n, k = w.shape
    groups = scale.shape[-1]
    g = w.float().reshape(n, groups, k // groups)
    q = torch.round(g / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).reshape(n, k).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=None) -> torch.Tensor:
    """Reference dequantization of unpacked codes ``[N, K]``: ``(q - zero) * scale`` in float32."""
    n, k = q.shape
    groups = scale.shape[-1]
    w = (q.float().reshape(n, groups, k // groups) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    w = w.reshape(n, k)
    return w if dtype is None else w.to(dtype)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest: returns codes ``[N, K]`` uint8, scale and zero in ``w.dtype``.

    Scale and zero are rounded to the weight dtype *before* the codes are computed, so the
    stored parameters are exactly the ones the codes were chosen for.
    """
    scale, zero = qparams(w, bits, group_size, symmetric)
    scale, zero = scale.to(w.dtype), zero.to(w.dtype)
    return quantize_with(w, scale, zero, bits), scale, zero
