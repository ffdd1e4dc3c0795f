"""GPTQ: beats RTN on layer output error with correlated inputs; valid codes; model level works."""
import pytest
import torch
import torch.nn as nn

from spear_compile import QuantConfig, QuantizedWeight, SpearError, quantize
from spear_compile.quant.gptq import gptq_quantize_weight
from spear_compile.quant.api import quantizable_linears
from spear_compile.quant.rtn import dequantize, rtn


def correlated_inputs(k, t, gen):
    z = torch.randn(t, k, generator=gen)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + 0.2 * torch.eye(k)
    return z @ mix


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, False), (4, 32, False), (3, None, True), (4, 64, True), (8, None, False)])
def test_gptq_beats_rtn_on_output_error(bits, group_size, symmetric):
    gen = torch.Generator().manual_seed(bits * 100 + (group_size or 0))
    n, k, t = 48, 128, 1024
    w = torch.randn(n, k, generator=gen)
    x = correlated_inputs(k, t, gen)
    h = 2 * x.t() @ x / t
    gs = k if group_size is None else group_size
    q, s, z = rtn(w, bits, gs, symmetric)
    err_rtn = ((w - dequantize(q, s, z)) @ x.t()).norm()
    q, s, z = gptq_quantize_weight(w, h, bits, group_size, symmetric, damp=0.01, block=32)
    assert q.dtype == torch.uint8 and q.shape == (n, k) and int(q.max()) <= 2**bits - 1
    assert s.shape == (n, k // gs) and z.shape == (n, k // gs) and s.dtype == w.dtype
    err_gptq = ((w - dequantize(q, s, z)) @ x.t()).norm()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


def test_gptq_identity_hessian_close_to_rtn_and_dead_columns():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen)
    h = torch.eye(64)
    h[5, 5] = 0.0  # dead input channel
    q, s, z = gptq_quantize_weight(w, h, 4, None, False)
    deq = dequantize(q, s, z)
    assert torch.isfinite(deq).all()
    assert (deq[:, 5].abs() <= s[:, 0].float() / 2 + 1e-6).all()  # dead column quantized as ~0
    qr, sr, zr = rtn(w, 4, 64, False)
    live = torch.arange(64) != 5  # diagonal H: no error feedback, so live columns match RTN closely
    assert (w - deq)[:, live].norm() < 1.05 * (w - dequantize(qr, sr, zr))[:, live].norm()


def test_gptq_weight_errors_name_shapes():
    with pytest.raises(SpearError, match="Hessian shape"):
        gptq_quantize_weight(torch.randn(8, 32), torch.eye(16), 4, None, False, name="layer.w")
    with pytest.raises(SpearError, match="layer.w.*not divisible"):
        gptq_quantize_weight(torch.randn(8, 48), torch.eye(48), 4, 32, False, name="layer.w")
    bad = torch.randn(8, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(SpearError, match="NaN"):
        gptq_quantize_weight(bad, torch.eye(32), 4, None, False)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_gptq_model_quantizes_all_linears_and_beats_rtn_on_logits():
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama()
    with torch.no_grad():
        logits_fp = ref(calib).logits
    m_rtn = quantize(tiny_llama(), "w3-pc-rtn")
    m_gptq = quantize(tiny_llama(), "w3-pc-gptq", calib=calib, progress=False)
    lins = quantizable_linears(m_gptq)
    assert len(lins) == 14 and all(isinstance(m.weight, QuantizedWeight) for _, m in lins)
    assert not isinstance(m_gptq.lm_head.weight, QuantizedWeight)
    with torch.no_grad():
        err_rtn = (m_rtn(calib).logits - logits_fp).norm()
        err_gptq = (m_gptq(calib).logits - logits_fp).norm()
    assert err_gptq < err_rtn, (float(err_gptq), float(err_rtn))


@pytest.mark.parametrize("calib,match", [(None, "calibration tokens are required"),
                                         (torch.zeros(0, 16, dtype=torch.long), "empty"),
                                         (torch.zeros(4, 1, dtype=torch.long), "too short"),
                                         (torch.zeros(4, 16), "integer tensor")])
def test_gptq_model_refuses_bad_calib(calib, match):
    with pytest.raises(SpearError, match=match):
        quantize(tiny_llama(), QuantConfig(bits=4, method="gptq"), calib=calib, progress=False)
