"""``Engine.load_ecs``: another calibration's ECs swapped in while serving (same modules, ranks, gates), through the
captured decode graphs (stand-ins on CPU; compiled too): the tokens then equal a fresh engine's over those ECs, and
swapping back restores the first ones; another EC set, a corrupt file or a model without ECs is refused before
anything changes."""
import copy

import pytest
import torch

from spear_compile import SpearError
from spear_compile.ec.io import model_identity, save_ecs
from spear_compile.ec.module import CompensatedLinear
from spear_compile.quant.config import QuantConfig
from spear_compile.serving import SamplingParams

from .conftest import attach_ecs, make_engine, toy_model

LENS = (5, 11, 3, 8)


def prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, 8000, (n,), generator=g).tolist() for n in LENS]


def tokens(engine):
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    return [o.output_token_ids for o in engine.generate(prompts(), sp)]


def other_calibration(model, seed):
    """A copy of ``model`` with the same EC modules and ranks but other weights."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for m in other.modules():
        if isinstance(m, CompensatedLinear):
            for p in m.ec_parameters():
                p.data = torch.randn(p.shape, generator=gen) * 0.3
    return other


def save(model, path):
    save_ecs(model, path, {"quant": QuantConfig.from_spec("w4-pc-rtn").to_dict(), "base_model": model_identity(model)})
    return path


@pytest.mark.parametrize("compiled", [False, True])
def test_swap_equals_fresh_engine(ref_tokenizer, tmp_path, compiled, fresh_compile):
    kw = dict(cuda_graphs=True, cuda_graphs_stand_in=True, compile=compiled, max_num_seqs=4, max_num_tokens=16,
              token_buckets=(16,), max_model_len=64, policy="budget-16")
    a = toy_model(ecs=True)
    b = other_calibration(a, seed=9)
    dir_a, dir_b = save(a, tmp_path / "a"), save(b, tmp_path / "b")
    want_b = tokens(make_engine(copy.deepcopy(b), ref_tokenizer, **kw))
    eng = make_engine(copy.deepcopy(a), ref_tokenizer, **kw)
    want_a = tokens(eng)
    assert want_a != want_b                      # the two calibrations give other tokens
    eng.load_ecs(dir_b)
    assert tokens(eng) == want_b
    eng.load_ecs(dir_a)
    assert tokens(eng) == want_a
    assert eng.stats().recompiles == 0


def test_swap_refusals_leave_the_engine_as_it_was(ref_tokenizer, tmp_path):
    a = toy_model(ecs=True)
    eng = make_engine(copy.deepcopy(a), ref_tokenizer, max_num_seqs=4, max_num_tokens=16, token_buckets=(16,),
                      max_model_len=64, policy="budget-16")
    before = tokens(eng)
    other_set = attach_ecs(toy_model(), names=("model.layers.1.self_attn.o_proj",), rank=4)   # another module
    with pytest.raises(SpearError, match="another EC set"):
        eng.load_ecs(save(other_set, tmp_path / "set"))
    other_rank = attach_ecs(toy_model(), names=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"),
                            rank=2)
    with pytest.raises(SpearError, match="another EC set"):
        eng.load_ecs(save(other_rank, tmp_path / "rank"))
    bad = save(other_calibration(a, seed=3), tmp_path / "bad")
    blob = (bad / "ec_weights.safetensors") if (bad / "ec_weights.safetensors").exists() else next(bad.glob("*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(SpearError, match="corrupt"):
        eng.load_ecs(bad)
    with pytest.raises(SpearError):
        eng.load_ecs(tmp_path / "missing")
    assert tokens(eng) == before
    plain = make_engine(toy_model(), ref_tokenizer, max_num_seqs=4, max_num_tokens=16, token_buckets=(16,),
                        max_model_len=64, policy="budget-16")
    with pytest.raises(SpearError, match="no ECs"):
        plain.load_ecs(tmp_path / "set")
