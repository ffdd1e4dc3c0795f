"""``lowering.precompile``: inside ``compiling_only`` a launch through ``launcher`` submits a compile-only
``warmup`` (nothing runs), outside it is the plain ``kernel[grid]`` launch; ``precompile`` runs every config's
runner there and skips the ones its runner refuses. (The compiles themselves need a GPU: bench/tune_startup.py.)"""
import threading

import pytest

from spear_compile.lowering import precompile as pc

pytestmark = pytest.mark.skipif(not pc.available(), reason="this Triton has no AsyncCompileMode")


class FakeKernel:
    """Records launches and compile-only warmups as a Triton JITFunction would receive them."""

    def __init__(self):
        self.launched, self.warmed = [], []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launched.append((grid, args, kw))

    def warmup(self, *args, grid, **kw):
        self.warmed.append((grid, args, kw, threading.current_thread().name))


def test_launcher_launches_outside_and_only_compiles_inside():
    k = FakeKernel()
    pc.launcher(k, (3,))(1, 2, BLOCK=16)
    assert k.launched == [((3,), (1, 2), {"BLOCK": 16})] and k.warmed == []
    with pc.compiling_only(2):
        pc.launcher(k, (5, 1))("x", num_warps=4)
    assert k.warmed[0][:3] == ((5, 1), ("x",), {"num_warps": 4})
    assert len(k.launched) == 1   # nothing launched inside
    pc.launcher(k, (7,))()
    assert len(k.launched) == 2   # the mode ends with the block


def test_precompile_runs_each_config_and_skips_refused_ones():
    k = FakeKernel()

    def run(cfg):
        if cfg == "refused":
            raise ValueError("shared memory")
        pc.launcher(k, (cfg,))(cfg)

    assert pc.precompile(["a", "refused", "b"], run, threads=4) == 2
    assert [w[0] for w in k.warmed] == [("a",), ("b",)] and k.launched == []
    assert pc.precompile(["a"], run, threads=1) == 0   # serial: the tuner compiles each as it times it
    assert len(k.warmed) == 2 and k.launched == []
