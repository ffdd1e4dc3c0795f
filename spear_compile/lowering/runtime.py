"""The process's tuner and decode workspaces: the two objects ``dispatch.launch`` uses (an op has no other way to
reach state). Both are plain objects (``tuner.Tuner``, ``workspace.Workspaces``): a test or bench builds its own or
reads these; nothing else in the package holds mutable state between calls."""
from __future__ import annotations

from .tuner import Tuner
from .workspace import Workspaces

TUNER = Tuner()
WORKSPACES = Workspaces()
