"""How many mixed-step CUDA-graph keys a workload needs, and how many mixed steps replay one (CPU, stand-in graphs).

120 requests (prompts of 50-400 tokens, 20-100 output tokens, seeded) through the toy engine of the tests with
stand-in graphs, at a token budget of 512 (32 running) and 2048 (64 running) with 2048-token steps, and at 512 (64
running) with 512-token steps (bench/throughput.py's sizes: the budget fills the largest token bucket). Prints a
markdown table; the numbers in
``docs/serving.md`` come from ``results/mixed_graph_keys_cpu.md``.

    python -m bench.mixed_graph_keys
"""
from __future__ import annotations

import datetime
import platform
import random

import torch


def main():
    from spear_compile.serving import SamplingParams
    from tests.serving.conftest import make_engine, toy_model
    model = toy_model()
    print(f"cpu ({platform.processor() or platform.machine()}), {datetime.date.today()}, torch {torch.__version__}. "
          "Command: `python -m bench.mixed_graph_keys`\n")
    print("| budget | max running | max tokens | mixed steps | graphs (keys) | replays | replayed share | uncaptured |")
    print("|---|---|---|---|---|---|---|---|")
    for budget, seqs, max_tokens in ((512, 32, 2048), (2048, 64, 2048), (512, 64, 512)):
        eng = make_engine(model, None, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=seqs,
                          max_num_tokens=max_tokens, max_model_len=512, policy=f"budget-{budget}", cpu_num_blocks=2048,
                          mixed_shape_cache=False)
        rnd = random.Random(0)
        prompts = [[rnd.randrange(3, 8000) for _ in range(rnd.randrange(50, 400))] for _ in range(120)]
        params = [SamplingParams(max_tokens=rnd.randrange(20, 100), temperature=0.0, ignore_eos=True) for _ in prompts]
        eng.generate(prompts, params)
        m = eng.runner.mixed
        steps = m.first_steps + m.replays + m.uncaptured
        print(f"| {budget} | {seqs} | {max_tokens} | {steps} | {len(m.graphs)} | {m.replays} | "
              f"{m.replays / max(1, steps):.0%} | "
              f"{m.uncaptured} |")


if __name__ == "__main__":
    main()
