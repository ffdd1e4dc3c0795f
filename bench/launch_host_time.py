"""Host time of one W4 linear before its kernel runs: ``dispatch.launch`` (checks, config, workspace, arguments) with
the Triton launch replaced by a no-op, for the batched kernel with and without a gated EC, and the
``spear::fused_linear`` custom op's own layer. Runs on CPU (nothing reaches a GPU): what an uncaptured step (a mixed
step, eager use) pays per linear in Python on top of Triton's own launch. ``--steps``: also a compiled engine (CPU
Inductor, 16 tiny layers, W4, no graphs): an uncaptured decode step against mixed steps, to see whether the mixed
graph is heavier than the decode graph (the GPU's mixed steps cost 28-70 ms: ``results/serving_slo.md``).
``--gpu`` (CUDA): the whole stack per call, real launches, one 1B layer's ops (``gpu_layer_times``;
``results/serving_host_overhead_h100_s31.md``).

    python -m bench.launch_host_time [--calls 3000] [--steps] [--gpu]
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
    ap.add_argument("--gpu", action="store_true", help="only the CUDA per-layer stack timings (gpu_layer_times)")
    args = ap.parse_args()
    if args.gpu:
        return gpu_layer_times()
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
    rows += attention_op_rows(args.calls)
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


def attention_op_rows(calls):
    """The paged-attention ops' own layer and checks (Llama-3.2-1B heads, 8 decode rows; the kernel and the torch
    fallback stubbed): what a mixed step's eager run and its capture pay per layer on top of the launch."""
    from spear_compile.lowering import attention
    b, h, d, kvh, bs, nb = 8, 32, 64, 8, 16, 64
    q, kc, vc = torch.randn(b, h, d), torch.randn(nb, bs, kvh, d), torch.randn(nb, bs, kvh, d)
    k, v, cos, sin = torch.randn(b, kvh, d), torch.randn(b, kvh, d), torch.randn(b, d), torch.randn(b, d)
    slots = torch.zeros(b, dtype=torch.int64)
    tables, ctx = torch.zeros(b, 4, dtype=torch.int32), torch.full((b,), 10, dtype=torch.int32)
    out = torch.empty_like(q)
    attention.kernel_ok = lambda *a: False
    attention.reference_paged_decode_attention = lambda *a, **kw: out
    attention.reference_paged_decode_rope_attention = lambda *a, **kw: out
    rows = []
    with torch.no_grad():
        rows.append(("`spear::paged_decode_attention` op layer + checks (no_grad)", per_call_us(
            lambda: attention.paged_decode_attention(q, kc, vc, tables, ctx, 0.1), calls)))
        rows.append(("`spear::paged_decode_rope_attention` op layer + checks (no_grad)", per_call_us(
            lambda: attention.paged_decode_rope_attention(q, k, v, kc, vc, cos, sin, slots, slots, tables, ctx, 0.1),
            calls)))
    return rows


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


def host_us(fn, n=100):
    """Host us per call of ``fn`` on CUDA, ``n`` calls back to back (timed until the last returns)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * t / n


def gpu_layer_times():
    """``--gpu``: host us per eager call of one Llama-3.2-1B decoder layer's W4 ops on CUDA (q|k|v and gate|up packed
    as ``compile.siblings`` packs them, o, down; per-channel; tuned through the real dispatch first), per M, for each
    layer of the call stack: ``torch.ops.spear.*`` (what a compiled graph calls, and what a mixed step's eager first
    run and its capture pay per linear), ``grouped.launch_grouped`` / ``dispatch.launch``, the picked config's runner
    alone, and bf16 ``F.linear`` over the same width. 100 calls back to back, timed until the last returns (launches
    are asynchronous). Then one cProfile of the op calls at M = 256."""
    import cProfile
    import pstats

    import torch.nn.functional as F

    import spear_compile  # noqa: F401  (registers the ops)
    from bench.batched_sweep import MODELS, add_packed, groups_of, make_linear
    from spear_compile.lowering import dispatch, grouped

    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    layer = {}
    for name, k, ns in groups_of(MODELS["Llama-3.2-1B"]):
        Ls = [make_linear(k, n, dev, gen) for n in ns]
        if len(Ls) > 1:
            add_packed(Ls)
        layer[name] = Ls
    print(f"{'M':>4} {'op':<8} {'torch.ops':>10} {'launch':>10} {'runner':>10} {'bf16':>8}  (host us per call)")
    for m in (16, 256, 512):
        for name, Ls in layer.items():
            k = Ls[0]["k"]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 0.1
            if len(Ls) > 1:
                W = [L["packed"] for L in Ls]
                args = ([w["q"] for w in W], [w["pc"][0] for w in W], [w["pc"][1] for w in W], [None] * len(W), k)
                op = lambda: torch.ops.spear.grouped_linear(x, *args)  # noqa: E731
                direct = lambda: grouped.launch_grouped(x, *args[:3], None, k)  # noqa: E731
            else:
                L = Ls[0]
                op = lambda: torch.ops.spear.fused_linear(x, L["q"], *L["pc"], None, k, None, None, None, None)  # noqa
                direct = lambda: dispatch.launch(x, L["q"], *L["pc"], None, k)  # noqa: E731
            direct()   # tunes the key
            n_total = sum(L["n"] for L in Ls)
            y = torch.empty(m, Ls[0]["n"], device=dev, dtype=torch.bfloat16)
            cfg_args = (x, Ls[0]["q"], *Ls[0]["pc"], None, k, None, None, None, None, None, y)
            cfg = dispatch.config_for(x, cfg_args, k, Ls[0]["n"], k, False, False)
            run = lambda: dispatch.runner(cfg)(cfg, *cfg_args)  # noqa: E731
            w = torch.randn(n_total, k, device=dev, dtype=torch.bfloat16)
            bf = lambda: F.linear(x, w)  # noqa: E731
            print(f"{m:>4} {name:<8} {host_us(op):>10.1f} {host_us(direct):>10.1f} {host_us(run):>10.1f} "
                  f"{host_us(bf):>8.1f}   runner = {cfg.name} (member 0)", flush=True)
        if m == 256:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                for name, Ls in layer.items():
                    k = Ls[0]["k"]
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    if len(Ls) > 1:
                        W = [L["packed"] for L in Ls]
                        torch.ops.spear.grouped_linear(x, [w["q"] for w in W], [w["pc"][0] for w in W],
                                                       [w["pc"][1] for w in W], [None] * len(W), k)
                    else:
                        torch.ops.spear.fused_linear(x, Ls[0]["q"], *Ls[0]["pc"], None, k, None, None, None, None)
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)



if __name__ == "__main__":
    main()
