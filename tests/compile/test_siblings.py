"""compile.siblings: sibling quantized linears (q|k|v, gate|up) re-laid as one buffer's adjacent row blocks keep
every value, the logits and every save path bit-exact (a tiny HF Llama, CPU); optimize() packs them."""
import pytest
import torch

import spear_compile
from spear_compile.compile.siblings import pack_siblings
from spear_compile.lowering.grouped import adjacent_rows
from spear_compile.quant.io import load_quantized, save_quantized

from tests.test_ec_helpers import save_tiny, wrap_random_ec

transformers = pytest.importorskip("transformers")
EC_NAME = "model.layers.0.self_attn.k_proj"  # an EC member stays out of its group: q|v packed without it


def _load(fp_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16).eval()


def _quantized(fp_dir, spec="w4-g32-rtn"):
    model = spear_compile.quantize(_load(fp_dir), spec, progress=False)
    wrap_random_ec(model, EC_NAME, 4, "sigmoid", seed=0)
    return model


def _logits(model):
    ids = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


def _parts(model):
    return {n: tuple(getattr(m.weight, p).clone() for p in ("qdata", "scale", "zero"))
            for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), spear_compile.QuantizedWeight)}


def _groups(model):
    layers = len(model.model.layers)
    out = []
    for i in range(layers):
        attn = [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
        out.append([n for n in attn if n != EC_NAME])
        out.append([f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])
    return out


def _adjacent(model, names):
    mods = [model.get_submodule(n) for n in names]
    return all(adjacent_rows([getattr(m.weight, p) for m in mods]) is not None for p in ("qdata", "scale", "zero"))


def test_pack_siblings_keeps_values_logits_and_saves_bit_exact(tmp_path):
    fp_dir = save_tiny(tmp_path / "fp")
    model = _quantized(fp_dir)
    before, logits = _parts(model), _logits(model)
    groups = _groups(model)
    assert not any(_adjacent(model, g) for g in groups)
    assert pack_siblings(model) == len(groups)
    assert all(_adjacent(model, g) for g in groups)
    assert not _adjacent(model, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    after = _parts(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], after[n]))
    assert torch.equal(_logits(model), logits)
    assert pack_siblings(model) == 0  # already packed

    save_quantized(model, tmp_path / "q.safetensors")
    loaded = load_quantized(_load(fp_dir), tmp_path / "q.safetensors")
    assert torch.equal(_logits(loaded), logits)
    model.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(again), logits)
    assert all(torch.equal(a, b) for n, parts in _parts(again).items() for a, b in zip(parts, before[n]))


def test_optimize_packs_siblings_unless_switched_off(tmp_path, monkeypatch):
    fp_dir = save_tiny(tmp_path / "fp")
    model = _quantized(fp_dir)
    spear_compile.optimize(model, "w4-g32-rtn")
    assert all(_adjacent(model, g) for g in _groups(model))
    monkeypatch.setenv("SPEAR_PACK_SIBLINGS", "0")
    model = _quantized(fp_dir)
    spear_compile.optimize(model, "w4-g32-rtn")
    assert not any(_adjacent(model, g) for g in _groups(model))


@pytest.mark.parametrize("pack", ["1", "0"])
def test_compiled_graph_hands_the_grouped_op_adjacent_members(tmp_path, monkeypatch, fresh_compile, pack):
    """Through optimize()'s compiled graph (CPU Inductor, a 20-token prefill) the grouped op receives the packed
    members still adjacent (the kernels' path is faked on the CPU: the reference runs, the adjacency is recorded);
    with packing off they never are."""
    import importlib
    from spear_compile.lowering import grouped
    fused_linear = importlib.import_module("spear_compile.lowering.fused_linear")  # the module, not its op
    seen = []

    def launch_grouped(x, qdata, scale, zero, bias, group_size):
        seen.append(grouped.adjacent_members(qdata, scale, zero, bias) is not None)
        return fused_linear.reference_grouped_linear(x, qdata, scale, zero, bias, group_size)

    monkeypatch.setattr(fused_linear, "_kernel_path", lambda x, qdata: fused_linear.reference_fused_linear)
    monkeypatch.setattr(grouped, "launch_grouped", launch_grouped)
    monkeypatch.setenv("SPEAR_PACK_SIBLINGS", pack)
    model = _quantized(save_tiny(tmp_path / "fp"))
    ref = _logits(model)
    spear_compile.optimize(model, "w4-g32-rtn")
    assert torch.allclose(_logits(model), ref, rtol=2e-2, atol=2e-2)
    assert len(seen) >= len(_groups(model)) and all(seen) == (pack == "1") and any(seen) == (pack == "1")


