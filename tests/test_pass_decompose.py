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


def test_ec_node_decomposed_in_a_model():
    torch.manual_seed(2)
    model = Block(64, 32, "w4-pc-rtn", False, ec=True)
    out, ref = _run(model, torch.randn(2, MIN_M, 64))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    by_kind = {r.kind: (r.decomposed, r.decomposed_ec) for r in passes.RECORDS}
    assert by_kind == {"plain": (True, ""), "ec-gated": (True, "kcat")}  # o: K = 32 <= N = 64


@pytest.mark.parametrize("structure,gate,bias,rank,dtype", [
    ("kcat", "sigmoid", False, 4, torch.float32), ("kcat", "none", True, 5, torch.float32),
    ("c_in", "sigmoid", True, 3, torch.float32), ("c_in", "none", False, 8, torch.float32),
    ("kcat", "sigmoid", True, 6, torch.bfloat16), ("c_in", "sigmoid", False, 4, torch.bfloat16)])
def test_ec_structures_match_eager(structure, gate, bias, rank, dtype):
    """Fresh shapes each run; K <= N writes the EC as K-concat, K > N as addmm's C input (odd ranks: padded)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    small, large = 32 * int(torch.randint(1, 4, (), generator=g)), 32 * int(torch.randint(4, 7, (), generator=g))
    k, n = (small, large) if structure == "kcat" else (large, small)
    lin = quantize_linear_(nn.Linear(k, n, bias=bias, dtype=dtype), QuantConfig.from_spec("w4-g32-rtn"))
    model = CompensatedLinear.wrap(lin, rank=rank, gate=gate)
    with torch.no_grad():
        for p in model.ec_parameters():
            p.normal_(0, 0.2, generator=g)
    m = MIN_M + int(torch.randint(0, 50, (), generator=g))
    out, ref = _run(model, torch.randn(m, k, generator=g).to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    (rec,) = passes.RECORDS
    assert (rec.kind, rec.decomposed, rec.decomposed_ec) == (f"ec-{'gated' if gate == 'sigmoid' else 'static'}",
                                                             True, structure)


@pytest.mark.parametrize("kw", [dict(options={"spear_decompose_prefill": False}), dict(mode="reduce-overhead"),
                                dict(dynamic=True)])
def test_off_cudagraphs_and_dynamic_left_alone(kw):
    torch.manual_seed(3)
    model = Block(64, 32, "w4-g32-rtn", True)
    out, ref = _run(model, torch.randn(1, MIN_M + 7, 64), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert passes.RECORDS and not any(r.decomposed for r in passes.RECORDS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels traced into the graph need a GPU")
@pytest.mark.parametrize("structure,spec,bias", [("kcat", "w4-g128-rtn", False), ("c_in", "w4-pc-rtn", True),
                                                 ("", "w4-g64-rtn", True)])
def test_gpu_our_kernels_traced_in(structure, spec, bias):
    """On CUDA a single node's dequantize (+ EC prologue) are our Triton kernels inside Inductor's graph."""
    torch.manual_seed(5)
    k, n = (256, 512) if structure != "c_in" else (512, 256)
    lin = quantize_linear_(nn.Linear(k, n, bias=bias, dtype=torch.bfloat16, device="cuda"),
                           QuantConfig.from_spec(spec))
    model = CompensatedLinear.wrap(lin, rank=32) if structure else lin
    if structure:
        with torch.no_grad():
            for p in model.ec_parameters():
                p.normal_(0, 0.05)
    x = torch.randn(3, MIN_M + int(torch.randint(0, 300, ())), k, dtype=torch.bfloat16, device="cuda")
    out, ref = _run(model, x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    (rec,) = passes.RECORDS
    assert (rec.decomposed, rec.decomposed_ec, rec.decomposed_with) == (True, structure, "spear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels traced into the graph need a GPU")
@pytest.mark.parametrize("spec,bias", [("w4-g128-rtn", False), ("w4-pc-rtn", True)])
def test_gpu_grouped_members_dequantized_side_by_side(spec, bias):
    torch.manual_seed(6)
    model = Block(256, 384, spec, bias, dtype=torch.bfloat16).cuda()
    x = torch.randn(2, MIN_M + int(torch.randint(0, 300, ())), 256, dtype=torch.bfloat16, device="cuda")
    out, ref = _run(model, x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert [r.decomposed_with for r in passes.RECORDS] == ["spear"] * 3
    assert [g.decomposed for g in passes.GROUPS] == [True]
