"""Module-tree helpers shared by the packages."""
from __future__ import annotations

import torch.nn as nn


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (a dotted path, as ``named_modules`` gives it) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
