"""CUDA-graph capture without the cache emptying of ``torch.cuda.graph``.

``torch.cuda.graph`` empties the caching allocator (``torch.cuda.empty_cache()``) and the pinned-host cache before
every capture. The project captures many graphs in a row (the tuner two per candidate config, the engine one per
decode bucket at start-up and one per mixed-step shape while serving), and each emptying hands every cached block
back to the driver, so the work after it allocates afresh (``cudaMalloc`` / ``cudaHostAlloc``, which synchronize the
device). vLLM's captures skip it for the same reason.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def capturing(graph: "torch.cuda.CUDAGraph", stream: "torch.cuda.Stream", pool=None, error_mode: str = "global"):
    """Capture the work issued inside into ``graph`` on ``stream`` (``torch.cuda.graph``'s capture otherwise)."""
    torch.cuda.synchronize(stream.device)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode=error_mode)
        try:
            yield
        finally:
            graph.capture_end()
