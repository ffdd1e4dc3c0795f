"""Where a decode step's time goes: the engine's captured decode step, bf16 vs W4 (+ ECs), kernel by kernel.

Session 12 measured the bf16 engine at 1.52 ms per batch-1 decode step on an H200 for the Llama-3.2-1B shape,
about 3x the time its 2.5 GB of weights take to read at the HBM roofline, so the step is not bandwidth-bound, and a
W4 step cannot be 1.8x faster by reading fewer bytes alone. This bench says what the rest is. For each variant it
starts an engine with the decode buckets 1 and 16 only, then for each (batch, block-table width):
* the CUDA-graph replay time of the captured step (CUDA events over ``--replays`` replays);
* a ``torch.profiler`` trace of the same compiled step run without the graph: every GPU kernel, its count and total
  time per step, grouped (ours W4 / cuBLAS GEMM / Inductor fused / attention pieces / copies / other);
* the sum of kernel times vs the replay time (the rest is the gaps between kernels) and the weight-read roofline.

    python3 -m bench.step_profile [--variants bf16,w4+ec+lmhead,w4+ec+lmhead+tattn] [--widths 4,64] [--out DIR]

A ``+tattn`` suffix runs the variant with the paged Triton decode attention (``decode_attention="triton"``).

``--mixed 14,62`` also times a mixed step (one prompt chunk of that many tokens, ``--mixed-decodes`` decodes beside
it), which runs no CUDA graph: its wall time (execute, then the logits read back), the host part (until ``execute``
returns, before any wait), the device part (CUDA events) and its kernels. Session 16's H100 profile of the serving
bench measured 28-70 ms per mixed step whatever its token count (``results/serving_slo.md``); this says where.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from bench.throughput import DEV, build, reset_compiler, split_variant, sync  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200 (bench/README.md: the roofline every bench uses)
GROUPS = [  # (group, regex on the kernel name), first match wins
    ("ours W4", r"w4_|ec_u_|ec_prologue|ec_gate|ec_xpass|dequant"),
    ("ours attention", r"paged_decode_attention"),
    ("GEMM (cuBLAS/CUTLASS)", r"gemm|gemv|cutlass|sm90_|nvjet|cublas|xmma"),
    ("Inductor fused", r"^triton_"),
    ("softmax / reduce", r"softmax|reduce"),
    ("copy / index / fill", r"copy|index|gather|scatter|fill|elementwise|vectorized|cat"),
]


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name, re.IGNORECASE):
            return g
    return "other"


def weight_bytes(model) -> int:
    """Bytes a decode step reads for the weights (matrices only; quantized ones as stored; tied ones once; the
    embedding table only where the LM head reads it too: a step gathers just its rows)."""
    seen, total = set(), 0
    emb = model.model.embed_tokens.weight
    if emb is not model.lm_head.weight:
        seen.add(emb.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        inner = getattr(t, "qdata", None)
        key = (inner if inner is not None else t).data_ptr()
        if key in seen or t.dim() < 2:
            continue
        seen.add(key)
        total += t.stored_bytes() if hasattr(t, "stored_bytes") else t.numel() * t.element_size()
    return total


def profile_step(runner, use_ec, batch, width, steps=5):
    """Kernels of ``steps`` runs of the compiled step (no graph): {name: (count per step, µs per step)}."""
    flat = torch.tensor(runner.decode_inputs([], batch, width), dtype=torch.int64, device=runner.device)
    views = runner.split_decode(flat, batch, width)
    with torch.no_grad():
        for _ in range(2):
            runner._decode_call(batch, views, use_ec)
        sync()
    return kernels_of(lambda: runner._decode_call(batch, views, use_ec), steps, runner.device.type == "cuda")


def kernels_of(run, steps, cuda):
    """``run()`` ``steps`` times under torch.profiler: {kernel name: (count per step, µs per step)} (CPU: the smoke
    run's ops)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(steps):
            run()
        sync()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for e in prof.events():
        if e.device_type == want:
            k = kernels[e.name]
            k[0] += 1
            k[1] += e.time_range.end - e.time_range.start   # µs
    return {n: (c / steps, us / steps) for n, (c, us) in kernels.items()}


def mixed_step(runner, use_ec, tokens, decodes, context=64, steps=5):
    """A mixed step (one ``tokens``-token prompt chunk, ``decodes`` decodes with ``context`` cached), uncaptured and
    then replayed from its CUDA graph (captured at its first step): wall / host / device µs of each (medians of
    ``steps``), the largest |logit| difference between the two, and the uncaptured step's kernels as
    ``profile_step``'s."""
    import statistics
    from spear_compile.serving.scheduler.profile import _fake_requests
    dec, pre = _fake_requests(decodes, tokens, context, runner.num_blocks, runner.block_size)
    cuda = runner.device.type == "cuda"
    med = lambda v: round(1e6 * statistics.median(v), 1) if v else None  # noqa: E731
    out, logits_of = {}, {}
    with torch.no_grad():
        for mode in ("eager", "graph"):
            with uncaptured(runner) if mode == "eager" else contextlib.nullcontext():
                wall, host, device, logits_of[mode] = timed_steps(runner, dec, pre, use_ec, steps, cuda)
            prefix = "" if mode == "eager" else "graph_"
            out.update({prefix + "wall_us": med(wall), prefix + "host_us": med(host), prefix + "device_us": med(device)})
        out["graphs"] = len(runner.mixed.graphs)
        if not out["graphs"]:
            print(f"WARNING: the mixed step ({tokens} + {decodes} decodes) was not captured (mixed graph limit "
                  f"{runner.mixed.limit}, max rows {runner.mixed.max_rows}): its 'graph' columns are uncaptured too",
                  flush=True)
        out["graph_max_abs_diff"] = float((logits_of["graph"] - logits_of["eager"]).abs().max())
        with uncaptured(runner):
            kern = kernels_of(lambda: runner.execute(dec, pre, use_ec), steps, cuda)
    return out, kern


def timed_steps(runner, dec, pre, use_ec, steps, cuda):
    """Two warm-up steps, then ``steps`` timed ones: wall (execute + the logits read back), host (until execute
    returns) and device (CUDA events) seconds, and the last step's logits rows."""
    for _ in range(2):
        runner.execute(dec, pre, use_ec)
    sync()
    wall, host, device = [], [], []
    for _ in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        logits, rows = runner.execute(dec, pre, use_ec)
        host.append(time.perf_counter() - t0)
        if cuda:
            b.record()
        logits[:rows].argmax(-1).tolist()
        wall.append(time.perf_counter() - t0)
        if cuda:
            b.synchronize()
            device.append(a.elapsed_time(b) / 1e3)
    return wall, host, device, logits[:rows].float().clone()


@contextlib.contextmanager
def uncaptured(runner):
    """Mixed steps run without CUDA graphs inside: none is captured (limit 0) and the captured ones are set aside
    (a step whose graph exists replays it whatever the limit)."""
    limit, graphs = runner.mixed.limit, runner.mixed.graphs
    runner.mixed.limit, runner.mixed.graphs = 0, {}
    try:
        yield
    finally:
        runner.mixed.limit, runner.mixed.graphs = limit, graphs


def host_profile(runner, use_ec, tokens, decodes, steps=10, top=30, context=64):
    """cProfile over ``steps`` uncaptured mixed steps (run eagerly: where their host time goes). Returns markdown
    rows of the ``top`` functions by own time (µs per step) with their call counts per step."""
    import cProfile
    import pstats
    from spear_compile.serving.scheduler.profile import _fake_requests
    dec, pre = _fake_requests(decodes, tokens, context, runner.num_blocks, runner.block_size)
    with torch.no_grad(), uncaptured(runner):
        for _ in range(2):
            runner.execute(dec, pre, use_ec)
        sync()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            runner.execute(dec, pre, use_ec)
        prof.disable()
        sync()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = [f"cProfile, {steps} uncaptured mixed steps ({tokens} + {decodes} decodes): {1e6 * total / steps:.0f} µs of "
           "profiled host time per step (cProfile's own overhead inflates it: compare rows, not totals).", "",
           "| function | calls / step | own µs / step | cumulative µs / step |", "|---|---|---|---|"]
    for (path, line, name), (cc, nc, tt, ct, _) in rows:
        where = f"{os.path.relpath(path) if path.startswith('/') else path}:{line}"
        out.append(f"| `{name}` {where[-70:]} | {nc / steps:g} | {1e6 * tt / steps:.1f} | {1e6 * ct / steps:.1f} |")
    return out


def replay_us(runner, use_ec, batch, width, replays):
    g = runner.graphs[(use_ec, batch, width)]
    for _ in range(3):
        g.replay()
    sync()
    if runner.device.type != "cuda":  # the CPU smoke run's stand-in graphs
        t0 = time.perf_counter()
        for _ in range(replays):
            g.replay()
        return 1e6 * (time.perf_counter() - t0) / replays
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.graph.replay()
    b.record()
    b.synchronize()
    return 1e3 * a.elapsed_time(b) / replays


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,w4+ec+lmhead,w4+ec+lmhead+tattn")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--widths", default="4,64", help="block-table widths (x16 tokens of context)")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per (variant, batch)")
    ap.add_argument("--out", default=os.path.join(_HERE, "results"))
    ap.add_argument("--mixed", default="", help="prompt-chunk token counts of mixed steps to time (e.g. 14,62)")
    ap.add_argument("--mixed-decodes", type=int, default=0, help="decodes beside each mixed step's chunk")
    ap.add_argument("--compile-regions", action="store_true",
                    help="EngineConfig.compile_regions: one decoder layer compiled per layer structure")
    ap.add_argument("--host-profile", action="store_true",
                    help="also cProfile the uncaptured mixed steps (the first --mixed size): where their host time goes")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of this script: a 2-layer model, CPU ops")
    args = ap.parse_args()
    mixed = [int(t) for t in args.mixed.split(",") if t]
    if args.tiny:
        DEV.update(device="cpu", tiny=True, dtype=torch.float32)
    from spear_compile.serving import Engine, EngineConfig
    import triton
    import transformers
    device = DEV["device"]
    env = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (tiny smoke)'}, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
           f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}. Command: "
           f"`python3 -m bench.step_profile {' '.join(sys.argv[1:])}`")
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    summary, detail, rows, mixed_rows = [], [], [], []
    for variant in args.variants.split(","):
        reset_compiler()
        base, _, attention = split_variant(variant)
        model, _ = build(base)
        wbytes = weight_bytes(model)
        t0 = time.perf_counter()
        max_tokens = max([64] + [t + args.mixed_decodes for t in mixed])
        max_tokens = 1 << (max_tokens - 1).bit_length()
        # the mixed step's chunk is a request too: its logits row must fit the graphs' buffer (max_num_seqs rows)
        seqs = max(batches + [args.mixed_decodes + 1 if mixed else 0])
        eng = Engine(model, None, EngineConfig(max_num_seqs=seqs, max_num_tokens=max_tokens,
                                               decode_buckets=tuple(sorted(set(batches + [seqs]))), token_buckets=(max_tokens,),
                                               max_model_len=1024, policy=f"budget-{max_tokens}",
                                               device=device, detokenize=False, dtype=DEV["dtype"],
                                               gpu_memory_utilization=0.3, progress=False, compile=not args.tiny,
                                               cuda_graphs_stand_in=args.tiny,
                                               decode_attention=attention, compile_regions=args.compile_regions,
                                               num_blocks=None if device == "cuda" else 256), model_name=variant)
        startup = time.perf_counter() - t0
        runner = eng.runner
        use_ec = runner.net.has_ecs
        for batch in batches:
            for width in widths:
                if (use_ec, batch, width) not in runner.graphs:
                    continue
                rep = replay_us(runner, use_ec, batch, width, args.replays)
                kern = profile_step(runner, use_ec, batch, width)
                by_group = collections.defaultdict(lambda: [0.0, 0.0])
                for name, (c, us) in kern.items():
                    gsum = by_group[group_of(name)]
                    gsum[0] += c
                    gsum[1] += us
                ksum = sum(us for _, us in kern.values())
                kcount = sum(c for c, _ in kern.values())
                roof = 1e6 * wbytes / HBM_BYTES_PER_S
                r = dict(variant=variant, batch=batch, width=width, replay_us=round(rep, 1), kernels=round(kcount),
                         kernel_us=round(ksum, 1), gap_us=round(rep - ksum, 1), weight_mb=round(wbytes / 1e6),
                         roofline_us=round(roof, 1), startup_s=round(startup, 1),
                         groups={g: (round(c), round(us, 1)) for g, (c, us) in sorted(by_group.items())})
                rows.append(r)
                print(json.dumps(r), flush=True)
                summary.append(f"| {variant} | {batch} | {width * runner.block_size} | {r['replay_us']} | {r['kernels']} | "
                               f"{r['kernel_us']} | {r['gap_us']} | {r['roofline_us']} | {rep / roof:.2f}x | " +
                               "; ".join(f"{g} {c}x {us}" for g, (c, us) in r["groups"].items()) + " |")
                if width == widths[-1]:
                    top = sorted(kern.items(), key=lambda kv: -kv[1][1])[:args.top]
                    detail += [f"### {variant}, batch {batch}, context {width * runner.block_size}", "",
                               "| kernel | per step | µs per step |", "|---|---|---|"]
                    detail += [f"| `{n[:90]}` | {c:g} | {us:.1f} |" for n, (c, us) in top] + [""]
        for tokens in mixed:
            times, kern = mixed_step(runner, use_ec, tokens, args.mixed_decodes)
            ksum, kcount = sum(us for _, us in kern.values()), sum(c for c, _ in kern.values())
            r = dict(variant=variant, mixed_tokens=tokens, decodes=args.mixed_decodes, padded_to=max_tokens, **times,
                     kernels=round(kcount), kernel_us=round(ksum, 1))
            rows.append(r)
            print(json.dumps(r), flush=True)
            mixed_rows.append(f"| {variant} | {tokens} + {args.mixed_decodes} decodes (bucket {max_tokens}) | "
                              f"{r['wall_us']} | {r['host_us']} | {r['device_us']} | {r['kernels']} | {r['kernel_us']} | "
                              f"{r['graph_wall_us']} | {r['graph_host_us']} | {r['graph_device_us']} | "
                              f"{r['graph_max_abs_diff']:.3g} |")
            top = sorted(kern.items(), key=lambda kv: -kv[1][1])[:args.top]
            detail += [f"### {variant}, mixed step, {tokens} prompt tokens + {args.mixed_decodes} decodes", "",
                       "| kernel | per step | µs per step |", "|---|---|---|"]
            detail += [f"| `{n[:90]}` | {c:g} | {us:.1f} |" for n, (c, us) in top] + [""]
        if args.host_profile and mixed:
            detail += [f"### {variant}: host time of an uncaptured mixed step", ""]
            hp = host_profile(runner, use_ec, mixed[0], args.mixed_decodes)
            print("\n".join(hp), flush=True)   # now: a run cut short by its timeout still shows it
            detail += hp + [""]
        del eng, model
    if mixed_rows:
        summary += ["", "Mixed steps, uncaptured then replayed from the graph captured at its first step: wall = execute "
                    "+ the logits read back; host = until execute returns; device = CUDA events around it; kernels: "
                    "the uncaptured step's; diff: the largest |logit| difference, graph vs uncaptured.", "",
                    "| variant | step | wall µs | host µs | device µs | kernels | kernel µs | graph wall µs | "
                    "graph host µs | graph device µs | diff |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"] + mixed_rows
    md = ["# A decode step, kernel by kernel (Llama-3.2-1B shape, engine decode graphs)", "", env, "",
          "replay: the captured step (CUDA events); kernels: the same compiled step without the graph, under "
          "torch.profiler (GPU time of each kernel); gap = replay - sum of kernel times; roofline = the weights' "
          f"bytes at {HBM_BYTES_PER_S / 1e12:.1f} TB/s.", "",
          "| variant | batch | context | replay µs | kernels | kernel µs | gap µs | roofline µs | replay / roofline | "
          "by group (count x µs) |", "|---|---|---|---|---|---|---|---|---|---|"] + summary + ["", "## Top kernels", ""] + detail
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_profile.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "step_profile.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    DEV.update(device="cuda", tiny=False, dtype=torch.bfloat16)
    main()
