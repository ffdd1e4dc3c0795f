"""Compile a tuning's candidate kernels on a thread pool before they are timed one at a time.

A fresh machine tunes hundreds of candidate configs at start-up (``bench/results/serving_throughput.md``, session 12:
the W4 + EC engine for Llama-3.2-1B had not finished its start-up after 9 minutes on an H200), nearly all of it
Triton compiling each candidate, serially, on one core. Triton (>= 3.4) can compile asynchronously: inside its
``AsyncCompileMode`` a kernel's ``warmup`` submits the compile to an executor and returns; MLIR's passes release the
GIL and ptxas is a subprocess, so threads compile in parallel (Inductor uses the same hook). Every launch site in
``lowering/`` goes through ``launcher(kernel, grid)``: a plain ``kernel[grid]`` normally, the compile-only
``warmup`` while ``compiling_only`` is active, so a runner called there submits its kernels' compiles without
running anything on the device.
"""
from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch

from .. import options


def _async_compile():
    try:
        from triton.runtime import _async_compile
        return _async_compile if hasattr(_async_compile, "AsyncCompileMode") else None
    except ImportError:  # an older Triton: candidates compile serially as they are timed
        return None


def launcher(kernel, grid) -> Callable:
    """``kernel[grid]``; inside ``compiling_only``, the kernel's compile-only ``warmup`` (nothing is launched)."""
    mod = _async_compile()
    if mod is not None and mod.active_mode.get() is not None:
        return functools.partial(kernel.warmup, grid=grid)
    return kernel[grid]


def pdl_ok(device) -> bool:
    """Programmatic dependent launch (``launch_pdl``, ``gdc_*``): Hopper or newer, compiled kernels only."""
    return device.type == "cuda" and not options.interpret() and torch.cuda.get_device_capability(device)[0] >= 9


def available() -> bool:
    return _async_compile() is not None


@contextlib.contextmanager
def compiling_only(threads: int):
    """Launches through ``launcher`` only submit their compiles to ``threads`` threads; leaving waits for all of
    them (a compile that fails is left for the real launch to report)."""
    mod = _async_compile()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spear-compile") as pool, \
            mod.AsyncCompileMode(pool, ignore_errors=True):
        yield


def precompile(configs: Iterable, run: Callable, threads: int) -> int:
    """Submit the compiles of every config's kernels (``run(cfg)`` as the tuner calls it) and wait for them; a
    config its runner refuses is skipped here (the tuner records why when it runs it). Returns how many ran."""
    if threads <= 1 or not available():
        return 0
    n = 0
    with compiling_only(threads):
        for cfg in configs:
            try:
                run(cfg)
                n += 1
            except Exception:  # noqa: BLE001  (refused configs are reported by the timed run)
                continue
    return n
