"""What the passes saw: one ``MatchRecord`` per ``spear::qlinear`` node, matched or not, and one
``GroupRecord`` per group of sibling linears the grouping pass merged into one launch.

``spear_compile.inspect`` and the tests read ``RECORDS`` and ``GROUPS``; ``clear()`` starts a fresh log.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple


@dataclass
class MatchRecord:
    node: str                      # the qlinear node's name in the post-grad graph
    module: Optional[str]          # the nn.Module path when the graph recorded it
    matched: bool
    kind: str                      # "ec-gated" | "ec-static" | "plain" | "unfused"
    reason: str                    # why it matched / why not
    x_shape: Tuple = ()
    n: int = 0
    k: int = 0
    group_size: int = 0
    dtype: str = ""
    rank: int = 0
    gated: bool = False
    bias: bool = False
    graph: int = 0                 # index of the compiled graph (one per pass invocation)
    extra: dict = field(default_factory=dict)
    group: Optional[int] = None    # GroupRecord.index when the grouping pass merged it with siblings
    decomposed: bool = False       # replaced by dequantize + aten.mm (static prefill M, no CUDA graphs)
    decomposed_ec: str = ""        # how the EC joined the decomposed GEMM: "kcat" or "c_in"
    decomposed_with: str = ""      # whose dequantize (+ EC prologue) kernels: "spear" (Triton) or "inductor"
    decomposed_merged: Tuple = ()  # the other fused/grouped nodes of x in the same GEMM (EC siblings merged)
    decomposed_pad_x: bool = False  # [x | v] written as pad(x) + v in place (x's producer may write it)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GroupRecord:
    index: int                     # position in GROUPS (MatchRecord.group refers to it)
    graph: int                     # index of the compiled graph
    node: str                      # the spear::grouped_linear node
    members: Tuple[str, ...]       # the members' qlinear node names, in output-column order
    modules: Tuple[Optional[str], ...]
    ns: Tuple[int, ...]            # the members' output widths
    k: int = 0
    group_size: int = 0
    dtype: str = ""
    bias: bool = False
    decomposed: bool = False       # replaced by dequantize + aten.mm (static prefill M, no CUDA graphs)

    def as_dict(self) -> dict:
        return asdict(self)


RECORDS: List[MatchRecord] = []
GROUPS: List[GroupRecord] = []
_graph_counter = [0]


def next_graph_id() -> int:
    _graph_counter[0] += 1
    return _graph_counter[0]


def clear() -> None:
    RECORDS.clear()
    GROUPS.clear()


def records(graph: Optional[int] = None) -> List[MatchRecord]:
    return [r for r in RECORDS if graph is None or r.graph == graph]


def groups(graph: Optional[int] = None) -> List[GroupRecord]:
    return [g for g in GROUPS if graph is None or g.graph == graph]
