"""What the passes saw in one compile: a ``CompileRecords`` with one ``MatchRecord`` per ``spear::qlinear`` node,
matched or not, one ``GroupRecord`` per group of sibling linears the grouping pass merged into one launch, and one
``PeerReduceRecord`` per row-parallel W4 + EC linear the peer-reduction pass rewrote or left on the fallback.

Each ``SpearBackend`` (``compile.backend``) owns one and hands it to the pass manager of every graph it compiles;
``spear_compile.inspect`` and ``optimize`` read theirs. ``with recording() as rec:`` also collects what the plain
``backend="spear"`` compiles inside the block (a context variable: nothing outlives the block).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Tuple


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
    index: int                     # position in CompileRecords.groups (MatchRecord.group refers to it)
    graph: int                     # index of the compiled graph
    node: str                      # the spear::grouped_linear (or grouped_linear_ec) node
    members: Tuple[str, ...]       # the members' qlinear node names, in output-column order
    modules: Tuple[Optional[str], ...]
    ns: Tuple[int, ...]            # the members' output widths
    k: int = 0
    group_size: int = 0
    dtype: str = ""
    bias: bool = False
    ec_rank: int = 0               # the members' EC rank (spear::grouped_linear_ec), 0 without ECs
    decomposed: bool = False       # replaced by dequantize + aten.mm (static prefill M, no CUDA graphs)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PeerReduceRecord:
    """One row-parallel W4 + EC linear (``u`` all-reduced) the peer-reduction pass saw."""
    graph: int                     # index of the compiled graph
    node: str                      # its qlinear node's name in the post-grad graph
    module: Optional[str]
    rewritten: bool                # True: spear::peer_reduce_row_ec; False: the u all-reduce fallback stays
    reason: str                    # why not (or what it became)
    workspace: bool = False        # the layer had a symmetric-memory workspace slot (enable_peer_reduce)
    m: Optional[int] = None        # rows per call (None: symbolic)
    n: int = 0
    k: int = 0                     # local K (this rank's slice)
    rank: int = 0
    gated: bool = False
    bias: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class CompileRecords:
    """The records of one compile (every graph its backend compiled), graphs numbered from 1."""

    def __init__(self):
        self.matches: List[MatchRecord] = []
        self.groups: List[GroupRecord] = []
        self.peer_reduce: List[PeerReduceRecord] = []
        self.graphs = 0

    def new_graph(self) -> int:
        """Number the next graph the passes run on."""
        self.graphs += 1
        return self.graphs

    def matches_of(self, graph: Optional[int] = None) -> List[MatchRecord]:
        return [r for r in self.matches if graph is None or r.graph == graph]

    def groups_of(self, graph: Optional[int] = None) -> List[GroupRecord]:
        return [g for g in self.groups if graph is None or g.graph == graph]

    def peer_reduce_of(self, graph: Optional[int] = None) -> List[PeerReduceRecord]:
        return [r for r in self.peer_reduce if graph is None or r.graph == graph]

    def clear(self) -> None:
        self.matches.clear()
        self.groups.clear()
        self.peer_reduce.clear()


@dataclass(frozen=True)
class PassContext:
    """What a pass gets besides the graph: where to record, and which graph this is."""
    records: CompileRecords
    graph: int


_RECORDING: contextvars.ContextVar = contextvars.ContextVar("spear_compile_recording", default=None)


@contextlib.contextmanager
def recording(records: Optional[CompileRecords] = None) -> Iterator[CompileRecords]:
    """Collect into ``records`` (a new one by default) what ``backend="spear"`` compiles inside the block."""
    records = CompileRecords() if records is None else records
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def active() -> Optional[CompileRecords]:
    """The records of the innermost ``recording()`` block, or None outside one."""
    return _RECORDING.get()
