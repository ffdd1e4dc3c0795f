"""``SpearGraphPass``: what every pass of the pass manager is (in the spirit of vLLM's ``InductorPass``).

A pass rewrites a post-grad FX graph in place and returns how many rewrites it made; it records what it saw in the
``PassContext``'s ``CompileRecords`` (``compile.records``). ``uuid()`` is the hash of the pass's own source file plus
its ``settings()`` (what besides the source changes the graph it writes): the pass manager composes them into the
key Inductor's FX graph cache uses, so a cached graph is never reused across a changed pass or setting.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch._inductor.custom_graph_pass import get_hash_for_files

from ..records import PassContext


class SpearGraphPass:
    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        raise NotImplementedError

    def settings(self) -> tuple:
        return ()

    def uuid(self) -> Any:
        return (get_hash_for_files((inspect.getfile(type(self)),)), self.settings())
