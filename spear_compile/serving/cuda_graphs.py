"""The engine's CUDA graphs: one capture stream and one memory pool per runner (``GraphCapture``), the captured
decode steps (``DecodeGraph``, one per bucket, captured at start-up) and mixed steps (``MixedGraphs``, one per
input-shape key, captured at the key's first step while serving).

Every step is run eagerly on the capture stream before its capture: the W4 kernels keep persistent workspaces
(split-K counters, EC epoch tags) per stream, and those must come from the ordinary allocator, not from the pool
that every graph writes its intermediates into (allocated inside a capture, a bucket switch would find them
clobbered: session 14's spin and NaN). Off CUDA (tests, ``EngineConfig.cuda_graphs_stand_in``) a ``StandInGraph``
re-runs the function on the same static buffers, so the bookkeeping runs on CPU too.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import SpearError
from ..lowering.capture import capturing
from .buckets import MixedDims


def on_stream(stream):
    """``torch.cuda.stream(stream)`` after it waited for the current stream, and the current stream waits for it
    on exit; a no-op for ``None``."""
    if stream is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            yield
        current.wait_stream(stream)
    return ctx()


def workspace_footprint(stream, device) -> tuple:
    """``Workspace.footprint()`` of the W4 decode kernels' workspace of ``stream``."""
    from ..lowering.runtime import WORKSPACES
    with torch.cuda.stream(stream):
        return WORKSPACES.get(device).footprint()


def usable_bytes(device) -> int:
    """Device memory this process may still allocate: the driver's free memory and the caching allocator's cached,
    unused blocks (captures no longer empty that cache, ``lowering.capture``)."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def multi_rank() -> bool:
    """Tensor parallelism: mixed steps stay uncaptured there (their collectives were never captured and checked)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def pack_flat(args) -> torch.Tensor:
    """Tensors flattened into one (one host-to-device copy instead of one per tensor)."""
    return torch.cat([a.reshape(-1) for a in args])


def unpack_flat(flat: torch.Tensor, shapes) -> tuple:
    """Views of ``flat`` with ``shapes`` (``pack_flat``'s inverse)."""
    out, start = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        out.append(flat[start:start + n].view(shape))
        start += n
    return tuple(out)


class StandInGraph:
    """Off CUDA (tests): "replays" by running the captured function again on the same static input buffers."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


@dataclass
class DecodeGraph:
    """A captured decode step: write the step's inputs into ``inputs`` (the views below point into it), replay."""
    graph: object              # torch.cuda.CUDAGraph, or a StandInGraph
    inputs: torch.Tensor       # flat int64 static buffer
    views: tuple
    logits: torch.Tensor       # the captured output (static)

    def replay(self) -> torch.Tensor:
        out = self.graph.replay()
        return self.logits if out is None else out


