"""``spear_compile.debug(dir)``: dump what the compiler did.

Inside the context every graph the ``spear`` backend compiles writes
``dir/fx_graphs/graph_NNN_{pre,post}_spear.txt`` (the post-grad FX graph before and after our
pass) and, where depyf works on this torch version, depyf's decompiled Dynamo sources into
``dir``. The caches are turned off inside the context so every graph really is compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import warnings
from typing import Optional

import torch

# (directory, tag counter) of the innermost ``debug`` block; a context variable: nothing outlives the block
_DUMPING: contextvars.ContextVar = contextvars.ContextVar("spear_compile_dumping", default=None)


def active_dir(explicit: Optional[str] = None) -> Optional[str]:
    active = _DUMPING.get()
    return explicit or (active[0] if active else None)


def graph_text(graph: torch.fx.Graph) -> str:
    gm = graph.owning_module
    if gm is not None:
        try:
            return gm.print_readable(print_output=False, include_stride=True, include_device=True)
        except Exception:  # noqa: BLE001  (older signatures)
            pass
    return str(graph)


def dump_graph(graph: torch.fx.Graph, stage: str, dump_dir: Optional[str] = None, tag: Optional[int] = None,
               tags: Optional[itertools.count] = None):
    """Write ``graph`` for ``stage``; returns the tag pairing a pre dump with its post dump (numbered by the
    ``debug`` block's counter, else by ``tags``)."""
    d = active_dir(dump_dir)
    if d is None:
        return tag
    active = _DUMPING.get()
    tag = tag or next(active[1] if active else tags if tags is not None else itertools.count(1))
    out = os.path.join(d, "fx_graphs")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"graph_{tag:03d}_{stage}.txt"), "w") as f:
        f.write(graph_text(graph))
    return tag


@contextlib.contextmanager
def debug(dump_dir: str):
    """Context manager: FX graph dumps of our pass + depyf sources under ``dump_dir``."""
    dump_dir = os.path.abspath(dump_dir)
    os.makedirs(dump_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        try:
            import depyf
            stack.enter_context(depyf.prepare_debug(dump_dir))
        except Exception as e:  # noqa: BLE001  (depyf lags behind torch releases)
            warnings.warn(f"spear_compile.debug: depyf unavailable on torch {torch.__version__} ({e!r}); "
                          f"writing only the FX graph dumps to {dump_dir}", stacklevel=3)
        token = _DUMPING.set((dump_dir, itertools.count(1)))
        try:
            yield dump_dir
        finally:
            _DUMPING.reset(token)
