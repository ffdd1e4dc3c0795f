"""``DecomposePrefillLinearsPass``: plain W4 linears at a static prefill M (no CUDA graphs) become
dequantize + aten.mm in the graph; compiled outputs vs eager, and every case it must leave alone."""
import pytest
import torch
import torch.nn as nn

from spear_compile import passes
from spear_compile.config import QuantConfig
from spear_compile.ec import CompensatedLinear
from spear_compile.passes.decompose_prefill_linears import MIN_M
from spear_compile.quantize import quantize_linear_

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_compile")


class Block(nn.Module):
    """q|k siblings (grouped by the grouping pass), o after them, optionally an EC on o."""

    def __init__(self, k, n, spec, bias, ec=False, dtype=torch.float32):
        super().__init__()
        cfg = QuantConfig.from_spec(spec)
        self.q = quantize_linear_(nn.Linear(k, n, bias=bias, dtype=dtype), cfg)
        self.k = quantize_linear_(nn.Linear(k, n // 2, bias=bias, dtype=dtype), cfg)
        o = quantize_linear_(nn.Linear(n, k, bias=False, dtype=dtype), cfg)
        self.o = CompensatedLinear.wrap(o, rank=4) if ec else o
        if ec:
            with torch.no_grad():
                for p in self.o.ec_parameters():
                    p.normal_(0, 0.1)

    def forward(self, x):
        return self.o(torch.relu(self.q(x))) + self.k(x).sum(-1, keepdim=True)


def _run(model, x, **kw):
    passes.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="spear", **kw)(x)
    return out, ref


@pytest.mark.parametrize("spec,bias,dtype", [("w4-pc-rtn", True, torch.float32), ("w4-g32-rtn", False, torch.float32),
                                             ("w4-g32-rtn", True, torch.bfloat16)])
def test_prefill_m_decomposed_and_exact(spec, bias, dtype):
    torch.manual_seed(0)
    model = Block(64, 32, spec, bias, dtype=dtype)
    m = MIN_M + int(torch.randint(0, 40, ()))
    x = torch.randn(1, m, 64, dtype=dtype)
    out, ref = _run(model, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert [r.decomposed for r in passes.RECORDS] == [True, True, True]
    assert [g.decomposed for g in passes.GROUPS] == [True]


def test_decode_m_left_alone():
    torch.manual_seed(1)
    model = Block(64, 32, "w4-pc-rtn", True)
    out, ref = _run(model, torch.randn(1, MIN_M - 1, 64))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any(r.decomposed for r in passes.RECORDS) and len(passes.GROUPS) == 1


def test_ec_node_left_alone():
    torch.manual_seed(2)
    model = Block(64, 32, "w4-pc-rtn", False, ec=True)
    out, ref = _run(model, torch.randn(2, MIN_M, 64))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    by_kind = {r.kind: r.decomposed for r in passes.RECORDS}
    assert by_kind == {"plain": True, "ec-gated": False}


@pytest.mark.parametrize("kw", [dict(options={"spear_decompose_prefill": False}), dict(mode="reduce-overhead"),
                                dict(dynamic=True)])
def test_off_cudagraphs_and_dynamic_left_alone(kw):
    torch.manual_seed(3)
    model = Block(64, 32, "w4-g32-rtn", True)
    out, ref = _run(model, torch.randn(1, MIN_M + 7, 64), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert passes.RECORDS and not any(r.decomposed for r in passes.RECORDS)
