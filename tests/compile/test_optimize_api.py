"""optimize() / inspect() / debug(): the public compile API on small models (CPU)."""
import glob
import os
import warnings

import pytest
import torch
import torch.nn as nn

from spear_compile import SpearError
from spear_compile.compile import records
from spear_compile.compile.dumps import debug
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.inspection import add_cli, inspect
from spear_compile.compile.api import is_quantized, optimize, warm_kernels
from spear_compile.quant.weight import QuantizedWeight

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_compile")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


def test_optimize_quantizes_compiles_and_matches_float64_reference():
    m = mlp()
    x = torch.randn(5, 64)
    c = optimize(m, "w4-pc-rtn")
    assert is_quantized(m) and isinstance(m[0].weight, QuantizedWeight)
    with torch.no_grad():
        out = c(x)
        h = torch.relu(x.double() @ m[0].weight.dequantize(torch.float64).T + m[0].bias.double())
        ref = h @ m[2].weight.dequantize(torch.float64).T
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    assert [r.kind for r in records.active().matches] == ["plain", "plain"]


def test_optimize_skips_requantizing_and_keeps_ecs():
    m = mlp(1)
    optimize(m, "w4-pc-rtn")  # quantize once
    qdata = m[0].weight.qdata
    m[2] = CompensatedLinear.wrap(m[2], 4)
    torch.nn.init.normal_(m[2].ec_A, std=0.1)
    torch.nn.init.normal_(m[2].ec_B, std=0.1)
    torch._dynamo.reset()
    records.active().clear()
    c = optimize(m, "w4-pc-rtn")
    assert m[0].weight.qdata is qdata
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
    assert [r.kind for r in records.active().matches] == ["plain", "ec-gated"]


def test_optimize_rejects_bad_input():
    with pytest.raises(SpearError, match="nn.Module"):
        optimize("not a model")
    with pytest.raises(SpearError, match="unknown mode"):
        optimize(mlp(), mode="turbo")
    with pytest.raises(SpearError, match="quant must be"):
        optimize(mlp(), quant=4)
    with pytest.raises(SpearError, match="ec= needs quant="):
        optimize(mlp(), quant=None, ec="/nonexistent")
    with pytest.raises(SpearError, match="either mode= or options="):
        optimize(mlp(), mode="reduce-overhead", options={"max_autotune": False})


def test_warm_kernels_is_noop_on_cpu():
    m = mlp()
    optimize(m, "w4-pc-rtn")
    assert warm_kernels(m) == 0


def test_inspect_reports_every_quantized_linear():
    m = mlp(2)
    optimize(m, "w4-pc-rtn")
    m[2] = CompensatedLinear.wrap(m[2], 8, gate="none")
    rep = inspect(m, m=3)
    assert [(r.module, r.matched, r.kind, r.n, r.k, r.rank, r.gate) for r in rep.rows] == [
        ("0", True, "plain", 96, 64, 0, "-"), ("2", True, "ec-static", 32, 96, 8, "none")]
    assert all(r.kernel.startswith("reference") for r in rep.rows)  # CPU
    text = rep.table()
    assert "2/2 quantized linears fused" in text and "r=8 none" in text


def test_inspect_shows_why_not_fused():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(32, 16))
    from spear_compile.quant.api import quantize
    quantize(m, "w8-pc-rtn", skip=())
    rep = inspect(m)
    (row,) = rep.rows
    assert not row.matched and "4-bit container" in row.reason and "NO" in rep.table()


def test_debug_dumps_pre_and_post_pass_graphs(tmp_path):
    m = mlp(4)
    optimize(m, "w4-pc-rtn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with debug(str(tmp_path)) as d:
            with torch.no_grad():
                torch.compile(m, backend="spear")(torch.randn(2, 64))
    pre = glob.glob(os.path.join(d, "fx_graphs", "*_pre_spear.txt"))
    post = glob.glob(os.path.join(d, "fx_graphs", "*_post_spear.txt"))
    assert len(pre) == len(post) == 1
    node = "torch.ops.spear.{}.default("  # a call node (the dumps' source comments may quote the code)
    assert node.format("qlinear") in open(pre[0]).read() and node.format("qlinear") not in open(post[0]).read()
    assert node.format("fused_linear") in open(post[0]).read()


def test_inspect_cli_registers():
    import argparse
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    args = ap.parse_args(["inspect", "--model", "m", "--quant", "w4-pc-rtn", "--m", "4"])
    assert args.m == 4 and args.quant == "w4-pc-rtn" and callable(args.func)


def test_optimize_without_module_guards_matches_and_is_one_graph():
    """skip_module_guards: same fused graph and outputs; the compile takes options, not mode."""
    m = mlp(5)
    c = optimize(m, "w4-pc-rtn", skip_module_guards=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        h = torch.relu(x.double() @ m[0].weight.dequantize(torch.float64).T + m[0].bias.double())
        ref = h @ m[2].weight.dequantize(torch.float64).T
        out = c(x)
        out2 = c(torch.randn(3, 64))
    assert (out.double() - ref).norm() / ref.norm() < 1e-5 and out2.shape == out.shape
    assert [r.kind for r in records.active().matches] == ["plain", "plain"]
    assert records.active().graphs >= 1


def test_sibling_groups_finds_shared_inputs_and_tolerates_a_failing_example():
    from spear_compile.compile.api import sibling_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(64, n, bias=False) for n in (64, 32, 32, 64))

        def forward(self, x):
            return self.o(self.q(x) + torch.cat([self.k(x), self.v(x)], -1))

    b = Block()
    optimize(b, "w4-pc-rtn")  # quantize (and unwrap) in place
    assert sibling_groups(b, {"x": torch.randn(2, 64)}) == [[b.q, b.k, b.v]]
    with pytest.warns(UserWarning, match="sibling"):
        assert sibling_groups(b, {"x": torch.randn(2, 7)}) == []
