"""``spear_compile.debug(dir)``: dump what the compiler did.

Inside the context every graph the ``spear`` backend compiles writes
``dir/fx_graphs/graph_NNN_{pre,post}_spear.txt`` (the post-grad FX graph before and after our
pass) and, where depyf works on this torch version, depyf's decompiled Dynamo sources into
``dir``. The caches are turned off inside the context so every graph really is compiled.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from typing import Optional

import torch

_ACTIVE: list = []
_COUNTER = itertools.count(1)


def active_dir(explicit: Optional[str] = None) -> Optional[str]:
    return explicit or (_ACTIVE[-1] if _ACTIVE else None)


def graph_text(graph: torch.fx.Graph) -> str:
    gm = graph.owning_module
    if gm is not None:
        try:
            return gm.print_readable(print_output=False, include_stride=True, include_device=True)
        except Exception:  # noqa: BLE001  (older signatures)
            pass
    return str(graph)


def dump_graph(graph: torch.fx.Graph, stage: str, dump_dir: Optional[str] = None, tag: Optional[int] = None):
    """Write ``graph`` for ``stage``; returns the tag pairing a pre dump with its post dump."""
    d = active_dir(dump_dir)
    if d is None:
        return tag
    tag = tag or next(_COUNTER)
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
        _ACTIVE.append(dump_dir)
        try:
            yield dump_dir
        finally:
            _ACTIVE.pop()
