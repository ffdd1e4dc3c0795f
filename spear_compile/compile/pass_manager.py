"""``SpearPassManager``: the Inductor post-grad custom pass (the backend installs it as
``post_grad_custom_pre_pass``, see ``backend.py``) that runs our passes, in order:

1. ``FuseQuantizedLinearPass``: ``spear::qlinear`` (+ EC) -> ``spear::fused_linear``;
2. ``GroupSiblingLinearsPass``: sibling fused_linears of one x -> ``spear::grouped_linear``, or
   ``spear::grouped_linear_ec`` when all carry an EC of one rank (``group_linears=False`` or
   ``SPEAR_GROUP_LINEARS=0``: off; ``SPEAR_GROUP_EC_LINEARS=0``: EC'd siblings stay apart);
3. ``DecomposePrefillLinearsPass``: W4 nodes at a static prefill M in a graph without CUDA graphs -> dequantize +
   ``aten.mm`` (``decompose_prefill=False`` or ``SPEAR_DECOMPOSE_PREFILL=0``: off).

Each graph gets a number in the manager's ``CompileRecords`` (one per compile, given by the backend) and every pass
records into it through one ``PassContext``. A ``CustomGraphPass`` whose ``uuid()`` composes the passes' own uuids
(source hash + settings) with this file's, so Inductor's FX graph cache is reused across runs and invalidated when
a pass or a setting changes. Optionally composes with a pass the user already installed (ours runs first) and dumps
the graph before/after (``spear_compile.debug``).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import records as records_module
from .dumps import dump_graph
from .passes.decompose_prefill_linears import DecomposePrefillLinearsPass
from .passes.fuse_quantized_linear import FuseQuantizedLinearPass
from .passes.group_sibling_linears import GroupSiblingLinearsPass
from .passes.peer_reduce_row_ec import PeerReduceRowEcPass
from .records import CompileRecords, PassContext

_SOURCES = (__file__, records_module.__file__)


class SpearPassManager(CustomGraphPass):
    def __init__(self, user_pass: Optional[Callable] = None, dump_dir: Optional[str] = None,
                 group_linears: Optional[bool] = None, decompose_prefill: Optional[bool] = None,
                 records: Optional[CompileRecords] = None):
        self.grouping = GroupSiblingLinearsPass(enabled=group_linears)
        self.decompose = DecomposePrefillLinearsPass(enabled=decompose_prefill)
        self.passes = [PeerReduceRowEcPass(), FuseQuantizedLinearPass(), self.grouping, self.decompose]
        self.user_pass = user_pass
        self.dump_dir = dump_dir
        self._dump_tags = itertools.count(1)
        self.records = records if records is not None else CompileRecords()
        self.last_counts = (0, 0, 0, 0)  # peer-reduced, fused linears, sibling groups, decomposed GEMMs (last graph)

    def __call__(self, graph: torch.fx.Graph) -> None:
        tag = dump_graph(graph, "pre_spear", self.dump_dir, tags=self._dump_tags)
        ctx = PassContext(self.records, self.records.new_graph())
        self.last_counts = tuple(p(graph, ctx) for p in self.passes)
        graph.lint()
        dump_graph(graph, "post_spear", self.dump_dir, tag)
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self) -> Optional[Any]:
        ours = (get_hash_for_files(_SOURCES), tuple(p.uuid() for p in self.passes))
        if self.user_pass is None:
            return ours
        theirs = self.user_pass.uuid() if isinstance(self.user_pass, CustomGraphPass) else None
        return None if theirs is None else (ours, theirs)   # None: Inductor bypasses the cache
