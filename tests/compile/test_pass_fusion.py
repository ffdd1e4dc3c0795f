"""The fusion pass on single modules (CPU Inductor): every variant fuses and stays correct."""
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spear_compile.compile.backend  # noqa: F401  (registers backend="spear")
from spear_compile.compile import records
from spear_compile.quant.config import QuantConfig
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.passes.fuse_quantized_linear import FUSED, QLINEAR
from spear_compile.quant.api import quantize_linear_

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_compile")


def make(gate, bias, dtype, k=64, n=48, rank=8, spec="w4-pc-rtn", seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k, generator=g) * 0.1
    if bias:
        lin.bias.data = torch.randn(n, generator=g) * 0.1
    lin = lin.to(dtype)
    quantize_linear_(lin, QuantConfig.from_spec(spec))
    if gate == "plain":
        return lin
    m = CompensatedLinear.wrap(lin, rank, gate=gate)
    for p in m.ec_parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.2).to(dtype)
    return m


def float64_reference(m, x):
    """Independent reference: float64 dequantize-then-matmul plus the EC formula."""
    lin_w = m.weight.dequantize(torch.float64)
    x = x.double()
    y = x @ lin_w.T
    if m.bias is not None:
        y = y + m.bias.double()
    if isinstance(m, CompensatedLinear):
        u = x @ m.ec_A.double().T
        if m.gate == "sigmoid":
            u = u * 2 * torch.sigmoid(u @ m.ec_gate_w.double().T + m.ec_gate_b.double())
        y = y + u @ m.ec_B.double().T
    return y


class GraphCapture:
    """A user post-grad pass: composed after ours, it sees the fused graph."""

    def __init__(self):
        self.targets = []

    def __call__(self, graph):
        self.targets.append([n.target for n in graph.nodes if n.op == "call_function"])


def compile_and_run(m, x):
    cap = GraphCapture()
    with torch.no_grad():
        out = torch.compile(m, backend="spear", options={"post_grad_custom_post_pass": cap})(x)
    return out, cap


SHAPES = {"2d": (5, 64), "3d": (2, 3, 64), "2d-m1": (1, 64), "3d-m1": (1, 1, 64)}
CASES = list(itertools.product(("sigmoid", "none", "plain"), (False, True), (torch.bfloat16, torch.float32), ("2d", "3d")))
CASES += list(itertools.product(("sigmoid", "none"), (False,), (torch.bfloat16, torch.float32), ("2d-m1", "3d-m1")))


@pytest.mark.parametrize("gate,bias,dtype,layout", CASES)
def test_variant_fuses_and_matches(gate, bias, dtype, layout):
    m = make(gate, bias, dtype, seed=len(CASES))
    shape = SHAPES[layout]
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        eager = m(x)
    out, cap = compile_and_run(m, x)
    # exactly one fused op, no qlinear left, the EC ops gone
    (targets,) = cap.targets
    assert targets.count(FUSED) == 1 and QLINEAR not in targets
    if gate != "plain":
        assert torch.ops.aten.sigmoid.default not in targets
        assert torch.ops.aten.mm.default not in targets
    (rec,) = records.active().matches
    assert rec.matched and rec.kind == {"sigmoid": "ec-gated", "none": "ec-static", "plain": "plain"}[gate]
    assert rec.rank == (0 if gate == "plain" else 8) and rec.bias == bias and rec.gated == (gate == "sigmoid")
    assert out.shape == eager.shape and out.dtype == dtype
    ref = float64_reference(m, x)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - ref).norm() / ref.norm() < tol
    assert (out.float() - eager.float()).norm() / eager.float().norm() < tol


class TanhGated(CompensatedLinear):
    """An EC-like chain with a gate the kernels do not implement."""

    def compensation(self, x):
        u = F.linear(x, self.ec_A)
        return F.linear(u * torch.tanh(F.linear(u, self.ec_gate_w, self.ec_gate_b)), self.ec_B)


def test_unlowerable_gate_stays_unfused_correct_and_warns():
    m = make("sigmoid", False, torch.float32)
    m.__class__ = TanhGated
    x = torch.randn(2, 3, 64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, cap = compile_and_run(m, x)
    assert any("left as the reference spear::qlinear" in str(i.message) for i in w)
    (targets,) = cap.targets
    assert QLINEAR in targets and FUSED not in targets
    (rec,) = records.active().matches
    assert not rec.matched and "low-rank branch" in rec.reason
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_8bit_container_is_not_fused_and_warns():
    m = make("plain", True, torch.float32, spec="w8-pc-rtn")
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match="not a 4-bit container"):
        out, cap = compile_and_run(m, x)
    assert QLINEAR in cap.targets[0] and FUSED not in cap.targets[0]
    ref = float64_reference(m, x)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_counts_several_modules_and_shared_input():
    """Two ECs reading the same 3-D input (shared reshape), one plain, one static: 4 fused."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = make("sigmoid", False, torch.float32, seed=1)
            self.b = make("sigmoid", True, torch.float32, seed=2)
            self.c = make("plain", False, torch.float32, seed=3)
            self.d = make("none", False, torch.float32, k=48, n=64, seed=4)

        def forward(self, x):
            return self.d(torch.relu(self.a(x)) * self.b(x) + self.c(x))

    blk = Block()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = blk(x)
    out, cap = compile_and_run(blk, x)
    assert cap.targets[0].count(FUSED) == 4 and QLINEAR not in cap.targets[0]
    kinds = sorted((r.module, r.kind) for r in records.active().matches)
    assert kinds == [("a", "ec-gated"), ("b", "ec-gated"), ("c", "plain"), ("d", "ec-static")]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