@dataclass
class MixedGraph:
    """A captured mixed step: ``mixed_forward``'s inputs packed flat into ``inputs`` (``views`` point into it, the
    ids first); its logits are copied into the shared logits buffer, returned as ``logits``."""
    graph: object              # torch.cuda.CUDAGraph, or a StandInGraph
    inputs: torch.Tensor
    views: tuple
    logits: torch.Tensor

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class GraphCapture:
    """The capture stream and the memory pool that every graph of one runner shares (they never run at once)."""

    MIN_FREE_BYTES = 1 << 30   # no capture while serving leaves the device less free memory than this

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = None
        self.capture_s = 0.0
        self.captures = 0
        self.capture_bytes = 0          # device memory the captures took (graph objects and the pool's growth)
        self.free_bytes = None          # the device's free memory after the last capture

    def low_on_memory(self) -> bool:
        """Whether the last capture left the device less than ``MIN_FREE_BYTES`` free: graphs captured while
        serving use memory beside the KV cache, so capturing stops there (those steps run uncaptured)."""
        return self.free_bytes is not None and self.free_bytes < self.MIN_FREE_BYTES

    def eager(self, fn: Callable):
        """``fn()`` on the capture stream (its workspaces allocated outside the pool), ordered with the current
        stream both ways."""
        with on_stream(self.stream):
            return fn()

    def capture(self, fn: Callable, what: str, error_mode: str = "global"):
        """``(graph, output)`` of ``fn`` captured into the shared pool; ``fn`` must have run eagerly (``eager``)
        first. Raises ``SpearError`` if the capture allocated kernel workspace."""
        t0 = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        before = workspace_footprint(self.stream, self.device)
        free_before = usable_bytes(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(graph, self.stream, self.pool, error_mode):
                out = fn()
        finally:
            self.capture_s += time.perf_counter() - t0
            self.free_bytes = usable_bytes(self.device)
            self.capture_bytes += max(0, free_before - self.free_bytes)
            self.captures += 1
        if workspace_footprint(self.stream, self.device) != before:
            raise SpearError(f"serving engine: {what} allocated kernel workspace during its CUDA-graph capture, where "
                             "the shared graph pool would clobber it; its eager run on the capture stream should have "
                             "allocated it")
        return graph, out


def _padded_cost(d: MixedDims) -> tuple:
    """The order ``MixedGraphs.covering`` prefers covering graphs in: fewest tokens (the linears), then decode rows,
    then prefill attention work."""
    return d.tokens, d.decode_rows, d.attention_cells()


class MixedGraphs:
    """Mixed steps' graphs by ``(use_ec, input shapes)``, at most ``limit`` (0 on CPU without stand-ins, and under
    tensor parallelism). Their logits all go to one buffer of ``max_rows`` rows outside the pool (the engine reads
    a step's logits before the next step), so a graph keeps no memory of its own but its kernel parameters."""

    def __init__(self, capture: GraphCapture, limit: int, max_rows: int, *, capture_first: bool):
        self.capture = capture
        self.limit = limit
        self.max_rows = max_rows
        self.graphs: dict = {}
        self.logits = None          # [max_rows, vocab], allocated at the first capture
        self.replays = 0
        self.first_steps = 0        # steps that ran eagerly to capture their key (slow, once per key)
        self.uncaptured = 0         # mixed steps served without a graph (limit reached, capture failed, TP)
        self.padded_replays = 0     # steps replayed in the graph of larger dims that covers theirs (``covering``)
        self._by_rows: dict = {}    # (use_ec, tokens, decode rows) -> captured MixedDims (``covering``'s candidates)
        self._covers: dict = {}     # (use_ec, dims, paddings) -> ``covering``'s answer while no graph was added
        self._covers_at = -1        # len(self.graphs) when ``_covers`` and ``_by_rows`` were built
        self.on_capture: Optional[Callable] = None   # called with each new key once its graph is captured
        self.capture_first = capture_first  # EngineConfig.mixed_capture_first (``first_step``); off after a failure
        self.captured_first = 0     # first steps captured without an eager run before (``capture_first``)
        self._eager_sizes: set = set()   # (use_ec, tokens, logits rows) run eagerly on the capture stream

    def covering(self, use_ec: bool, dims: MixedDims, max_padding: float,
                 bucket_padding: float = 1.0) -> Optional[MixedDims]:
        """The dims of the captured graph a step of ``dims`` should replay: its own if captured, else (``max_padding``
        > 0) those of the captured graph that covers them (``MixedDims.covers``; ``bucket_padding`` > 1: also of a
        larger token bucket or more decode rows) with the fewest tokens, then decode rows, then prefill attention
        work, else None (the step captures its own graph, or runs uncaptured). Padding a step costs a little work;
        a shape's first step costs its uncaptured run and its capture (50-120 ms with a 1B model on an H100).
        The SLO policy asks this for the steps it weighs too (``ModelRunner.padded_step``): answers are
        remembered, and only graphs of the tokens and decode rows that may cover a step are scanned."""
        if (use_ec, dims.shapes()) in self.graphs:
            return dims
        if not max_padding:
            return None
        if self._covers_at != len(self.graphs):   # a graph was added: answers may change (graphs are never removed)
            self._covers.clear()
            self._by_rows.clear()
            for key in self.graphs:
                d = MixedDims.from_shapes(key[1])
                self._by_rows.setdefault((key[0], d.tokens, d.decode_rows), []).append(d)
            self._covers_at = len(self.graphs)
        memo = (use_ec, dims, max_padding, bucket_padding)
        if memo in self._covers:
            return self._covers[memo]
        if bucket_padding <= 1.0:
            groups = [self._by_rows.get((use_ec, dims.tokens, dims.decode_rows), ())]
        else:
            top_t, top_r = bucket_padding * dims.tokens, bucket_padding * dims.decode_rows
            groups = [g for (ec, t, r), g in self._by_rows.items()
                      if ec == use_ec and dims.tokens <= t <= top_t and dims.decode_rows <= r <= top_r]
        best = min((d for group in groups for d in group if d.covers(dims, max_padding, bucket_padding)),
                   key=_padded_cost, default=None)
        if len(self._covers) < 65536:
            self._covers[memo] = best
        return best

    def has_room(self, rows: int) -> bool:
        """Whether a new key of ``rows`` logits rows may be captured (under the limit, its rows fit the buffer, the
        device not low on memory)."""
        return len(self.graphs) < self.limit and rows <= self.max_rows and not self.capture.low_on_memory()

    def replay(self, g: MixedGraph) -> torch.Tensor:
        self.replays += 1
        return g.replay()

    def first_step(self, key, flat: torch.Tensor, views: tuple, fn: Callable) -> torch.Tensor:
        """Run a key's first step eagerly (``fn()`` reads ``views``, which point into ``flat``, on the device), then
        capture it for the next ones. Returns the eager run's logits. A capture that fails (or allocated kernel
        workspace) warns, and no later key is captured. With ``capture_first``, a key whose token count and logits
        rows already ran eagerly on the capture stream (so every kernel workspace those sizes need exists: they
        depend on the linears' rows, not on the attention's shapes) is captured at once and replayed: one host pass
        over the step instead of two."""
        self.first_steps += 1
        shapes = key[1]
        sizes = (key[0], shapes[0][0], shapes[-1][0])   # the inputs: ids [tokens] first, logits rows last
        if self.capture_first and sizes in self._eager_sizes:
            out = self.logits[:sizes[2]]
            if self._capture(key, flat, views, out, fn, ran_eagerly=False):
                self.captured_first += 1
                return self.graphs[key].replay()
        logits = self.capture.eager(fn)
        self._eager_sizes.add(sizes)
        if logits.is_cuda:   # made on the capture stream, read on the current one
            logits.record_stream(torch.cuda.current_stream(logits.device))
        if self.logits is None:
            self.logits = torch.empty(self.max_rows, logits.shape[1], dtype=logits.dtype, device=logits.device)
        if len(self.graphs) < self.limit:   # (a capture-first that allocated workspace stopped captures)
            self._capture(key, flat, views, self.logits[:logits.shape[0]], fn, ran_eagerly=True)
        return logits

    def _capture(self, key, flat, views, out, fn, ran_eagerly: bool) -> bool:
        """Capture ``out.copy_(fn())`` as ``key``'s graph; False if that failed. A failed capture after an eager
        run (or one that allocated kernel workspace) stops all later captures; a failed capture-first only stops
        capturing first."""
        if not self.capture.cuda:  # stand-in (tests)
            self.graphs[key] = MixedGraph(StandInGraph(lambda: out.copy_(fn())), flat, views, out)
            self._captured(key)
            return True
        try:
            # thread-local: the capture happens while serving; another thread's CUDA call (the server's) must
            # neither break it nor fail itself
            graph, _ = self.capture.capture(lambda: out.copy_(fn()), f"the mixed step of input shapes {key[1]}",
                                            error_mode="thread_local")
        except Exception as exc:  # noqa: BLE001  (a step that cannot be captured still runs, uncaptured)
            if not ran_eagerly and not isinstance(exc, SpearError):
                self.capture_first = False
                warnings.warn(f"spear_compile serving: capturing a mixed step (input shapes {key[1]}) before any "
                              f"eager run of it failed; new shapes run eagerly before their capture from now on: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
                return False
            self.limit = len(self.graphs)
            warnings.warn(f"spear_compile serving: capturing a mixed step (input shapes {key[1]}) failed; mixed steps "
                          f"of other shapes than the {self.limit} captured run uncaptured from now on: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)
            return False
        self.graphs[key] = MixedGraph(graph, flat, views, out)
        self._captured(key)
        return True

    def _captured(self, key) -> None:
        if self.on_capture is not None:
            self.on_capture(key)
