"""Bytes a model holds, counting each shared tensor once and a QuantizedWeight by what it stores."""
from __future__ import annotations

import torch.nn as nn

from .weight import QuantizedWeight


def model_bytes(model: nn.Module) -> dict:
    """``{"total", "quantized_weights", "quantized_weights_nominal", "ec", "other"}`` in bytes.

    ``quantized_weights`` counts the packed container (4 bits for 2/3/4-bit codes) plus
    scales and zeros; ``quantized_weights_nominal`` counts codes at their nominal bit width.
    """
    seen = set()
    out = dict(total=0, quantized_weights=0, quantized_weights_nominal=0, ec=0, other=0)
    for name, p in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if isinstance(p, QuantizedWeight):
            n, k = p.shape
            side = p.stored_bytes() - p.qdata.numel() * p.qdata.element_size()
            out["quantized_weights"] += p.stored_bytes()
            out["quantized_weights_nominal"] += n * k * p.bits // 8 + side
            out["total"] += p.stored_bytes()
            continue
        nbytes = p.numel() * p.element_size()
        out["total"] += nbytes
        out["ec" if name.rsplit(".", 1)[-1].startswith("ec_") else "other"] += nbytes
    return out
