"""The ecosystem's save paths: Hugging Face save_pretrained / from_pretrained through the registered
"spear" quantization method, torch.save / torch.load(weights_only=True) of the state dict (both
bit-exact, with ECs), QuantizedWeight.to(device) through torchao's machinery, and torchao's quantize_
skipping the same modules as spear_compile.quantize by default."""
import io
import json

import pytest
import torch
import torch.nn as nn

import spear_compile
from spear_compile import CompensatedLinear, QuantizedWeight, SpearError

from test_ec_helpers import save_tiny

transformers = pytest.importorskip("transformers")
EC = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")


def _with_ecs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, gate in zip(EC, ("sigmoid", "none")):
        parent, _, leaf = name.rpartition(".")
        ec = CompensatedLinear.wrap(model.get_submodule(name), 4, gate)
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p.dtype)
        setattr(model.get_submodule(parent), leaf, ec)
    return model


def _assert_bit_identical(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k, x in sa.items():
        y = sb[k]
        assert type(x) is type(y), k
        if isinstance(x, QuantizedWeight):
            assert (x.bits, x.group_size, x.symmetric, x.shape) == (y.bits, y.group_size, y.symmetric, y.shape), k
            for part in ("qdata", "scale", "zero"):
                px, py = getattr(x, part), getattr(y, part)
                assert px.dtype == py.dtype and torch.equal(px, py), f"{k}.{part}"
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), k
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def _logits(model, seed=3):
    ids = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", ["w4-g32-rtn", "w4-pc-sym-rtn", "w3-pc-rtn", "w8-g64-rtn"])
def test_save_pretrained_from_pretrained_round_trip_with_ecs(tmp_path, spec):
    fp_dir = save_tiny(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()
    _with_ecs(spear_compile.quantize(model, spec, progress=False))
    model.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "spear" and qc["spec"] == spec and sorted(qc["ec_modules"]) == sorted(EC)
    assert len(qc["modules"]) == 14 and "lm_head" not in qc["modules"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    _assert_bit_identical(model, loaded)
    assert torch.equal(_logits(model), _logits(loaded))
    # and again: a loaded model saves the same checkpoint
    loaded.save_pretrained(tmp_path / "q2")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q2").eval()
    _assert_bit_identical(model, again)


def test_from_pretrained_quantizes_a_float_checkpoint_on_load(tmp_path):
    fp_dir = save_tiny(tmp_path / "fp")
    cfg = spear_compile.hf_quantizer.SpearHfConfig("w4-g32-rtn")
    on_load = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16, quantization_config=cfg)
    ref = spear_compile.quantize(transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16),
                                 "w4-g32-rtn")
    _assert_bit_identical(ref, on_load)


def test_from_pretrained_refuses_a_checkpoint_for_another_shape(tmp_path):
    fp_dir = save_tiny(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16)
    spear_compile.quantize(model, "w4-pc-rtn").save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["shape"] = [64, 64]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SpearError, match="model.layers.0.mlp.up_proj"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_from_pretrained_refuses_another_dtype(tmp_path):
    fp_dir = save_tiny(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16)
    spear_compile.quantize(model, "w4-pc-rtn").save_pretrained(tmp_path / "q")
    with pytest.raises(SpearError, match="bfloat16"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_torch_save_load_weights_only_round_trip_with_ecs(tmp_path):
    fp_dir = save_tiny(tmp_path / "fp")
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()  # noqa: E731
    model = _with_ecs(spear_compile.quantize(load(), "w4-g32-rtn"))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _with_ecs(spear_compile.quantize(load(), "w4-g32-rtn"), seed=99)  # same structure, other EC values
    fresh.load_state_dict(state)
    _assert_bit_identical(model, fresh)
    assert torch.equal(_logits(model), _logits(fresh))
    into_float = load()  # a float model takes the quantized weights with assign=True
    plain = spear_compile.quantize(load(), "w4-g32-rtn")
    into_float.load_state_dict(plain.state_dict(), assign=True)
    _assert_bit_identical(plain, into_float)


def test_quantized_weight_to_device_moves_inner_tensors_via_torchao():
    lin = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    spear_compile.quantize(nn.Sequential(lin), "w4-g32-rtn")
    w = lin.weight
    moved = w.to("meta")
    assert type(moved) is QuantizedWeight and all(getattr(moved, p).is_meta for p in ("qdata", "scale", "zero"))
    assert moved.dtype == torch.bfloat16 and (moved.bits, moved.group_size) == (w.bits, w.group_size)
    seq = nn.Sequential(lin).to("meta")
    assert seq[0].weight.qdata.is_meta and type(seq[0].weight) is QuantizedWeight


def test_torchao_quantize_skips_the_same_modules_by_default():
    from torchao.quantization import quantize_

    from test_ec_helpers import tiny_llama

    def untied():
        m = tiny_llama()
        m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
        return m
    a, b = untied(), untied()
    quantize_(a, spear_compile.QuantConfig(bits=4, group_size=32))
    spear_compile.quantize(b, spear_compile.QuantConfig(bits=4, group_size=32))
    names = lambda m: sorted(n for n, x in m.named_modules() if isinstance(getattr(x, "weight", None), QuantizedWeight))  # noqa: E731
    assert names(a) == names(b) and len(names(a)) == 14 and "lm_head" not in names(a)
    _assert_bit_identical(a, b)


def test_from_pretrained_refuses_zero_points_that_are_not_codes(tmp_path):
    """A checkpoint whose zero points are not integer codes (the kernels subtract them exactly) is refused with the
    module named, not loaded into wrong outputs."""
    from safetensors.torch import load_file, save_file
    fp_dir = save_tiny(tmp_path / "fp")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16)
    spear_compile.quantize(model, "w4-pc-rtn").save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.gate_proj.weight_zero"
    tensors[key] = tensors[key].clone()
    tensors[key][3, 0] += 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(SpearError, match="gate_proj.weight_zero of the checkpoint holds non-integer zero points"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
