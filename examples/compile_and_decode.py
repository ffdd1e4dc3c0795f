"""Quantize + compile the bundled 16M Llama with the ``spear`` backend and decode greedily
with a static KV cache (CUDA graphs on GPU). Runs on CPU too (slowly, reference kernels).

    python examples/compile_and_decode.py [--tokens 32] [--ecs]
"""
import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

import spear_compile
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.inspection import inspect
from spear_compile.compile.api import optimize
from spear_compile.modules import cache_kwarg

MODEL = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ecs", action="store_true", help="wrap two linears with (random) gated ECs")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).to(device).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    if args.ecs:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.4.mlp.down_proj"):
            parent, attr = name.rsplit(".", 1)
            ec = CompensatedLinear.wrap(getattr(model.get_submodule(parent), attr), rank=8)
            torch.nn.init.normal_(ec.ec_A, std=0.02)
            torch.nn.init.normal_(ec.ec_B, std=0.02)
            setattr(model.get_submodule(parent), attr, ec)
    print(inspect(model, m=1).table())

    ids = tok("The history of the city", return_tensors="pt").input_ids.to(device)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.tokens)
    eager = model.forward
    optimize(model, quant="w4-pc-rtn", mode="reduce-overhead" if device == "cuda" else None, fullgraph=True, dynamic=False)
    pos = torch.arange(ids.shape[1], device=device)
    kw = cache_kwarg(model)  # "cache" in newer transformers, "past_key_values" before
    nxt = eager(input_ids=ids, cache_position=pos, **{kw: cache}).logits[:, -1:].argmax(-1)  # eager prefill
    out = [nxt]
    for i in range(args.tokens - 1):
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        pos = torch.tensor([ids.shape[1] + i], device=device)
        nxt = model.forward(input_ids=nxt, cache_position=pos, **{kw: cache}).logits[:, -1:].argmax(-1)
        out.append(nxt)
    print(tok.decode(torch.cat([ids] + out, 1)[0]))


if __name__ == "__main__":
    main()
