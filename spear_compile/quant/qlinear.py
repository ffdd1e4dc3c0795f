"""The opaque custom op every quantized linear dispatches to: ``spear::qlinear``.

Its implementation is the reference: unpack, dequantize in float32, cast to the activation
dtype, matmul. The compiler pass (``spear_compile.compile.passes``) replaces it, together with an EC
subgraph when present, by ``spear::fused_linear`` whose GPU implementation is a Triton kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .packing import unpack
from .rtn import dequantize


def dequantize_packed(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, dtype) -> torch.Tensor:
    return dequantize(unpack(qdata, k), scale, zero, dtype)


@torch.library.custom_op("spear::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    bias: Optional[torch.Tensor], group_size: int,
) -> torch.Tensor:
    w = dequantize_packed(qdata, scale, zero, x.shape[-1], x.dtype)
    return F.linear(x, w, bias)


@qlinear.register_fake
def _(x, qdata, scale, zero, bias, group_size):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


def _qlinear_setup(ctx, inputs, output):
    x, qdata, scale, zero, bias, group_size = inputs
    ctx.save_for_backward(qdata, scale, zero)
    ctx.k = x.shape[-1]
    ctx.has_bias = bias is not None


def _qlinear_backward(ctx, grad):
    # The quantized weight is frozen: gradients flow to the activation (and bias) only.
    qdata, scale, zero = ctx.saved_tensors
    w = dequantize_packed(qdata, scale, zero, ctx.k, grad.dtype)
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None


qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)
