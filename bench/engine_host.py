"""The serving engine's host time per decode step, without the model: every step of a real ``Engine`` (scheduler,
KV blocks, input building, sampling, outputs) with the forward replaced by a precomputed logits tensor, so what is
timed is the Python/torch host work a GPU step pays on top of its graph replay (which adds the replay's launch and
the sampled tokens' read-back). CPU only; no device time.

    python -m bench.engine_host [--batches 1,16,64] [--steps 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import spear_compile
    from spear_compile.serving import Engine, EngineConfig, SamplingParams
    ref = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")
    tok = AutoTokenizer.from_pretrained(ref)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=8192, max_position_embeddings=1024)
    print("| batch | host µs / step (p50) | p90 | of which until the forward (p50) |")
    print("|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        spear_compile.quantize(model, "w4-pc-rtn", progress=False)
        eng = Engine(model, tok, EngineConfig(compile=False, cuda_graphs=False, device="cpu", dtype=torch.float32,
                                              max_num_seqs=64, max_num_tokens=128, num_blocks=2048, block_size=16,
                                              policy="budget-128", progress=False, detokenize=False))
        logits = torch.zeros(64, cfg.vocab_size)
        eng.runner.run_decode = lambda use_ec, b, w, flat, *_: logits[:b]   # no forward: host work only
        for i in range(batch):
            eng.add_request([5 + i] * 20, SamplingParams(max_tokens=args.steps + 50, temperature=0.0, ignore_eos=True))
        while eng.scheduler.waiting or not eng.scheduler.running or \
                any(r.num_tokens_to_compute > 1 for r in eng.scheduler.running):
            eng.step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
        host = [r.host_s for r in list(eng.step_log)[-args.steps:]]
        q = statistics.quantiles(times, n=10)
        print(f"| {batch} | {1e6 * statistics.median(times):.0f} | {1e6 * q[8]:.0f} | {1e6 * statistics.median(host):.0f} |")


if __name__ == "__main__":
    main()
