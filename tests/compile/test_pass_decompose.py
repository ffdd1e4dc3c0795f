"""``DecomposePrefillLinearsPass``: plain W4 linears at a static prefill M (no CUDA graphs) become
dequantize + aten.mm in the graph; compiled outputs vs eager, and every case it must leave alone."""
import pytest
import torch
import torch.nn as nn

from spear_compile.compile import records
from spear_compile.quant.config import QuantConfig
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.passes.decompose_prefill_linears import MIN_M
from spear_compile.quant.api import quantize_linear_

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
    records.active().clear()
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
    assert [r.decomposed for r in records.active().matches] == [True, True, True]
    assert [g.decomposed for g in records.active().groups] == [True]


def test_decode_m_left_alone():
    torch.manual_seed(1)
    model = Block(64, 32, "w4-pc-rtn", True)
    out, ref = _run(model, torch.randn(1, MIN_M - 1, 64))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any(r.decomposed for r in records.active().matches) and len(records.active().groups) == 1


def test_ec_node_decomposed_in_a_model():
    torch.manual_seed(2)
    model = Block(64, 32, "w4-pc-rtn", False, ec=True)
    out, ref = _run(model, torch.randn(2, MIN_M, 64))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    by_kind = {r.kind: (r.decomposed, r.decomposed_ec) for r in records.active().matches}
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
    (rec,) = records.active().matches
    assert (rec.kind, rec.decomposed, rec.decomposed_ec) == (f"ec-{'gated' if gate == 'sigmoid' else 'static'}",
                                                             True, structure)


@pytest.mark.parametrize("kw", [dict(options={"spear_decompose_prefill": False}), dict(mode="reduce-overhead"),
                                dict(dynamic=True)])
