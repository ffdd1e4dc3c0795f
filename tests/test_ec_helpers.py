"""A tiny random Llama (bundled tokenizer's vocab) for the EC / calibrate tests."""
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "spear_compile" / "assets" / "spear-ref-16m"


def tiny_llama(hidden=64, layers=2, seed=0, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def wrap_random_ec(model, name, rank=4, gate="sigmoid", seed=0):
    """Wrap the quantized linear ``name`` of ``model`` in a ``CompensatedLinear`` whose EC parameters are random
    (std 0.05, seeded); returns the wrapper."""
    from spear_compile import CompensatedLinear
    parent, _, leaf = name.rpartition(".")
    ec = CompensatedLinear.wrap(model.get_submodule(name), rank, gate)
    g = torch.Generator().manual_seed(seed)
    for p in ec.ec_parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p.dtype)
    setattr(model.get_submodule(parent), leaf, ec)
    return ec


def save_tiny(path, **kw):
    model = tiny_llama(**kw)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / f, Path(path) / f)
    return path
