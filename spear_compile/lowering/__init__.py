"""Triton kernels for quantized linears (+ EC) and the phase-aware dispatch that picks them."""
from .fused_linear import fused_linear, reference_fused_linear  # noqa: F401  (registers spear::fused_linear)
