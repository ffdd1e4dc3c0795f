"""Module-tree helpers shared by the packages."""
from __future__ import annotations

import inspect

import torch.nn as nn

# The keyword a Hugging Face forward takes its KV cache under: ``cache`` from transformers 5.2x on (which deprecates
# ``past_key_values``, to be removed in 5.40), ``past_key_values`` before.
CACHE_KWARGS = ("cache", "past_key_values")


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (a dotted path, as ``named_modules`` gives it) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def cache_kwarg(model) -> str:
    """The keyword a model's forward (or ``model`` itself, a forward) takes its KV cache under (in ``CACHE_KWARGS``)."""
    params = inspect.signature(getattr(model, "forward", model)).parameters
    return next((name for name in CACHE_KWARGS if name in params), CACHE_KWARGS[-1])
