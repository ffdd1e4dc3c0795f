"""Model-level weight-only quantization: swap every target ``nn.Linear`` weight for a
``QuantizedWeight``. Embeddings and ``lm_head`` stay in their float dtype."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torchao.quantization.transform_module import register_quantize_module_handler

from .config import QuantConfig
from ..errors import SpearError
from .weight import QuantizedWeight

DEFAULT_SKIP = ("lm_head",)


def as_config(config: Union[QuantConfig, str]) -> Optional[QuantConfig]:
    return QuantConfig.from_spec(config) if isinstance(config, str) else config


def quantizable_linears(model: nn.Module, targets: Optional[Sequence[str]] = None,
                        skip: Iterable[str] = DEFAULT_SKIP):
    """``[(name, module)]`` of the linears to quantize: all ``nn.Linear`` not named in ``skip``,
    or exactly ``targets`` (each must name an ``nn.Linear``)."""
    modules = dict(model.named_modules())
    if targets is not None:
        out = []
        for t in targets:
            if t not in modules:
                raise SpearError(f"quantize: target {t!r} is not a module of {type(model).__name__}")
            if not isinstance(modules[t], nn.Linear):
                raise SpearError(f"quantize: target {t!r} is a {type(modules[t]).__name__}, not an nn.Linear")
            out.append((t, modules[t]))
        return out
    skip = tuple(skip)
    return [(n, m) for n, m in modules.items()
            if isinstance(m, nn.Linear) and not any(n == s or n.endswith("." + s) for s in skip)]


def quantize_linear_(module: nn.Linear, config: QuantConfig, name: str = "linear") -> nn.Linear:
    """RTN-quantize one linear in place."""
    if isinstance(module.weight, QuantizedWeight):
        raise SpearError(f"{name}: already quantized")
    qw = QuantizedWeight.from_float(module.weight.data, config.bits, config.group_size,
                                    config.symmetric, name=f"{name}.weight")
    module.weight = nn.Parameter(qw, requires_grad=False)
    return module


def quantize(model: nn.Module, config: Union[QuantConfig, str], calib: Optional[torch.Tensor] = None,
             targets: Optional[Sequence[str]] = None, skip: Iterable[str] = DEFAULT_SKIP,
             progress: bool = True) -> nn.Module:
    """Quantize ``model``'s linear layers in place and return it.

    ``config``: a ``QuantConfig`` or a spec string (``"w4-pc-rtn"``). GPTQ needs ``calib``,
    a ``[num_seqs, seq_len]`` LongTensor of calibration tokens.
    """
    config = as_config(config)
    if config is None:
        return model
    linears = quantizable_linears(model, targets, skip)
    if not linears:
        raise SpearError(f"quantize: no nn.Linear to quantize in {type(model).__name__}")
    return METHODS[config.method](model, config, calib, linears, progress)


def _rtn(model, config, calib, linears, progress):
    for name, mod in linears:
        quantize_linear_(mod, config, name)
    return model


def _gptq(model, config, calib, linears, progress):
    from .gptq import gptq_quantize_model
    return gptq_quantize_model(model, config, calib, linears, progress=progress)


# QuantConfig.method -> how a model's linears are quantized (a new scheme: its file and one entry here, and its name
# in config.SUPPORTED_METHODS). A constant table: nothing registers into it at run time.
METHODS = {"rtn": _rtn, "gptq": _gptq}


@register_quantize_module_handler(QuantConfig)
def _torchao_handler(module: nn.Module, config: QuantConfig) -> nn.Module:
    if config.method != "rtn":
        raise SpearError("torchao.quantize_ supports our RTN configs only; GPTQ needs calibration data: use spear_compile.quantize(model, cfg, calib=...)")
    if not isinstance(module, nn.Linear):
        raise SpearError(f"quantize_: {type(module).__name__} is not an nn.Linear")
    return quantize_linear_(module, config)
