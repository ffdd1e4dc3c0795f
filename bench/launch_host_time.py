"""Host time of one W4 linear before its kernel runs: ``dispatch.launch`` (checks, config, workspace, arguments) with
the Triton launch replaced by a no-op, for the batched kernel with and without a gated EC, and the
``spear::fused_linear`` custom op's own layer. Runs on CPU (nothing reaches a GPU): what an uncaptured step (a mixed
step, eager use) pays per linear in Python on top of Triton's own launch. ``--steps``: also a compiled engine (CPU
Inductor, 16 tiny layers, W4, no graphs): an uncaptured decode step against mixed steps, to see whether the mixed
graph is heavier than the decode graph (the GPU's mixed steps cost 28-70 ms: ``results/serving_slo.md``).

    python -m bench.launch_host_time [--calls 3000] [--steps]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch


def per_call_us(fn, calls):
    for _ in range(100):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - t0) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--steps", action="store_true", help="also time uncaptured decode and mixed engine steps")
    args = ap.parse_args()
    steps = step_times() if args.steps else []  # first: the launch timings below patch the kernel path out
    import triton
    from spear_compile.lowering import batched, dispatch
    fused_linear_module = sys.modules["spear_compile.lowering.fused_linear"]
    m, k, n, r = 16, 2048, 2048, 32   # Llama-3.2-1B o_proj at M = 16, a gated r = 32 EC
    x = torch.randn(m, k, dtype=torch.bfloat16)
    q = torch.randint(0, 255, (n, k // 2), dtype=torch.uint8)
    scale, zero = torch.rand(n, 1, dtype=torch.bfloat16), torch.rand(n, 1, dtype=torch.bfloat16)
    ec = (torch.randn(r, k, dtype=torch.bfloat16), torch.randn(n, r, dtype=torch.bfloat16),
          torch.randn(r, r, dtype=torch.bfloat16), torch.randn(r, dtype=torch.bfloat16))
    cfg = batched.BatchedConfig(16, 128, 128, 4, 4, 4, swap=True, perm=True, ec_pre=True)
    batched.launcher = lambda kernel, grid: (lambda *a, **kw: None)   # no kernel runs: the Python before it
    rows = []
    for name, extra in (("W4", (None,) * 4), ("W4 + gated EC (ec_pre)", ec)):
        us = per_call_us(lambda: dispatch.launch(x, q, scale, zero, None, k, *extra, config=cfg), args.calls)
        rows.append((f"`dispatch.launch`, batched kernel, {name}", us))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    fused_linear_module._kernel_path = lambda x_, q_: (lambda *a: out)   # the op layer alone
    op = lambda: torch.ops.spear.fused_linear(x, q, scale, zero, None, k, None, None, None, None)  # noqa: E731
    rows.append(("`spear::fused_linear` custom op layer (no_grad)", None))
    with torch.no_grad():
        rows[-1] = (rows[-1][0], per_call_us(op, args.calls))
    with torch.inference_mode():
        rows.append(("`spear::fused_linear` custom op layer (inference_mode)", per_call_us(op, args.calls)))
    print(f"# Host time of one W4 linear before its kernel (CPU)\n\n{platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, Python "
          f"{platform.python_version()}. Command: `python -m bench.launch_host_time {' '.join(sys.argv[1:])}`\n")
    print("| what | µs per call |\n|---|---|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")
    if steps:
        print("\nCompiled engine steps, no graphs (CPU Inductor, 16 layers of hidden 64, W4 per-channel, fp32; "
              "median of 30):\n\n| step | ms |\n|---|---|")
        for what, ms in steps:
            print(f"| {what} | {ms:.2f} |")


def step_times():
    import statistics
    import spear_compile
    from transformers import LlamaConfig, LlamaForCausalLM
    from spear_compile.serving import Engine, EngineConfig
    from spear_compile.serving.scheduler.profile import _fake_requests
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    runner = Engine(model, None, EngineConfig(
        max_num_seqs=8, max_num_tokens=64, token_buckets=(16, 64), max_model_len=256, num_blocks=128, device="cpu",
        dtype=torch.float32, policy="budget-64", progress=False, detokenize=False, compile=True)).runner
    out = []
    for what, d, p in (("decode, 2 rows", 2, 0), ("decode, 8 rows", 8, 0), ("mixed, 14 prompt tokens", 0, 14),
                       ("mixed, 2 decodes + 14 prompt tokens", 2, 14), ("mixed, 62 prompt tokens", 0, 62)):
        dec, pre = _fake_requests(d, p, 32, runner.num_blocks, runner.block_size)
        with torch.no_grad():
            for _ in range(3):
                runner.execute(dec, pre, False)
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                runner.execute(dec, pre, False)
                ts.append(time.perf_counter() - t0)
        out.append((what, 1e3 * statistics.median(ts)))
    return out


if __name__ == "__main__":
    main()
