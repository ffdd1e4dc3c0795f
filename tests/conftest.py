"""Test-session setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
before anything imports triton: CPU CI runs every Triton kernel under the interpreter. The tuning cache is off
(``SPEAR_TUNE_CACHE=0``): tests never read or write the user's cache."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SPEAR_TUNE_CACHE"] = "0"  # the tuner's on-disk cache: off (never the user's); test_tune_cache sets its own
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one (``-m "not gpu"`` deselects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_compile():
    """A clean compiler state per test: dynamo reset, graph caches off, and a fresh ``records.recording()`` block
    that collects what ``backend="spear"`` and ``optimize`` compile in the test (``records.active()``; yielded)."""
    from spear_compile.compile import records

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False), \
            records.recording() as rec:
        yield rec
