"""Engine start-up with the whole model compiled per phase vs one decoder layer compiled per distinct layer structure
(``EngineConfig.compile_regions``), on CPU: spear-ref-16m (8 layers), W4 per-channel RTN with three gated ECs on three
layers, both EC states (``ec_switch``), compiled with the ``spear`` backend through the CPU Inductor, stand-in decode
graphs. Each mode starts in a fresh process with Inductor's and Triton's caches off (a cold start); each then serves
six greedy prompts, checked against the eager engine.

    python -m bench.compile_regions [--md results/compile_regions_cpu.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deep_toy():
    """A 16-layer Llama as deep as Llama-3.2-1B but 64 wide (spear-ref-16m's vocabulary), W4, ECs on 3 layers."""
    import torch
    import spear_compile
    from transformers import LlamaConfig, LlamaForCausalLM
    from conftest import attach_ecs
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=8192, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    return attach_ecs(model, names=("model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj",
                                    "model.layers.12.self_attn.v_proj"), rank=4)


def child(regions: bool, model_name: str) -> dict:
    import copy
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, os.path.join(ROOT, "tests", "serving"))
    from conftest import make_engine, quantized_ref   # the tests' bundled-model fixtures
    from spear_compile.serving import SamplingParams
    base = quantized_ref(ecs=True) if model_name == "ref" else deep_toy()
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    eng = make_engine(model, None, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True,
                      max_num_seqs=8, max_num_tokens=64, ec_switch=True, compile_regions=regions, progress=False)
    startup = time.perf_counter() - t0
    graphs = int(counters["stats"]["unique_graphs"])
    prompts = [[5 + i, 17, 300 + 7 * i, 42] * (3 + i) for i in range(6)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    t1 = time.perf_counter()
    outs = [o.output_token_ids for o in eng.generate(prompts, sp)]
    serve = time.perf_counter() - t1
    ref = [o.output_token_ids for o in make_engine(base, None).generate(prompts, sp)]
    return dict(model=model_name, layers=len(base.model.layers), regions=regions, startup_s=round(startup, 1), graphs=graphs, recompiles=eng.stats().recompiles,
                serve_s=round(serve, 2), greedy_equal=sum(a == b for a, b in zip(outs, ref)), prompts=len(prompts),
                torch=torch.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--md", default=None)
    ap.add_argument("--models", default="ref,deep", help="ref: spear-ref-16m (8 layers); deep: a 16-layer 64-wide toy")
    ap.add_argument("--child", choices=("whole", "regions"), default=None)
    ap.add_argument("--model", default="ref")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "regions", args.model)))
        return
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0", PYTHONPATH=ROOT)
    rows = []
    for model_name in args.models.split(","):
        for mode in ("whole", "regions"):
            out = subprocess.run([sys.executable, "-m", "bench.compile_regions", "--child", mode, "--model", model_name],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [f"# Engine start-up: whole-model vs regional compilation (CPU, {datetime.date.today()})", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {rows[0]['torch']}, Python "
             f"{platform.python_version()}. Command: `python -m bench.compile_regions`. Models: `ref` spear-ref-16m "
             "(8 layers, hidden 384), W4 per-channel RTN + gated r=8 ECs on 3 layers; `deep` a 16-layer Llama of "
             "hidden 64 (Llama-3.2-1B's depth), W4 + gated r=4 ECs on 3 layers. ECs on and off (`ec_switch`), "
             "`spear` backend through the CPU Inductor, decode buckets 1-8 x the block-table widths (stand-in "
             "graphs), token buckets 16-64; a fresh process per row, Inductor's caches off.", "",
             "| model | layers | compile | start-up s | graphs compiled | greedy = eager | recompiles serving | "
             "6 prompts x 12 tokens s |", "|---|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | "
                     f"{'one layer per structure' if r['regions'] else 'whole model per phase'} | {r['startup_s']} | "
                     f"{r['graphs']} | {r['greedy_equal']}/{r['prompts']} | {r['recompiles']} | {r['serve_s']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