def test_off_cudagraphs_and_dynamic_left_alone(kw):
    torch.manual_seed(3)
    model = Block(64, 32, "w4-g32-rtn", True)
    out, ref = _run(model, torch.randn(1, MIN_M + 7, 64), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert records.active().matches and not any(r.decomposed for r in records.active().matches)


@pytest.mark.gpu  # our kernels traced into the graph need a GPU
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
    (rec,) = records.active().matches
    assert (rec.decomposed, rec.decomposed_ec, rec.decomposed_with) == (True, structure, "spear")


@pytest.mark.gpu  # our kernels traced into the graph need a GPU
@pytest.mark.parametrize("spec,bias", [("w4-g128-rtn", False), ("w4-pc-rtn", True)])
def test_gpu_grouped_members_dequantized_side_by_side(spec, bias):
    torch.manual_seed(6)
    model = Block(256, 384, spec, bias, dtype=torch.bfloat16).cuda()
    x = torch.randn(2, MIN_M + int(torch.randint(0, 300, ())), 256, dtype=torch.bfloat16, device="cuda")
    out, ref = _run(model, x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert [r.decomposed_with for r in records.active().matches] == ["spear"] * 3
    assert [g.decomposed for g in records.active().groups] == [True]


class Siblings(nn.Module):
    """q|k|v of one x with ECs on some of them (gated, static, different ranks), and gate|up of another x (from a
    pointwise producer) with an EC on up: each set becomes one GEMM with the ECs stacked."""

    def __init__(self, k, spec, bias, ecs, dtype=torch.float32, device=None, gen=None, raw=False):
        super().__init__()
        self.raw = raw  # return the five outputs side by side (no products that amplify bf16 rounding)
        cfg = QuantConfig.from_spec(spec)
        for name, n in (("q", k), ("k", k // 2), ("v", k // 2), ("gate", 2 * k), ("up", 2 * k)):
            lin = quantize_linear_(nn.Linear(k, n, bias=bias, dtype=dtype, device=device), cfg)
            if name in ecs:
                rank, gate = ecs[name]
                lin = CompensatedLinear.wrap(lin, rank=rank, gate=gate)
                with torch.no_grad():
                    for p in lin.ec_parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            setattr(self, name, lin)

    def forward(self, x):
        if self.raw:
            z = torch.tanh(x) * 2.0
            return torch.cat([self.q(x), self.k(x), self.v(x), self.gate(z), self.up(z)], -1)
        h = self.q(x) + self.k(x).repeat(1, 1, 2) * self.v(x).repeat(1, 1, 2)
        z = torch.tanh(h) * 2.0  # a pointwise producer: [z | 0] can be written by its kernel
        return self.gate(z)[..., : h.shape[-1]] + self.up(z)[..., : h.shape[-1]]


@pytest.mark.parametrize("bias,ecs", [
    (False, {"q": (4, "sigmoid"), "v": (3, "none"), "up": (5, "sigmoid")}),
    (True, {"k": (6, "sigmoid"), "gate": (2, "none"), "up": (7, "none")}),
    (False, {"q": (8, "sigmoid"), "k": (8, "sigmoid"), "v": (8, "sigmoid"), "gate": (4, "sigmoid")})])
def test_ec_siblings_merged_into_one_gemm(bias, ecs):
    """Fresh shapes and values each run; the EC'd linears and their siblings (grouped or not) share one GEMM."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = 32 * int(torch.randint(1, 4, (), generator=g))
    model = Siblings(k, "w4-g32-rtn", bias, ecs, gen=g)
    x = torch.randn(1, MIN_M + int(torch.randint(0, 40, (), generator=g)), k, generator=g)
    out, ref = _run(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    recs = {r.module: r for r in records.active().matches}
    assert set(recs) == {"q", "k", "v", "gate", "up"} and all(r.decomposed for r in recs.values())
    assert all(r.decomposed_ec == "kcat" for r in recs.values())
    for names in (("q", "k", "v"), ("gate", "up")):
        for nm in names:
            assert len(recs[nm].decomposed_merged) >= 1  # the other node(s) of the same x in its GEMM


def test_ec_siblings_left_apart_when_stacked_rank_too_large():
    from spear_compile.compile.passes.decompose_prefill_linears import MAX_MERGED_RANK
    g = torch.Generator().manual_seed(7)
    r = MAX_MERGED_RANK // 2 + 1
    model = Siblings(192, "w4-g32-rtn", False, {"q": (r, "sigmoid"), "k": (r - 40, "none"), "v": (41, "none")},
                     gen=g)
    out, ref = _run(model, torch.randn(1, MIN_M, 192, generator=g))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    recs = {r_.module: r_ for r_ in records.active().matches}
    assert all(rec.decomposed for rec in recs.values())
    assert not any(recs[nm].decomposed_merged for nm in ("q", "k", "v"))


@pytest.mark.gpu  # our kernels traced into the graph need a GPU
@pytest.mark.parametrize("pad_x", ["0", "1", "auto"])
@pytest.mark.parametrize("spec,bias", [("w4-g128-rtn", False), ("w4-pc-rtn", True)])
def test_gpu_ec_siblings_merged(spec, bias, pad_x, monkeypatch):
    monkeypatch.setenv("SPEAR_EC_PAD_X", pad_x)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    # stacked R = 96 over q|k|v (one gate launch with pc: all gated; one per EC with g128: v static)
    ecs = {"q": (32, "sigmoid"), "k": (32, "sigmoid"), "v": (32, "none" if spec == "w4-g128-rtn" else "sigmoid"),
           "up": (32, "sigmoid")}
    model = Siblings(256, spec, bias, ecs, dtype=torch.bfloat16, device="cuda", gen=g, raw=True)
    x = torch.randn(2, MIN_M + int(torch.randint(0, 300, (), generator=g)), 256, generator=g).to("cuda",
                                                                                                  torch.bfloat16)
    out, ref = _run(model, x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    recs = {r.module: r for r in records.active().matches}
    assert all(r.decomposed_with == "spear" and r.decomposed_ec == "kcat" for r in recs.values())
    # gate|up (R = 32) reads x from a pointwise producer: [x | 0] by pad unless off; q|k|v (R = 96 > the prologue's
    # copy limit) always pads
    assert recs["up"].decomposed_pad_x == (pad_x != "0") and recs["q"].decomposed_pad_x
