"""RTN quantization, packing, the QuantizedWeight subclass (eager, torch.compile, torchao) and byte accounting."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_compile import QuantConfig, QuantizedWeight, SpearError, model_bytes, quantize
from spear_compile.quant.packing import pack, unpack
from spear_compile.perplexity import tokenize_file, windows
from spear_compile.quant.rtn import dequantize, rtn

ASSETS = Path(__file__).resolve().parents[2] / "spear_compile" / "assets"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128, None]),
       bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16),
       spread=st.floats(1e-3, 1e2))
def test_rtn_error_bound(n, groups, group_size, bits, symmetric, dtype, seed, spread):
    k = groups * (group_size or 32)
    gs = k if group_size is None else group_size
    gen = torch.Generator().manual_seed(seed)
    w = ((torch.randn(n, k, generator=gen) + 0.3 * torch.rand(n, 1, generator=gen)) * spread).to(dtype)
    q, scale, zero = rtn(w, bits, gs, symmetric)
    assert q.dtype == torch.uint8 and q.shape == (n, k) and int(q.max()) <= 2**bits - 1
    assert scale.shape == zero.shape == (n, k // gs) and scale.dtype == zero.dtype == dtype
    assert (scale > 0).all()
    s = scale.float().repeat_interleave(gs, dim=1)
    z = zero.float().repeat_interleave(gs, dim=1)
    err = (w.float() - dequantize(q, scale, zero)).abs()
    pos = w.float() / s + z  # real-valued code position
    inside = (pos >= -0.5) & (pos <= 2**bits - 1 + 0.5)
    tol = s / 2 * (1 + 1e-5) + 1e-6 * w.float().abs()
    assert (err <= tol)[inside].all()
    assert (err <= s * (1 + 1e-5) + 1e-6 * w.float().abs()).all()  # edges: zero-point rounding costs ≤ one step
    if symmetric:
        assert inside.all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), half_k=st.integers(1, 40), container=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_pack_round_trip(n, half_k, container, seed):
    k = 2 * half_k
    q = torch.randint(0, 2**container, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack(q, container)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2 if container == 4 else k)
    assert torch.equal(unpack(packed, k), q)
    if container == 4:
        assert torch.equal(packed & 0xF, q[:, 0::2])  # low nibble = even k


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("shape", [(5,), (2, 7)])
@pytest.mark.parametrize("group_size,bits", [(None, 4), (32, 4), (64, 3), (None, 8)])
def test_linear_matches_float64_reference(dtype, tol, shape, group_size, bits):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape, group_size, bits)) % 2**31)
    n, k = 24, 128
    w = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    qw = QuantizedWeight.from_float(w, bits, group_size)
    x = torch.randn(*shape, k, generator=gen).to(dtype)
    ref_w = dequantize(qw.codes(), qw.scale.double(), qw.zero.double()).double()
    ref = x.double() @ ref_w.t() + bias.double()
    y = F.linear(x, qw, bias)
    assert y.dtype == dtype and y.shape == (*shape, n)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() < tol
    y0 = F.linear(x, qw)
    assert (y0.double() - (ref - bias.double())).norm() / ref.norm() < tol


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


def test_compile_fullgraph_no_graph_break_no_recompile():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = quantize(TwoLinears().to(torch.bfloat16), "w4-g32-rtn")
    assert isinstance(model.a.weight, QuantizedWeight)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        eager = model(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out1 = compiled(x)
            out2 = compiled(torch.randn(3, 64, dtype=torch.bfloat16))
    assert counter.frame_count == 1
    assert torch.isfinite(out2).all()
    assert (out1.float() - eager.float()).norm() / eager.float().norm() < 1e-2
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_torchao_quantize_equals_spear_quantize():
    from torchao.quantization import quantize_

    cfg = QuantConfig(bits=4, group_size=32, symmetric=True)
    torch.manual_seed(1)
    a = TwoLinears().to(torch.bfloat16)
    b = TwoLinears().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    quantize(a, cfg, skip=())
    quantize_(b, cfg)
    for name in ("a", "b"):
        wa, wb = getattr(a, name).weight, getattr(b, name).weight
        assert isinstance(wb, QuantizedWeight)
        for part in ("qdata", "scale", "zero"):
            assert torch.equal(getattr(wa, part), getattr(wb, part))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x))
    with pytest.raises(SpearError, match="GPTQ needs calibration"):
        quantize_(TwoLinears(), QuantConfig(method="gptq"))


def test_bad_inputs_name_the_module(tmp_path):
    model = nn.Sequential(nn.Linear(48, 8), nn.ReLU())
    with pytest.raises(SpearError, match=r"0\.weight.*K=48.*group_size=32"):
        quantize(model, "w4-g32-rtn")
    with pytest.raises(SpearError, match="unsupported bits=5"):
        QuantConfig(bits=5)
    with pytest.raises(SpearError, match="not understood"):
        QuantConfig.from_spec("w4-perchannel")
    bad = nn.Sequential(nn.Linear(32, 8))
    with torch.no_grad():
        bad[0].weight[2, 3] = float("inf")
    with pytest.raises(SpearError, match=r"0\.weight.*NaN/inf"):
        quantize(bad, "w4-pc-rtn")
    with pytest.raises(SpearError, match="target '1' is a ReLU, not an nn.Linear"):
        quantize(model, "w4-pc-rtn", targets=["1"])
    with pytest.raises(SpearError, match="'nope' is not a module"):
        quantize(model, "w4-pc-rtn", targets=["nope"])

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "spear-ref-16m"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SpearError, match="empty.txt.*is empty"):
        tokenize_file(tok, empty)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    ids = tokenize_file(tok, short)
    with pytest.raises(SpearError, match="short.txt.*shorter than one window of 513"):
        windows(ids, 512, source=str(short))


def test_w4_per_channel_byte_accounting_on_reference_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ASSETS / "spear-ref-16m"), dtype=torch.bfloat16)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * c.num_hidden_layers  # (N, K)
    expected_q = sum(n * k // 2 + 2 * n * 2 for n, k in shapes)  # packed nibbles + bf16 scale and zero per row
    other = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                list(model.parameters()) + list(model.buffers())}.values()) - sum(n * k * 2 for n, k in shapes)
    quantize(model, "w4-pc-rtn")
    mb = model_bytes(model)
    assert mb["quantized_weights"] == expected_q == mb["quantized_weights_nominal"]
    assert mb["total"] == expected_q + other
    assert mb["total"] == 12_706_816  # measured figure the EC budget is defined against


def test_every_supported_method_has_a_quantizer():
    from spear_compile.quant.api import METHODS
    from spear_compile.quant.config import SUPPORTED_METHODS
    assert set(METHODS) == set(SUPPORTED_METHODS)