# ---- siblings that all carry an EC: their ECs merged into one (lowering.grouped.merged_ec) ---------------------
def _ec_groups(model):
    out = []
    for i in range(len(model.model.layers)):
        out.append([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"])
        out.append([f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])
    return out


def _ec_quantized(fp_dir, gate="sigmoid"):
    model = spear_compile.quantize(_load(fp_dir), "w4-g32-rtn", progress=False)
    for s, names in enumerate(_ec_groups(model)):
        for j, name in enumerate(names):
            wrap_random_ec(model, name, 4, gate, seed=10 * s + j)
    wrap_random_ec(model, "model.layers.0.self_attn.o_proj", 4, gate, seed=999)  # no sibling: left alone
    return model


def _ec_parts(model):
    return {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in model.named_modules()
            if isinstance(m, spear_compile.CompensatedLinear) for p in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b")
            if getattr(m, p) is not None}


def _merged(model, names):
    from spear_compile.lowering.grouped import merged_ec
    mods = [model.get_submodule(n) for n in names]
    return merged_ec(*([getattr(m, p) for m in mods] for p in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b")))


def test_ec_siblings_stay_unmerged_by_default(tmp_path):
    """Merging is opt-in (``SPEAR_MERGE_SIBLING_ECS=1``): on an H100 it cost more than it saved at M >= 16."""
    model = _ec_quantized(save_tiny(tmp_path / "fp"))
    assert pack_siblings(model) == 0
    assert not any(_merged(model, g) for g in _ec_groups(model))


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_pack_siblings_merges_sibling_ecs_and_keeps_values_and_saves(tmp_path, monkeypatch, gate):
    from spear_compile.ec.io import load_ecs, model_identity, save_ecs
    from spear_compile.quant.config import QuantConfig
    monkeypatch.setenv("SPEAR_MERGE_SIBLING_ECS", "1")
    fp_dir = save_tiny(tmp_path / "fp")
    model = _ec_quantized(fp_dir, gate)
    before, ecs, logits = _parts(model), _ec_parts(model), _logits(model)
    groups = _ec_groups(model)
    assert not any(_merged(model, g) for g in groups)
    assert pack_siblings(model) == len(groups)
    assert all(_adjacent(model, g) and _merged(model, g) is not None for g in groups)
    a, b, gw, gb = _merged(model, groups[0])
    assert b.shape == (sum(model.get_submodule(n).out_features for n in groups[0]), 12) and a.shape[0] == 12
    assert (gw is None) == (gate == "none")
    assert all(torch.equal(t, ecs[n]) for n, t in _ec_parts(model).items()) and _ec_parts(model).keys() == ecs.keys()
    assert all(torch.equal(a, b) for n in before for a, b in zip(before[n], _parts(model)[n]))
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=1e-5)
    assert pack_siblings(model) == 0  # already packed

    manifest = {"quant": QuantConfig.from_spec("w4-g32-rtn").to_dict(), "base_model": model_identity(model)}
    save_ecs(model, tmp_path / "ecs", manifest)
    again = spear_compile.quantize(_load(fp_dir), "w4-g32-rtn", progress=False)
    load_ecs(again, tmp_path / "ecs", "w4-g32-rtn")
    assert all(torch.equal(t, ecs[n]) for n, t in _ec_parts(again).items()) and _ec_parts(again).keys() == ecs.keys()
    save_quantized(model, tmp_path / "q.safetensors")
    loaded = load_quantized(_load(fp_dir), tmp_path / "q.safetensors")
    assert all(torch.equal(t, ecs[n]) for n, t in _ec_parts(loaded).items()) and _ec_parts(loaded).keys() == ecs.keys()


def test_group_ec_linears_off_leaves_ecs_unmerged(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEAR_GROUP_EC_LINEARS", "0")
    monkeypatch.setenv("SPEAR_MERGE_SIBLING_ECS", "1")
    model = _ec_quantized(save_tiny(tmp_path / "fp"))
    assert pack_siblings(model) == 0
    assert not any(_merged(model, g) for g in _ec_groups(model))


def test_compiled_graph_hands_the_grouped_ec_op_the_merged_layout(tmp_path, monkeypatch, fresh_compile):
    """Through optimize()'s compiled graph (CPU Inductor, a 20-token prefill below the static-M decomposition)
    ``spear::grouped_linear_ec`` receives each packed group's weights adjacent and ECs merged (the kernels' path is
    faked on the CPU: the reference runs, the layout is recorded), and the logits agree."""
    import importlib
    from spear_compile.lowering import grouped
    fused_linear = importlib.import_module("spear_compile.lowering.fused_linear")
    seen = []

    def launch_grouped_ec(x, qdata, scale, zero, bias, group_size, *ec):
        seen.append(grouped.adjacent_members(qdata, scale, zero, bias) is not None
                    and grouped.merged_ec(*ec) is not None)
        return fused_linear.reference_grouped_linear_ec(x, qdata, scale, zero, bias, group_size, *ec)

    monkeypatch.setattr(fused_linear, "_kernel_path", lambda x, qdata: fused_linear.reference_fused_linear)
    monkeypatch.setattr(grouped, "launch_grouped_ec", launch_grouped_ec)
    monkeypatch.setenv("SPEAR_MERGE_SIBLING_ECS", "1")
    model = _ec_quantized(save_tiny(tmp_path / "fp"))
    ref = _logits(model)
    spear_compile.optimize(model, "w4-g32-rtn")
    assert torch.allclose(_logits(model), ref, rtol=2e-2, atol=2e-2)
    assert len(seen) >= len(_ec_groups(model)) and all(seen)
