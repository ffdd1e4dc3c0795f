"""Shared fixtures for the serving tests: the bundled spear-ref-16m (W4 per-channel RTN, optionally with a few
random gated ECs) and a tiny CPU engine over it (eager, no CUDA graphs, float32)."""
import copy
import os

import pytest
import torch

import spear_compile
from spear_compile.ec.module import CompensatedLinear

MODEL_PATH = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")
EC_LINEARS = ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj", "model.layers.5.self_attn.v_proj")


@pytest.fixture(scope="session")
def ref_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_PATH)


def attach_ecs(model, names=EC_LINEARS, rank=8, seed=0, std=0.1):
    """Wrap ``names`` with gated ECs of small random nonzero weights (A, B, gate weight and bias)."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), rank, gate="sigmoid")
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * std).to(p.dtype)
        setattr(par, attr, ec)
    return model


_CACHE = {}


def quantized_ref(ecs: bool = False, dtype=torch.float32):
    """A fresh copy of spear-ref-16m, W4 per-channel RTN (+ ECs on ``EC_LINEARS``), eval mode, on CPU."""
    key = (ecs, dtype)
    if key not in _CACHE:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=dtype).eval()
        spear_compile.quantize(model, "w4-pc-rtn", progress=False)
        if ecs:
            attach_ecs(model)
        _CACHE[key] = model
    return copy.deepcopy(_CACHE[key])


def engine_config(**kw):
    from spear_compile.serving import EngineConfig
    base = dict(compile=False, cuda_graphs=False, device="cpu", dtype=torch.float32, max_num_seqs=8, max_num_tokens=64,
                num_blocks=128, block_size=8, policy="budget-32", progress=False)
    base.update(kw)
    return EngineConfig(**base)


def make_engine(model=None, tokenizer=None, **kw):
    from transformers import AutoTokenizer
    from spear_compile.serving import Engine
    model = model if model is not None else quantized_ref()
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(MODEL_PATH)
    return Engine(model, tokenizer, engine_config(**kw))


@pytest.fixture
def tiny_engine(ref_tokenizer):
    """An eager CPU engine over the W4 spear-ref-16m: 8 sequences, 64-token steps, 127 usable blocks of 8 tokens."""
    return make_engine(quantized_ref(), ref_tokenizer)


def toy_model(ecs: bool = False, seed: int = 0):
    """A 2-layer random Llama with spear-ref-16m's vocabulary (its tokenizer works), W4 per-channel RTN: engine
    mechanics (abort, sampling, streaming, load) in milliseconds a step."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=8192, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    if ecs:
        attach_ecs(model, names=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"), rank=4)
    return model


@pytest.fixture
def toy_engine(ref_tokenizer):
    """An eager CPU engine over ``toy_model()`` (fast steps; random tokens)."""
    return make_engine(toy_model(), ref_tokenizer)
