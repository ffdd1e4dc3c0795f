"""Persistent buffers of the decode kernels, one set per (device, stream), and the side streams of forked launches.

The decode kernels leave their workspace clean (zeroed, or epoch-consistent) after every launch, so one launch
never sees another's state: but two launches running at once on two streams of one device must not share one.
``Workspaces.get(device)`` therefore returns the set of the device's *current stream*. Under CUDA-graph capture
that is the capture stream: warm a shape up on the stream that will capture it (Inductor's CUDA-graph trees
warm up and record on one stream of their own) or the first capture allocates that stream's buffers and records
their zero-fill into the graph. Outside capture the buffers are allocated and zeroed on a stream of their own
(the current stream then waits for it), from a thread of their own (``outside_graph_pools``): a CUDA-graph tree's
warm-up routes every allocation of the *calling thread* to the tree's pool, whatever the stream, and then refuses
to go on ("tensors in the cudagraph pool not tracked as outputs"; its checkpoint restores would hand their memory
out again).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Optional, TypeVar

import torch

from .configs import MAX_DECODE_M, MAX_EC_RANK, MAX_GROUP, MIN_BLOCK_N, cdiv

T = TypeVar("T")


def _zeros(numel, dtype, device, alloc_stream):
    """A persistent zeroed buffer: made on ``alloc_stream`` from a thread of its own (outside any CUDA-graph pool)
    and waited for by the current stream; made in place during capture (the zero-fill is captured)."""
    if alloc_stream is None or torch.cuda.is_current_stream_capturing():
        return torch.zeros(numel, dtype=dtype, device=device)
    current = torch.cuda.current_stream(device)
    alloc_stream.wait_stream(current)

    def make():
        with torch.cuda.stream(alloc_stream):
            return torch.zeros(numel, dtype=dtype, device=device)
    t = outside_graph_pools(make)
    current.wait_stream(alloc_stream)
    return t


def outside_graph_pools(fn: Callable[[], T]) -> T:
    """``fn()`` run on a short-lived thread of its own, on the caller's CUDA device and stream, in its grad and
    inference modes (in-place writes to an inference tensor need the latter) and context variables:
    its allocations come from the ordinary caching allocator even inside a CUDA-graph tree's warm-up, which routes
    the calling thread's allocations to the tree's pool (``torch._C._cuda_beginAllocateCurrentThreadToPool``).
    For what outlives the call (workspaces, the tuner's buffers) and what runs CUDA graphs of its own (the tuner's
    timing captures). The caller waits for it; its exception is raised in the caller."""
    grad, inference, context = torch.is_grad_enabled(), torch.is_inference_mode_enabled(), contextvars.copy_context()
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    box = {}

    def target():
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                box["value"] = context.run(fn)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = e

    thread = threading.Thread(target=target, name="spear-outside-graph-pools")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Workspace:
    """Persistent buffers the decode kernels leave clean (zeroed, or epoch-consistent) after every launch."""

    def __init__(self, device, alloc_stream=None):
        self.device = device
        self._alloc_stream = alloc_stream
        self.sync = self._zeros(4, torch.int32)  # tile id, u arrivals, done
        self.u = self._zeros(MAX_DECODE_M * MAX_EC_RANK, torch.float32)
        # modes pdl/2k: the gated u as tagged int64 words (tags unused: the kernel boundary orders them)
        self.gu = self._zeros(MAX_DECODE_M * MAX_EC_RANK, torch.int64)
        self.ep = self._zeros(1, torch.int32)
        self.acc = {}     # N -> fp32 [16 * N] split-K accumulator
        self.arrive = {}  # N -> int32 [cdiv(N, 16)] split arrival counters
        self.geo = {}     # (N, N tiles) -> (epoch + per-tile phases int32 [1 + N tiles], tagged g(u)⊙u words)
        self.ecw = {}     # mode ecterm: slot geometry -> the published EC term words
        self.batched = None  # the batched kernel's (fp32 split-K slots, fp32 u partials, int32 arrival counters)
        self.outgrown = []   # batched buffers replaced by larger ones, kept: a captured CUDA graph may still use them

    def _zeros(self, numel, dtype):
        return _zeros(numel, dtype, self.device, self._alloc_stream)

    def footprint(self) -> tuple:
        """Every buffer's address, in a fixed order: equal before and after a CUDA-graph capture that allocated none
        (the serving engine checks each capture with it)."""
        bufs = [self.sync, self.u, self.gu, self.ep, *(self.batched or ())]
        for table in (self.acc, self.arrive, self.geo, self.ecw):
            for key in sorted(table, key=repr):
                value = table[key]
                bufs += list(value) if isinstance(value, tuple) else [value]
        return tuple(t.data_ptr() for t in bufs)

    def for_batched(self, n_ws, n_uws, n_cnt):
        """The batched-decode kernel's split-K partial slots, u partials and arrival counters (the kernel leaves the
        counters at zero), grown on demand: run each shape once before capture, as the tuner does. Outgrown buffers
        stay alive (``outgrown``): a graph captured before the growth replays into them, and freed they would be
        handed to other tensors (the engine warms up and captures its buckets one after another, and a smaller
        batch's pick can need more split-K slots than a larger one's)."""
        have = self.batched
        if have is None or have[0].numel() < n_ws or have[1].numel() < n_uws or have[2].numel() < n_cnt:
            sizes = (n_ws, n_uws, n_cnt) if have is None else (max(n_ws, have[0].numel()), max(n_uws, have[1].numel()),
                                                               max(n_cnt, have[2].numel()))
            if have is not None:
                self.outgrown.append(have)
            self.batched = (self._zeros(sizes[0], torch.float32), self._zeros(sizes[1], torch.float32),
                            self._zeros(sizes[2], torch.int32))
        return self.batched

    def for_n(self, n):
        if n not in self.acc:
            self.acc[n] = self._zeros(MAX_DECODE_M * n, torch.float32)
            self.arrive[n] = self._zeros(cdiv(n, MIN_BLOCK_N), torch.int32)
        return self.acc[n], self.arrive[n]

    def for_epoch(self, n, n_tiles):
        """Mode "epoch": state of one launch geometry. Every launch of it bumps the epoch and each tile's phase
        once, so they agree between launches; another geometry has its own (its tile count differs)."""
        key = (n, n_tiles)
        if key not in self.geo:
            self.geo[key] = (self._zeros(1 + n_tiles, torch.int32), self._zeros(MAX_DECODE_M * MAX_EC_RANK, torch.int64))
        return self.geo[key]

    def for_slots(self, n, n_tiles, n_u, r, term=False):
        """Modes "slots"/"ecterm": phases ``int32 [n_u + n_tiles]`` (u tiles, then N tiles) and the slot
        words ``int64 [n_u * 16 * r]`` of one launch geometry (every launch bumps each phase once, so they agree
        between launches). ``term`` ("ecterm"): n_tiles more phases (the W finishers) and the published EC term words
        ``int64 [16 * n]`` (a third entry)."""
        key = ("slots", n, n_tiles, n_u, r, term)
        if key not in self.geo:
            self.geo[key] = (self._zeros(n_u + n_tiles * (2 if term else 1), torch.int32),
                             self._zeros(n_u * MAX_DECODE_M * r, torch.int64))
            if term:
                self.ecw[key] = self._zeros(MAX_DECODE_M * n, torch.int64)
        return self.geo[key] + ((self.ecw[key],) if term else ())

    def for_group(self, n_total):
        """Split-K buffers of a grouped launch: ``n_total`` columns, up to ``n_total / 4 + MAX_GROUP`` N tiles."""
        key = ("group", n_total)
        if key not in self.acc:
            self.acc[key] = self._zeros(MAX_DECODE_M * n_total, torch.float32)
            self.arrive[key] = self._zeros(cdiv(n_total, MIN_BLOCK_N) + MAX_GROUP, torch.int32)
        return self.acc[key], self.arrive[key]


def stream_key(device: torch.device) -> tuple:
    """(device type, index, stream id): the current stream's identity on ``device`` (0 off CUDA)."""
    if device.type != "cuda":
        return (device.type, device.index, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ("cuda", index, torch.cuda.current_stream(index).cuda_stream)


class Workspaces:
    """The decode workspaces, one ``Workspace`` per (device, stream); and one side stream per device for the
    forked prologue of ``DequantCublasConfig(overlap=True)``."""

    def __init__(self):
        self._by_stream = {}
        self._side = {}
        self._alloc = {}  # device -> the stream buffers are allocated and zeroed on
        self._lock = threading.Lock()

    def get(self, device: torch.device) -> Workspace:
        key = stream_key(device)
        ws = self._by_stream.get(key)
        if ws is None:
            with self._lock:
                alloc = None
                if device.type == "cuda":
                    alloc = self._alloc.setdefault(key[:2], torch.cuda.Stream(device))
                ws = self._by_stream.setdefault(key, Workspace(device, alloc))
        return ws

    def side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        key = stream_key(device)
        if key not in self._side:
            with self._lock:
                self._side.setdefault(key, torch.cuda.Stream(device))
        return self._side[key]

    def clear(self) -> None:
        with self._lock:
            self._by_stream.clear()
            self._side.clear()
            self._alloc.clear()


class Fork:
    """``with Fork(on, device, workspaces):`` runs the block on the current stream's side stream after it waited
    for the current one (a CUDA-graph capture follows the fork); ``join()`` makes the current stream wait for the side
    stream. Tensors the block writes must be allocated before it, on the current stream, and used on it only after
    the join."""

    def __init__(self, on: bool, device, workspaces: Workspaces):
        self.on, self.device, self.ctx = on, device, None
        self.side: Optional[torch.cuda.Stream] = workspaces.side_stream(device) if on else None
        self.main = torch.cuda.current_stream(device) if on else None

    def __enter__(self):
        if self.on:
            self.side.wait_stream(self.main)
            self.ctx = torch.cuda.stream(self.side)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False

    def join(self):
        if self.on:
            self.main.wait_stream(self.side)
