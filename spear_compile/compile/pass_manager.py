"""``SpearPassManager``: the Inductor post-grad custom pass (the backend installs it as
``post_grad_custom_pre_pass``, see ``backend.py``) that runs our passes.

A ``CustomGraphPass`` whose ``uuid()`` hashes the pass sources, so Inductor's FX graph cache
is reused across runs and invalidated when a pass changes (or grouping is switched off).
Passes, in order: ``FuseQuantizedLinearPass`` (qlinear (+ EC) -> fused_linear), then
``GroupSiblingLinearsPass`` (sibling fused_linears of one x -> grouped_linear; ``group_linears=False``
or ``SPEAR_GROUP_LINEARS=0`` turns it off), then ``DecomposePrefillLinearsPass`` (plain W4 nodes at a
static prefill M in a graph without CUDA graphs -> dequantize + aten.mm; ``decompose_prefill=False`` or
``SPEAR_DECOMPOSE_PREFILL=0`` turns it off). Optionally composes with a pass the
user already installed (ours runs first) and dumps the graph before/after (``spear_compile.debug``).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .passes.decompose_prefill_linears import DecomposePrefillLinearsPass
from .passes.fuse_quantized_linear import FuseQuantizedLinearPass
from .passes.group_sibling_linears import GroupSiblingLinearsPass

_SOURCES = tuple(sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.py"))))


class SpearPassManager(CustomGraphPass):
    def __init__(self, user_pass: Optional[Callable] = None, dump_dir: Optional[str] = None,
                 group_linears: Optional[bool] = None, decompose_prefill: Optional[bool] = None):
        self.grouping = GroupSiblingLinearsPass(enabled=group_linears)
        self.decompose = DecomposePrefillLinearsPass(enabled=decompose_prefill)
        self.passes = [FuseQuantizedLinearPass(), self.grouping, self.decompose]
        self.user_pass = user_pass
        self.dump_dir = dump_dir
        self.last_count = 0
        self.last_groups = 0
        self.last_decomposed = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .dumps import dump_graph  # (the package may export the function ``debug`` under that name)
        tag = dump_graph(graph, "pre_spear", self.dump_dir)
        self.last_count = self.passes[0](graph)  # fused linears
        self.last_groups = self.passes[1](graph)  # sibling groups merged
        self.last_decomposed = self.passes[2](graph)  # prefill linears as dequantize + mm
        graph.lint()
        dump_graph(graph, "post_spear", self.dump_dir, tag)
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self) -> Optional[Any]:
        ours = get_hash_for_files(_SOURCES)
        if not self.grouping.enabled:
            ours = (ours, "group_linears=off")
        if self.decompose.settings() != self.decompose.DEFAULT_SETTINGS:  # (CUDA graphs: in Inductor's own key)
            ours = (ours, "decompose_prefill=%s,merge_ec=%s,pad_x=%s,xpass_in_place=%s" % self.decompose.settings())
        if self.user_pass is None:
            return ours
        theirs = self.user_pass.uuid() if isinstance(self.user_pass, CustomGraphPass) else None
        return None if theirs is None else (ours, theirs)   # None: Inductor bypasses the cache
