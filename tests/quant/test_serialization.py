"""save_quantized / load_quantized: bit-exact round trip (with ECs); corrupt/mismatched refused, no half-load."""
import json
import struct

import pytest
import torch

from spear_compile import CompensatedLinear, QuantizedWeight, SpearError, quantize
from spear_compile.quant.io import load_quantized, save_quantized


def tiny_llama(seed=0, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def quantized_with_ecs(spec="w4-g32-rtn"):
    model = quantize(tiny_llama(), spec)
    gen = torch.Generator().manual_seed(3)
    for name, gate, rank in (("model.layers.0.self_attn.q_proj", "sigmoid", 4), ("model.layers.1.mlp.down_proj", "none", 8)):
        parent, _, leaf = name.rpartition(".")
        ec = CompensatedLinear.wrap(model.get_submodule(name), rank, gate)
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype)
        setattr(model.get_submodule(parent), leaf, ec)
    return model


@pytest.fixture
def saved(tmp_path):
    model = quantized_with_ecs()
    path = save_quantized(model, tmp_path / "m.safetensors", "w4-g32-rtn")
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded = load_quantized(tiny_llama(seed=123), path)  # different init: everything must come from the file
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "weight", None), QuantizedWeight):
            other = loaded.get_submodule(name).weight
            assert isinstance(other, QuantizedWeight)
            for part in ("qdata", "scale", "zero"):
                assert torch.equal(getattr(mod.weight, part), getattr(other, part)), (name, part)
            assert (other.bits, other.group_size, other.symmetric) == (mod.weight.bits, mod.weight.group_size, mod.weight.symmetric)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, CompensatedLinear) and (b.rank, b.gate) == (a.rank, a.gate)
        for pa, pb in zip(a.ec_parameters(), b.ec_parameters()):
            assert torch.equal(pa, pb)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def snapshot(model):
    return {k: (v.qdata.clone() if isinstance(v, QuantizedWeight) else v.detach().clone())
            for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, CompensatedLinear) for m in model.modules())


def test_flipped_payload_byte_is_refused(saved, tmp_path):
    _, path = saved
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header_len + 100] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    fresh = tiny_llama(seed=5)
    before = snapshot(fresh)
    with pytest.raises(SpearError, match="checksum mismatch"):
        load_quantized(fresh, bad)
    assert_untouched(fresh, before)


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SpearError, match="not a readable safetensors file"):
        load_quantized(tiny_llama(), bad)


def test_other_architecture_is_refused(saved):
    _, path = saved
    for other in (tiny_llama(hidden=128), tiny_llama(layers=1)):
        before = snapshot(other)
        with pytest.raises(SpearError, match="load_quantized"):
            load_quantized(other, path)
        assert_untouched(other, before)


def test_missing_tensor_is_refused(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dropped = "model.layers.1.self_attn.v_proj.weight.scale"
    del tensors[dropped]
    info = json.loads(meta["spear"])
    del info["sha256"][dropped]  # consistent checksums: the loader must still see the tensor is missing
    bad = tmp_path / "missing.safetensors"
    save_file(tensors, str(bad), metadata={"spear": json.dumps(info)})
    with pytest.raises(SpearError, match="missing tensor.*v_proj.weight.scale"):
        load_quantized(tiny_llama(), bad)


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(SpearError, match="no quantized linear"):
        save_quantized(tiny_llama(), tmp_path / "x.safetensors")


@pytest.mark.parametrize("zeros,match", [(0.5, "non-integer zero points"), (17.0, r"zero points in \[\d+, 17\], outside \[0, 15\]")],
                         ids=["fractional", "out-of-range"])
def test_zero_points_that_are_not_codes_are_refused(saved, tmp_path, zeros, match):
    """Zero points are integers in the codes' range (what RTN and GPTQ make): the kernels subtract them from the
    codes exactly (the batched kernel's ``zsub`` tile in bf16), so a file with other zeros is refused by name, with
    consistent checksums, and the model is left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from spear_compile.quant.io import _sha256
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.up_proj.weight.zero"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = zeros
    info = json.loads(meta["spear"])
    info["sha256"][key] = _sha256(tensors[key])
    bad = tmp_path / "zeros.safetensors"
    save_file(tensors, str(bad), metadata={"spear": json.dumps(info)})
    other = quantize(tiny_llama(), "w4-g32-rtn")
    before = snapshot(other)
    with pytest.raises(SpearError, match=f"up_proj.weight.zero holds {match}"):
        load_quantized(other, bad)
    assert_untouched(other, before)
