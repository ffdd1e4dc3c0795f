"""Host time of Dynamo's guard evaluation per call ("TorchDynamo Cache Lookup" in the profiler), CPU.

    python bench/guard_probe.py

A tiny 16-layer Llama (112 linears) compiled fullgraph for decode with a static cache: bf16 (inductor)
vs W4 (spear backend, unwrapped quantized linears; the quantized op's reference body stubbed out, so
only the host side is measured), each with default guards and with
``torch.compiler.skip_guard_on_all_nn_modules_unsafe``. Grouping off (it does not change the guards).
"""
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import spear_compile
FL = sys.modules["spear_compile.lowering.fused_linear"]
FL.reference_fused_linear = lambda x, qdata, *a, **k: x.new_empty(*x.shape[:-1], qdata.shape[0])
torch.set_num_threads(1)
torch._inductor.config.fx_graph_cache = False
os.environ["SPEAR_GROUP_LINEARS"] = "0"
def model():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True, head_dim=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
@torch.no_grad()
def run(variant, gf=None):
    torch._dynamo.reset()
    m = model()
    opts = {"guard_filter_fn": gf} if gf else None
    if variant == "bf16":
        m.forward = torch.compile(m.forward, fullgraph=True, dynamic=False, options=opts)
    else:
        spear_compile.quantize(m, "w4-pc-rtn", progress=False)
        from spear_compile.compile.unwrap import unwrap_quantized
        unwrap_quantized(m)
        m.forward = torch.compile(m.forward, backend="spear", fullgraph=True, dynamic=False, options=opts)
    cache = StaticCache(config=m.config, max_cache_len=256)
    tok = torch.tensor([[1]])
    pos = torch.tensor([0])
    for i in range(3): m.forward(input_ids=tok, past_key_values=cache, cache_position=pos + i, use_cache=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(20): m.forward(input_ids=tok, past_key_values=cache, cache_position=pos + 3 + i, use_cache=True)
    ev = {e.key: e for e in prof.key_averages()}
    k = [x for x in ev if "Cache Lookup" in x or "Guard" in x]
    print(variant, "gf" if gf else "", {x: round(ev[x].cpu_time_total / 20, 1) for x in k}, flush=True)
for gf in (None, torch.compiler.skip_guard_on_all_nn_modules_unsafe):
    run("bf16", gf); run("w4", gf)
