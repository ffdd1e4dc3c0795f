"""All-or-nothing model edits: ``with model_transaction(model): ...`` puts every module back as it
was (its class, attributes, parameters, buffers, submodules, and the data of each tensor) when the
block raises, so a failed ``quantize`` / ``load_ecs`` / ``load_quantized`` / ``optimize`` leaves the
model bit-identical and the call can be retried. Only references are kept: no tensor is copied."""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


def _snapshot(model: nn.Module):
    saved = []
    for mod in model.modules():
        tensors = [(t, t.data) for t in list(mod._parameters.values()) + list(mod._buffers.values())
                   if t is not None and not _is_subclass(t)]
        saved.append((mod, mod.__class__, dict(mod.__dict__), dict(mod._parameters), dict(mod._buffers),
                      dict(mod._modules), tensors))
    return saved


def _is_subclass(t) -> bool:
    from .quant.weight import QuantizedWeight
    return isinstance(t, QuantizedWeight)


def _restore(saved) -> None:
    for mod, cls, attrs, params, buffers, children, tensors in saved:
        mod.__class__ = cls
        mod.__dict__.clear()
        mod.__dict__.update(attrs)
        for key, value in (("_parameters", params), ("_buffers", buffers), ("_modules", children)):
            object.__setattr__(mod, key, value)
        for t, data in tensors:
            if t.data is not data:
                t.data = data


_ABSENT = object()


@contextmanager
def model_transaction(model: nn.Module):
    """Undo every change to ``model``'s module tree made inside the block if the block raises (and
    to a transformers config's ``quantization_config``, which marking a model quantized sets)."""
    saved = _snapshot(model)
    config = getattr(model, "config", None)
    quant_config = getattr(config, "quantization_config", _ABSENT) if config is not None else _ABSENT
    try:
        yield model
    except BaseException:
        _restore(saved)
        if config is not None:
            if quant_config is _ABSENT:
                if hasattr(config, "quantization_config"):
                    delattr(config, "quantization_config")
            else:
                config.quantization_config = quant_config
        raise
