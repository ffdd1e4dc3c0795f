"""Test-session setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
before anything imports triton: CPU CI runs every Triton kernel under the interpreter. The tuning cache is off
(``SPEAR_TUNE_CACHE=0``): tests never read or write the user's cache."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SPEAR_TUNE_CACHE"] = "0"  # the tuner's on-disk cache: off (never the user's); test_tune_cache sets its own
# at most two threads, shared by the pytest-xdist workers (``-n 2``: one thread each on the 2-core CI machine)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _workers))


def pytest_configure(config):
    """Triton < 3.7's CPU interpreter turns size-1 arrays into Python scalars, which NumPy >= 2.4 refuses (every
    interpreted kernel then fails with "only 0-dimensional arrays can be converted to Python scalars"): say so once,
    with the fix, instead of a wall of kernel failures. Seen with torch 2.11's pinned Triton 3.6."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton
    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        pytest.exit(f"Triton {triton.__version__}'s CPU interpreter does not run with NumPy {numpy.__version__}: "
                    "install 'numpy<2.4' (or Triton >= 3.7) to run the CPU suite", returncode=4)


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
