"""An EC linear as the C input of an EC-free W4 kernel (``CInConfig``).

Above M = 16 the fastest W4 kernels of a key without EC (the Gluon swap kernel, the batched kernel over a packed
sibling group, dequantize + cuBLAS) have no EC epilogue, so an EC key fell back to slower kernels that carry one
(sessions 34-35: the EC on all 7 linears cost 1.3-1.9x the EC-off layer). Here the EC term goes first:
``v = g(u) ⊙ u`` by the EC prologue, ``y = v Bᵀ (+ bias)`` by cuBLAS (r is tiny: both are small launches), and then
the EC-free kernel adds ``x Wᵀ`` into y in its epilogue, in fp32, so the output is rounded once as in a fused
kernel. The tuner offers it over the EC-free key's fastest configs (``candidates``), beside the Gluon swap kernel with
the EC in its own epilogue (``gluon_w4.run_single``: one launch fewer, where it fits the registers).
"""
from __future__ import annotations

from typing import List

from . import batched, gluon_w4
from .configs import CInConfig, DequantCublasConfig, GluonW4Config
from .prefill import dequantize_w4, ec_prologue, mm_into

TOP_BASES = 2  # the EC-free key's fastest configs that accumulate, each offered under the EC


def accumulates(cfg) -> bool:
    """Whether ``cfg``'s kernel can add into y (the bases ``CInConfig`` takes)."""
    return (isinstance(cfg, (batched.BatchedConfig, DequantCublasConfig))
            or (isinstance(cfg, GluonW4Config) and cfg.variant == "swap"))


def candidates(ranked_ec_free) -> List[CInConfig]:
    """``CInConfig`` candidates of an EC key over its EC-free key's ranked configs (fastest first): the first
    ``TOP_BASES`` that accumulate, with the one-launch prologue; the fastest also with the split-K prologue."""
    bases = [c for c in ranked_ec_free if accumulates(c)][:TOP_BASES]
    out = [CInConfig(b) for b in bases]
    return out + [CInConfig(bases[0], split=True)] if bases else out


def run_c_in(cfg: CInConfig, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """``dispatch``'s runner signature: ``y = v Bᵀ (+ bias)``, then ``+= x Wᵀ`` by ``cfg.base`` (see the module
    docstring); ``u``: a given ``x Aᵀ`` (the tensor-parallel hook) instead of the prologue's projection."""
    v = ec_prologue(x2, ec_A, u, gate_w, gate_b, ec_B.shape[1], split=cfg.split)
    mm_into(v, ec_B, bias, y)
    base = cfg.base
    if isinstance(base, batched.BatchedConfig):
        batched.run_members(base, x2, [batched.Member(qdata, scale, zero)], group_size, y, accumulate=True)
    elif isinstance(base, GluonW4Config):
        gluon_w4.run_gluon_w4(x2, qdata, scale, zero, None, group_size, y, base, accumulate=True)
    else:
        y.addmm_(x2, dequantize_w4(qdata, scale, zero, group_size, x2.dtype).t())
    return y
