"""``spear::fused_linear``: the op the compiler pass lowers a quantized linear (+ EC) to.

Semantics (reference below): ``qlinear(x) + bias + B (g(A x) ⊙ A x)``, the EC terms present
only when ``ec_A`` is given, the gate only when ``gate_w`` is given:
``g(u) = 2·sigmoid(u gate_wᵀ + gate_b)``.
On CUDA with a 4-bit container and bf16/fp16 activations it runs the Triton kernel chosen by
``dispatch`` for the phase (decode: small M, prefill: large M); everywhere else the reference.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..ec.module import gated
from ..quant.qlinear import dequantize_packed


def reference_fused_linear(x, qdata, scale, zero, bias, group_size, ec_A=None, ec_B=None, gate_w=None, gate_b=None):
    w = dequantize_packed(qdata, scale, zero, x.shape[-1], x.dtype)
    y = F.linear(x, w, bias)
    if ec_A is not None:
        u = F.linear(x, ec_A)
        if gate_w is not None:
            u = gated(u, gate_w, gate_b)
        y = y + F.linear(u, ec_B)
    return y


def _kernel_path(x, qdata):
    """The Triton launcher for this call, or None for the reference path."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or qdata.shape[-1] * 2 != x.shape[-1]:
        return None
    try:
        from .dispatch import launch  # provided by the lowering (kernels) module
    except ImportError:
        return None
    return launch


@torch.library.custom_op("spear::fused_linear", mutates_args=())
def fused_linear(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    bias: Optional[torch.Tensor], group_size: int,
    ec_A: Optional[torch.Tensor], ec_B: Optional[torch.Tensor],
    gate_w: Optional[torch.Tensor], gate_b: Optional[torch.Tensor],
) -> torch.Tensor:
    launch = _kernel_path(x, qdata)
    if launch is None:
        return reference_fused_linear(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)
    return launch(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)


@fused_linear.register_fake
def _(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


# ---- horizontal fusion: sibling linears of the same x ------------------------------------------
def reference_grouped_linear(x, qdata, scale, zero, bias, group_size):
    return torch.cat([reference_fused_linear(x, q, s, z, b, group_size)
                      for q, s, z, b in zip(qdata, scale, zero, bias)], dim=-1)


@torch.library.custom_op("spear::grouped_linear", mutates_args=())
def grouped_linear(
    x: torch.Tensor, qdata: List[torch.Tensor], scale: List[torch.Tensor], zero: List[torch.Tensor],
    bias: List[Optional[torch.Tensor]], group_size: int,
) -> torch.Tensor:
    """``cat([qlinear_i(x) + bias_i for i], -1)``: 2-4 quantized linears of the same ``x`` (same K, group size,
    dtype; ``bias`` entries all tensors or all None) in one op. The pass ``group_sibling_linears`` makes it of sibling
    ``spear::fused_linear``s without EC and slices its output per member; on CUDA one grouped kernel launch."""
    launch = _kernel_path(x, qdata[0])
    if launch is None:
        return reference_grouped_linear(x, qdata, scale, zero, bias, group_size)
    from .grouped import launch_grouped
    return launch_grouped(x, qdata, scale, zero, bias, group_size)


@grouped_linear.register_fake
def _(x, qdata, scale, zero, bias, group_size):
    return x.new_empty(*x.shape[:-1], sum(q.shape[0] for q in qdata))
