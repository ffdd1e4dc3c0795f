"""Model-level weight-only quantization: swap every target ``nn.Linear`` weight for a
``QuantizedWeight``. Embeddings and ``lm_head`` stay in their float dtype."""
from __future__ import annotations

import sys
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torchao.quantization.transform_module import register_quantize_module_handler

from .config import QuantConfig
from ..errors import SpearError
from ..transaction import model_transaction
from .rtn import check_weight
from .weight import QuantizedWeight

DEFAULT_SKIP = ("lm_head",)


def as_config(config: Union[QuantConfig, str, None], where: str = "quant") -> Optional[QuantConfig]:
    """A ``QuantConfig`` (or None for ``"none"``/None) from a spec string or a config; anything else is refused."""
    if config is None or isinstance(config, QuantConfig):
        return config
    if not isinstance(config, str):
        raise SpearError(f"{where}: expected a spec string like 'w4-pc-rtn' or a QuantConfig, "
                         f"got {type(config).__name__}")
    return QuantConfig.from_spec(config)


def weight_matches(weight: QuantizedWeight, config: QuantConfig) -> bool:
    """Whether a quantized weight was made with ``config``'s bits, granularity and symmetry."""
    gs = weight.shape[1] if config.group_size is None else config.group_size
    return (weight.bits, weight.group_size, bool(weight.symmetric)) == (config.bits, gs, config.symmetric)


def describe_weight(weight: QuantizedWeight) -> str:
    gran = "per-channel" if weight.group_size == weight.shape[1] else f"group_size={weight.group_size}"
    return f"{weight.bits}-bit {gran}{' symmetric' if weight.symmetric else ''}"


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
    if not isinstance(model, nn.Module):
        raise SpearError(f"quantize: expected an nn.Module, got {type(model).__name__}")
    config = as_config(config, "quantize")
    if config is None:
        return model
    targets, skip = _names(targets, "targets"), _names(skip, "skip")
    linears = quantizable_linears(model, targets, skip)
    if not linears:
        raise SpearError(f"quantize: no nn.Linear to quantize in {type(model).__name__}")
    for name, mod in linears:  # every check before any weight changes
        if isinstance(mod.weight, QuantizedWeight):
            raise SpearError(f"quantize: {name!r} is already quantized ({describe_weight(mod.weight)}); "
                             f"quantize a fresh floating-point model with {config.spec!r}")
        check_weight(mod.weight, mod.in_features if config.group_size is None else config.group_size, f"{name}.weight")
    METHODS[config.method](model, config, calib, linears, progress)
    _mark_hf(model, config, skip)
    return model


def _rtn(model, config, calib, linears, progress):
    new = [QuantizedWeight.from_float(mod.weight.data, config.bits, config.group_size, config.symmetric,
                                      name=f"{name}.weight") for name, mod in linears]
    for (name, mod), qw in zip(linears, new):  # swap only once every weight is quantized
        mod.weight = nn.Parameter(qw, requires_grad=False)


def _gptq(model, config, calib, linears, progress):
    from .gptq import check_calib_tokens, gptq_quantize_model
    check_calib_tokens(model, calib)
    with model_transaction(model):  # GPTQ quantizes block by block: undo all of it on a failure
        gptq_quantize_model(model, config, calib, linears, progress=progress)


# QuantConfig.method -> how a model's linears are quantized (a new scheme: its file and one entry here, and its name
# in config.SUPPORTED_METHODS). A constant table: nothing registers into it at run time. Each entry changes the model
# only once all of its weights are quantized (or undoes its partial work on a failure).
METHODS = {"rtn": _rtn, "gptq": _gptq}


def _mark_hf(model: nn.Module, config: QuantConfig, skip) -> None:
    """A transformers model becomes saveable with ``save_pretrained`` (``hf_quantizer.py``)."""
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from .hf_quantizer import mark_hf_quantized
        mark_hf_quantized(model, config, skip if skip is not None else DEFAULT_SKIP)


def _names(names, what: str):
    """``targets`` / ``skip`` as a tuple of module names (a lone string is refused: it would iterate characters)."""
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise SpearError(f"quantize: {what} must be a list of module names, got {names!r}")
    return tuple(names)


def _torchao_module_name() -> Optional[str]:
    """The name torchao's ``quantize_`` is visiting: its handler is called with the module only, so
    the name is read from the caller's ``cur_fqn`` (``_replace_with_custom_fn_if_matches_filter``);
    None if torchao changes that (tests/test_hf_and_save.py checks the default skip agrees)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter" and "cur_fqn" in frame.f_locals:
            return str(frame.f_locals["cur_fqn"])[:-1]
        frame = frame.f_back
    return None


@register_quantize_module_handler(QuantConfig)
def _torchao_handler(module: nn.Module, config: QuantConfig) -> nn.Module:
    name = _torchao_module_name()
    if name is not None and any(name == s or name.endswith("." + s) for s in DEFAULT_SKIP):
        return module  # the same default skip as spear_compile.quantize (the LM head stays in float)
    if config.method != "rtn":
        raise SpearError("torchao.quantize_ supports our RTN configs only; GPTQ needs calibration data: "
                         "use spear_compile.quantize(model, cfg, calib=...)")
    if not isinstance(module, nn.Linear):
        raise SpearError(f"quantize_: {type(module).__name__} is not an nn.Linear")
    return quantize_linear_(module, config)
