import copy
import json

import pytest
import torch

from spear_compile import CompensatedLinear, SpearError, quantize
from spear_compile.quant.config import QuantConfig
from spear_compile.ec.io import load_ecs, model_identity, save_ecs

from tests.test_ec_helpers import tiny_llama

NAMES = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def _with_random_ecs(base, gate="sigmoid"):
    m = copy.deepcopy(base)
    mods = dict(m.named_modules())
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(NAMES):
        ec = CompensatedLinear.wrap(mods[name], 3 + i, gate)
        with torch.no_grad():
            for p in ec.ec_parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, ec)
    return m


def _manifest(model, spec="w4-pc-rtn"):
    return {"quant": QuantConfig.from_spec(spec).to_dict(), "base_model": model_identity(model)}


@pytest.fixture(scope="module")
def quantized():
    return quantize(tiny_llama(), "w4-pc-rtn")


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_save_load_round_trips_exactly(tmp_path, quantized, gate):
    trained = _with_random_ecs(quantized, gate)
    save_ecs(trained, tmp_path, _manifest(quantized))
    fresh = copy.deepcopy(quantized)
    man = load_ecs(fresh, tmp_path, "w4-pc-rtn")
    assert sorted(man["modules"]) == NAMES
    a, b = dict(trained.named_modules()), dict(fresh.named_modules())
    for n in NAMES:
        assert isinstance(b[n], CompensatedLinear) and b[n].gate == gate and b[n].rank == a[n].rank
        for pa, pb in zip(a[n].ec_parameters(), b[n].ec_parameters()):
            assert pa.dtype == pb.dtype and torch.equal(pa, pb)
    ids = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, fresh(ids).logits)
        assert not torch.equal(quantized(ids).logits, fresh(ids).logits)


def _untouched(model):
    return not any(isinstance(m, CompensatedLinear) for m in model.modules())


def test_refuses_mismatches_before_mutating(tmp_path, quantized):
    save_ecs(_with_random_ecs(quantized), tmp_path, _manifest(quantized))
    m = copy.deepcopy(quantized)
    with pytest.raises(SpearError, match="w4-pc-rtn.*w3-pc-rtn"):
        load_ecs(m, tmp_path, "w3-pc-rtn")
    other = quantize(tiny_llama(hidden=32), "w4-pc-rtn")
    with pytest.raises(SpearError, match="base model"):
        load_ecs(other, tmp_path, "w4-pc-rtn")
    with pytest.raises(SpearError, match="not quantized"):
        load_ecs(tiny_llama(), tmp_path, "w4-pc-rtn")
    # a manifest naming a module the model lacks
    man = json.loads((tmp_path / "manifest.json").read_text())
    bad = dict(man, modules=dict(man["modules"], **{"model.layers.9.mlp.up_proj": {"rank": 2, "gate": "none", "shape": [8, 8]}}))
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(SpearError, match="layers.9"):
        load_ecs(m, tmp_path, "w4-pc-rtn")
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    # corrupt tensors file
    data = bytearray((tmp_path / "ecs.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "ecs.safetensors").write_bytes(bytes(data))
    with pytest.raises(SpearError, match="corrupt"):
        load_ecs(m, tmp_path, "w4-pc-rtn")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SpearError, match="JSON"):
        load_ecs(m, tmp_path, "w4-pc-rtn")
    with pytest.raises(SpearError, match="does not exist"):
        load_ecs(m, tmp_path / "nowhere", "w4-pc-rtn")
    assert _untouched(m)


def test_shape_mismatch_in_file_is_refused(tmp_path, quantized):
    trained = _with_random_ecs(quantized)
    man = save_ecs(trained, tmp_path, _manifest(quantized))
    man["modules"][NAMES[0]]["rank"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    m = copy.deepcopy(quantized)
    with pytest.raises(SpearError, match="should have shape"):
        load_ecs(m, tmp_path, "w4-pc-rtn")
    assert _untouched(m)


def test_ecs_fitted_on_other_quantized_weights_are_refused(tmp_path, quantized):
    """Same config and architecture, different codes (as GPTQ on other samples would give)."""
    save_ecs(_with_random_ecs(quantized), tmp_path, _manifest(quantized))
    m = copy.deepcopy(quantized)
    w = dict(m.named_modules())[NAMES[1]].weight
    w.qdata[0, 0] ^= 0x11  # flip one code pair of a module the ECs attach to
    with pytest.raises(SpearError, match="different quantized weights"):
        load_ecs(m, tmp_path, "w4-pc-rtn")
    assert _untouched(m)
