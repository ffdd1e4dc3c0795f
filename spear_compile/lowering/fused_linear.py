"""``spear::fused_linear``: the op the compiler pass lowers a quantized linear (+ EC) to.

Semantics (reference below): ``qlinear(x) + bias + B (g(A x) ⊙ A x)``, the EC terms present
only when ``ec_A`` is given, the gate only when ``gate_w`` is given:
``g(u) = 2·sigmoid(u gate_wᵀ + gate_b)``.
On CUDA with a 4-bit container and bf16/fp16 activations it runs the Triton kernel chosen by
``dispatch`` for the phase (decode: small M, prefill: large M); everywhere else the reference.
"""
from __future__ import annotations

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


# Both ops are registered on a Library fragment, not with ``torch.library.custom_op``: custom_op runs every call
# through Python autograd, redispatch, dynamo-disable and aliasing-check layers (100-120 us a call on an H100's host,
# ``bench/launch_host_time.py --gpu``), which every quantized linear of a mixed step's eager first run and of its
# CUDA-graph capture paid. They are inference ops: no autograd kernel (the dispatcher's fallback; the trainable path
# is ``spear::qlinear``). ``fused_linear`` / ``grouped_linear`` below are the ops' overloads.
_LIB = torch.library.Library("spear", "FRAGMENT")   # kept alive with the module: dropping it unregisters the ops
_PT2 = (torch.Tag.pt2_compliant_tag,)


def _fused_linear(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    launch = _kernel_path(x, qdata)
    if launch is None:
        return reference_fused_linear(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)
    return launch(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)


_LIB.define("fused_linear(Tensor x, Tensor qdata, Tensor scale, Tensor zero, Tensor? bias, SymInt group_size, "
            "Tensor? ec_A, Tensor? ec_B, Tensor? gate_w, Tensor? gate_b) -> Tensor", tags=_PT2)
_LIB.impl("fused_linear", _fused_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spear::fused_linear", lib=_LIB)
def _(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


fused_linear = torch.ops.spear.fused_linear.default


# ---- horizontal fusion: sibling linears of the same x ------------------------------------------
def reference_grouped_linear(x, qdata, scale, zero, bias, group_size):
    return torch.cat([reference_fused_linear(x, q, s, z, b, group_size)
                      for q, s, z, b in zip(qdata, scale, zero, bias)], dim=-1)


def _grouped_linear(x, qdata, scale, zero, bias, group_size):
    """``cat([qlinear_i(x) + bias_i for i], -1)``: 2-4 quantized linears of the same ``x`` (same K, group size,
    dtype; ``bias`` entries all tensors or all None) in one op. The pass ``group_sibling_linears`` makes it of sibling
    ``spear::fused_linear``s without EC and slices its output per member; on CUDA one grouped kernel launch."""
    launch = _kernel_path(x, qdata[0])
    if launch is None:
        return reference_grouped_linear(x, qdata, scale, zero, bias, group_size)
    from .grouped import launch_grouped
    return launch_grouped(x, qdata, scale, zero, bias, group_size)


_LIB.define("grouped_linear(Tensor x, Tensor[] qdata, Tensor[] scale, Tensor[] zero, Tensor?[] bias, "
            "SymInt group_size) -> Tensor", tags=_PT2)
_LIB.impl("grouped_linear", _grouped_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spear::grouped_linear", lib=_LIB)
def _(x, qdata, scale, zero, bias, group_size):
    return x.new_empty(*x.shape[:-1], sum(q.shape[0] for q in qdata))


grouped_linear = torch.ops.spear.grouped_linear.default


# ---- sibling linears that all carry an EC --------------------------------------------------------
def reference_grouped_linear_ec(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    return torch.cat([reference_fused_linear(x, *member, group_size, *ec)
                      for member, ec in zip(zip(qdata, scale, zero, bias), zip(ec_A, ec_B, gate_w, gate_b))], dim=-1)


def _grouped_linear_ec(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    """``cat([fused_linear_i(x) for i], -1)`` for 2-4 sibling linears of the same ``x`` that all carry an EC of one
    rank, all gated or all static (``group_sibling_linears`` makes it): on CUDA at M 2..512 one batched launch
    with every member's EC (after ``ec_gu_kernel``'s g(u) ⊙ u), where the tuner finds it faster than the members'
    own launches; elsewhere one launch per member."""
    launch = _kernel_path(x, qdata[0])
    if launch is None:
        return reference_grouped_linear_ec(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)
    from .grouped import launch_grouped_ec
    return launch_grouped_ec(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b)


_LIB.define("grouped_linear_ec(Tensor x, Tensor[] qdata, Tensor[] scale, Tensor[] zero, Tensor?[] bias, "
            "SymInt group_size, Tensor[] ec_A, Tensor[] ec_B, Tensor?[] gate_w, Tensor?[] gate_b) -> Tensor", tags=_PT2)
_LIB.impl("grouped_linear_ec", _grouped_linear_ec, "CompositeExplicitAutograd")


@torch.library.register_fake("spear::grouped_linear_ec", lib=_LIB)
def _(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b):
    return x.new_empty(*x.shape[:-1], sum(q.shape[0] for q in qdata))


grouped_linear_ec = torch.ops.spear.grouped_linear_ec.default
