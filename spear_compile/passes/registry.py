"""What the fusion pass saw: one ``MatchRecord`` per ``spear::qlinear`` node, matched or not.

``spear_compile.inspect`` and the tests read ``RECORDS``; ``clear()`` starts a fresh log.
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

    def as_dict(self) -> dict:
        return asdict(self)


RECORDS: List[MatchRecord] = []
_graph_counter = [0]


def next_graph_id() -> int:
    _graph_counter[0] += 1
    return _graph_counter[0]


def clear() -> None:
    RECORDS.clear()


def records(graph: Optional[int] = None) -> List[MatchRecord]:
    return [r for r in RECORDS if graph is None or r.graph == graph]
