"""End-to-end batch-1 greedy decode on GPU: bf16 + Inductor vs spear (W4 + fused EC kernels).

    python bench/decode_e2e.py [--new 128] [--prompt 32] [--skip-e2e] [--skip-ref] [--out DIR]

1. spear-ref-16m (bundled, W4-pc-RTN, with and without random ECs): greedy tokens compiled
   (``optimize(..., mode="reduce-overhead")``, static KV cache) vs eager must be identical; the
   decode step must compile once (no recompilation per token); per-decoder-layer hidden states
   compiled vs eager: relative error.
2. Llama-3.2-1B-shaped model, random weights, bf16: decode tokens/s for
   bf16 (inductor, reduce-overhead), spear W4 (no EC), spear W4 + gated ECs r=32 on ~10% of linears.
Prefill runs eagerly (not timed); decode is timed after a full warm-up generation.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import sys
import time
import traceback

import torch

import spear_compile  # noqa: E402
from spear_compile.compile import records  # noqa: E402
from spear_compile.ec.module import CompensatedLinear  # noqa: E402
from spear_compile.compile.api import optimize, warm_kernels  # noqa: E402
from spear_compile.modules import cache_kwarg  # noqa: E402

REF = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")
ROWS = []


def row(**kw):
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def attach_random_ecs(model, fraction, rank, seed, gate="sigmoid", scale=0.02):
    """Wrap a random ``fraction`` of the quantized linears with a random gated EC."""
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    chosen = sorted(rng.sample(names, max(1, round(fraction * len(names)))))
    for name in chosen:
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), rank, gate=gate)
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype)
        setattr(par, attr, ec)
    return chosen


def make_cache(model, max_len):
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.no_grad()
def greedy(prefill, step, prompt, n_new, cache, cudagraphs, host=None, around=None):
    """Eager prefill via ``prefill`` then ``n_new - 1`` decode steps via ``step``; returns (tokens, decode_s).

    The position lives on the GPU and is advanced there (as gpt-fast does): a per-step
    ``torch.tensor([pos], device="cuda")`` is a pageable host-to-device copy, which waits for the
    stream, so host and GPU would serialize and every step would pay host time + GPU time.
    ``host``: a list that receives the host-side seconds of the loop (before the final sync);
    ``around``: a context manager (a profiler) entered around the decode loop only."""
    cache.reset()
    p = prompt.shape[1]
    pos = torch.arange(p, device=prompt.device)
    kw = cache_kwarg(prefill)
    logits = prefill(input_ids=prompt, cache_position=pos, use_cache=True, **{kw: cache}).logits
    tok = logits[:, -1:].argmax(-1)
    toks = [tok]
    pos = torch.full((1,), p, device=prompt.device, dtype=torch.long)
    torch.cuda.synchronize()
    ctx = around if around is not None else contextlib.nullcontext()
    ctx.__enter__()
    t0 = time.perf_counter()
    for i in range(n_new - 1):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(input_ids=tok, cache_position=pos, use_cache=True, **{kw: cache}).logits
        tok = logits[:, -1:].argmax(-1)
        pos = pos + 1
        toks.append(tok)
    if host is not None:
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    ctx.__exit__(None, None, None)
    return torch.cat(toks, 1), time.perf_counter() - t0


def compiled_step(model, backend, quant=None, unwrap=True, skip_guards=False):
    """(eager forward, compiled forward) of ``model`` for the decode step."""
    eager = model.forward
    if backend.startswith("spear"):
        warm_kernels(model, ms=(1,))  # tune + allocate kernel workspaces outside the CUDA-graph pool
        if backend.endswith("-nopart"):  # A/B: CUDA graphs without Inductor's graph partitioning
            optimize(model, quant=quant, options={"triton.cudagraphs": True, "graph_partition": False},
                     fullgraph=True, dynamic=False, unwrap=unwrap)
        else:
            optimize(model, quant=quant, mode="reduce-overhead", fullgraph=True, dynamic=False, unwrap=unwrap,
                     skip_module_guards=skip_guards)
    elif skip_guards:
        from spear_compile.compile.api import module_guard_free_options
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False,
                                      options=module_guard_free_options("reduce-overhead"))
    else:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return eager, model.forward


REC = records.CompileRecords()  # what the passes saw in this run (main() records into it)


def count_graphs():
    return REC.graphs


def ref_checks(args):
    from transformers import AutoModelForCausalLM
    # the baseline of the per-layer numbers below: bf16 Inductor vs eager on the FP model (hidden states after each
    # decoder layer drift with depth: every layer inherits the previous ones' rounding differences)
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.bfloat16).cuda().eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()
    hs_ref = model(prompt, output_hidden_states=True).hidden_states
    hs = torch.compile(model.forward, backend="inductor", dynamic=False)(prompt, output_hidden_states=True).hidden_states
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(hs[1:], hs_ref[1:])]
    row(check="ref16m_bf16_inductor", max_layer_rel_err=max(errs), layer_rel_err=[round(e, 5) for e in errs])
    del model
    for ecs in (False, True):
        torch._dynamo.reset()
        REC.clear()
        model = AutoModelForCausalLM.from_pretrained(REF, dtype=torch.bfloat16).cuda().eval()
        spear_compile.quantize(model, "w4-pc-rtn", progress=False)
        chosen = attach_random_ecs(model, 0.15, 8, seed=1) if ecs else []
        prompt = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()
        cache = make_cache(model, 20 + 40)
        eager_fwd = model.forward
        ref_toks, _ = greedy(model, eager_fwd, prompt, 32, cache, False)
        # per-layer: hidden states of a prompt forward, compiled (spear, no cudagraphs) vs eager
        hs_ref = model(prompt, output_hidden_states=True).hidden_states
        hs_fn = torch.compile(eager_fwd, backend="spear", dynamic=False)
        hs = hs_fn(prompt, output_hidden_states=True).hidden_states
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(hs[1:], hs_ref[1:])]
        g0 = count_graphs()
        _, step = compiled_step(model, "spear")
        # Inductor keeps bf16 intermediates in fp32 unless asked to round like eager does
        with torch._inductor.config.patch(emulate_precision_casts=True):
            toks, _ = greedy(eager_fwd, step, prompt, 32, cache, True)
            g1 = count_graphs()
            toks2, _ = greedy(eager_fwd, step, prompt, 32, cache, True)
            g2 = count_graphs()
        fused = [r for r in REC.matches if r.graph > g0]
        row(check="ref16m", ecs=len(chosen), identical=bool(torch.equal(toks, ref_toks)),
            mismatches=int((toks != ref_toks).sum()), graphs_first_gen=g1 - g0, graphs_second_gen=g2 - g1,
            identical_rerun=bool(torch.equal(toks, toks2)), max_layer_rel_err=max(errs),
            layer_rel_err=[round(e, 5) for e in errs],
            decode_graph_fused=sum(r.matched for r in fused), decode_graph_ec=sum(r.kind.startswith("ec") for r in fused),
            decode_graph_unfused=sum(not r.matched for r in fused))
        del model, cache


def llama1b(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=4096, head_dim=64)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def profile_decode(eager, step, cache, prompt, variant, n=5):
    """Profile ``n`` decode steps (the timed loop's own code): CUDA-graph replays? where does GPU time go?"""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    greedy(eager, step, prompt, n + 1, cache, True, around=prof)
    ev = prof.key_averages()
    counts = {e.key: e.count for e in ev if e.key in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "spear::fused_linear", "aten::copy_")}
    gpu_us = sum(e.self_device_time_total for e in ev) / n
    row(check="profile", variant=variant, steps=n, counts=counts, gpu_busy_us_per_step=round(gpu_us, 1))
    print(ev.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70), flush=True)


@torch.no_grad()
def variants_check(args):
    """Each CompensatedLinear/quantized-linear layout on CUDA bf16: fused? (pre-pass graph dumped when not)."""
    import warnings
    from spear_compile.compile.dumps import debug
    from spear_compile.quant.api import quantize_linear_
    from spear_compile.quant.config import QuantConfig
    for gate in ("sigmoid", "none", "plain"):
        for shape in ((1, 1, 256), (1, 20, 256), (20, 256), (1, 256)):
            torch._dynamo.reset()
            REC.clear()
            lin = torch.nn.Linear(256, 128, bias=False).cuda().to(torch.bfloat16)
            quantize_linear_(lin, QuantConfig.from_spec("w4-pc-rtn"))
            m = lin if gate == "plain" else CompensatedLinear.wrap(lin, 16, gate=gate)
            for p in (m.ec_parameters() if gate != "plain" else []):
                p.data.normal_(0, 0.05)
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            d = os.path.join(args.out, f"graphs_{gate}_{'x'.join(map(str, shape))}")
            with warnings.catch_warnings(), debug(d):
                warnings.simplefilter("ignore")
                out = torch.compile(m, backend="spear")(x)
            ref = m(x)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            row(check="variant", gate=gate, shape=shape, kinds=[r.kind for r in REC.matches],
                reasons=[r.reason for r in REC.matches if not r.matched], rel_err=round(err, 5))
            if any(not r.matched for r in REC.matches):
                import glob
                for f in glob.glob(os.path.join(d, "fx_graphs", "*_pre_spear.txt")):
                    print(open(f).read()[-3000:])


def kernel_probe(args):
    """Per-op time at M=1: spear::fused_linear (no EC / gated EC r=32) vs a bf16 F.linear."""
    from triton.testing import do_bench
    from spear_compile.quant.weight import QuantizedWeight
    for k, n in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = QuantizedWeight.from_float(w, 4)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        a, b = torch.randn(32, k, device="cuda", dtype=torch.bfloat16) * 0.02, torch.randn(n, 32, device="cuda", dtype=torch.bfloat16) * 0.02
        gw, gb = torch.randn(32, 32, device="cuda", dtype=torch.bfloat16) * 0.02, torch.zeros(32, device="cuda", dtype=torch.bfloat16)
        fl = torch.ops.spear.fused_linear
        args_q = (x, qw.qdata, qw.scale, qw.zero, None, k)
        t_bf16 = do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
        t_q = do_bench(lambda: fl(*args_q, None, None, None, None), return_mode="median")
        t_ec = do_bench(lambda: fl(*args_q, a, b, gw, gb), return_mode="median")
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()  # warm up on the stream that captures (the decode workspaces are per stream)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fl(*args_q, a, b, gw, gb)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g, stream=side):
            for _ in range(10):
                fl(*args_q, a, b, gw, gb)
        t_ec_graph = do_bench(lambda: g.replay(), return_mode="median") / 10
        from spear_compile.lowering.dispatch import choose
        row(check="kernel", k=k, n=n, bf16_linear_us=round(1e3 * t_bf16, 1), w4_us=round(1e3 * t_q, 1),
            w4_ec32_us=round(1e3 * t_ec, 1), w4_ec32_in_cudagraph_us=round(1e3 * t_ec_graph, 1),
            kernel=choose(1, k, n, k, torch.bfloat16, 32, True))


def parse_variant(variant):
    """``bf16[+sg][+cg]`` or ``spear[+ec][+lmhead][+wrapped][+nopart][+sg][+cg]``: ECs on 10% of the linears, the LM
    head quantized too, the ``QuantizedWeight`` subclass compiled as is (no ``unwrap``), no graph
    partition, no Dynamo guards on nn-module state (``skip_module_guards``); ``cg``: the prefill timing under
    ``mode="reduce-overhead"`` (CUDA graphs; the decode timing always uses it)."""
    parts = variant.split("+")
    if parts[0] not in ("bf16", "spear") or (parts[0] == "bf16" and set(parts[1:]) - {"sg", "cg"}):
        raise SystemExit(f"unknown variant {variant!r}")
    extra = set(parts[1:])
    bad = extra - {"ec", "lmhead", "wrapped", "nopart", "sg", "cg"}
    if bad:
        raise SystemExit(f"unknown variant option(s) {sorted(bad)} in {variant!r}")
    return parts[0], extra


def bench_model(variant):
    """(base, options, the 1B-shaped model — W4 per-channel for ``spear``, + random ECs on 10% of the linears for
    ``+ec``, the LM head too for ``+lmhead`` —, the EC'd linears) after a fresh Dynamo/pass state."""
    base, opts = parse_variant(variant)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    REC.clear()
    model = llama1b(0)
    chosen = []
    if base == "spear":
        spear_compile.quantize(model, "w4-pc-rtn", skip=() if "lmhead" in opts else ("lm_head",), progress=False)
        if "ec" in opts:
            chosen = attach_random_ecs(model, 0.10, 32, seed=2)
    return base, opts, model, chosen


def e2e(args, variant):
    base, opts, model, chosen = bench_model(variant)
    prompt = torch.randint(0, 128256, (1, args.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    cache = make_cache(model, args.prompt + args.new + 8)
    t0 = time.perf_counter()
    eager, step = compiled_step(model, "inductor" if base == "bf16" else "spear-nopart" if "nopart" in opts else "spear",
                                unwrap="wrapped" not in opts, skip_guards="sg" in opts)
    greedy(eager, step, prompt, args.new, cache, True)  # warm-up: compile + record
    compile_s = time.perf_counter() - t0
    g0 = count_graphs()
    times, host = [], []
    for _ in range(args.reps):
        toks, dt = greedy(eager, step, prompt, args.new, cache, True, host=host)
        times.append(dt)
    best = min(times)
    recs = list(REC.matches)
    row(check="e2e", variant=variant, ecs=len(chosen), new_tokens=args.new, prompt=args.prompt,
        tok_per_s=round((args.new - 1) / best, 1), ms_per_tok=round(1e3 * best / (args.new - 1), 3),
        host_ms_per_tok=round(1e3 * min(host) / (args.new - 1), 3),
        all_reps_s=[round(t, 4) for t in times], warmup_compile_s=round(compile_s, 1),
        recompiles_after_warmup=count_graphs() - g0,
        fused=sum(r.matched for r in recs), fused_ec=sum(r.kind.startswith("ec") for r in recs),
        grouped_launches=len(REC.groups), grouped_members=sum(len(g.members) for g in REC.groups),
        unfused=sum(not r.matched for r in recs),
        cudagraph_skips=int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)),
        gpu_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if args.profile:
        profile_decode(eager, step, cache, prompt, variant)
    if args.cprofile:
        host_profile(eager, step, cache, prompt, variant)
    del model, cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def prefill_timing(args, variant, reps=5):
    """Time to first token of a ``--prefill-len`` prompt (TTFT), its own fresh compile (default mode: no CUDA
    graphs, module guards kept), static cache, ``logits_to_keep=1`` (the LM head on the last position only, as
    generation does): the layers' linears run at M = prompt length, i.e. the prefill kernels (dequantize +
    cuBLAS with the EC structures the tuner picks)."""
    base, opts, model, chosen = bench_model(variant)
    n = args.prefill_len
    ids = torch.randint(0, 128256, (1, n), generator=torch.Generator().manual_seed(1)).cuda()
    pos = torch.arange(n, device="cuda")
    with torch.no_grad():  # the eager model's last-position logits: the compiled prefill is checked against them
        ref_cache = make_cache(model, n + 8)
        ref = model(input_ids=ids, cache_position=pos, use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model): ref_cache}).logits.float()
        del ref_cache
    if base == "spear":
        optimize(model, quant=None, fullgraph=True, dynamic=False, mode="reduce-overhead" if "cg" in opts else None)
    else:
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if "cg" in opts else None)
    cache = make_cache(model, n + 8)

    def run():
        if "cg" in opts:
            torch.compiler.cudagraph_mark_step_begin()
        return model(input_ids=ids, cache_position=pos, use_cache=True, logits_to_keep=1,
                     **{cache_kwarg(model): cache}).logits

    for _ in range(3):  # compile, tune the M = n kernels
        cache.reset()  # the cache counts the tokens it holds: every prefill starts from an empty one
        run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    best = min(ts)
    if args.cprofile:
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        cache.reset()
        torch.cuda.synchronize()
        pr.enable()
        run()
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(15)
        print(f"--- host profile, prefill {variant} ---\n" + buf.getvalue()[-5000:], flush=True)
    cache.reset()
    out = run().float()
    err = ((out - ref).norm() / ref.norm()).item()
    recs = list(REC.matches)
    row(check="prefill", variant=variant, ecs=len(chosen), prompt=n, ms=round(1e3 * best, 3),
        tok_per_s=round(n / best, 1), all_reps_ms=[round(1e3 * t, 3) for t in ts],
        fused=sum(r.matched for r in recs), fused_ec=sum(r.kind.startswith("ec") for r in recs),
        decomposed=sum(r.decomposed for r in recs), decomposed_spear=sum(r.decomposed_with == "spear" for r in recs),
        logits_rel_err_vs_eager=float(f"{err:.3g}"), ok=err < 0.1)  # bf16's own compile: ~3e-2 (16 random
    # layers, bf16 rounding in another order); an unwritten or wrong kernel output gives ~1 or more
    del model, cache
    torch.cuda.empty_cache()


def host_profile(eager, step, cache, prompt, variant, n=20):
    """cProfile of ``n`` decode steps (host side): where the per-step CPU time goes."""
    import cProfile
    import io
    import pstats
    pr = cProfile.Profile()
    greedy(eager, step, prompt, n + 1, cache, True, around=pr)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    print(f"--- host profile, {variant}, {n} decode steps ---\n" + buf.getvalue()[-4000:], flush=True)


def main():
    with records.recording(REC):
        _main()


def _main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile 5 decode steps per variant")
    ap.add_argument("--cprofile", action="store_true", help="cProfile 20 decode steps per variant (host time)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-variants", action="store_true", help="skip the per-layout fusion check")
    ap.add_argument("--variants", default="bf16,spear+ec,spear,spear+ec+lmhead,spear+lmhead")
    ap.add_argument("--prefill-len", type=int, default=0, help="also time a prompt of this length (TTFT)")
    ap.add_argument("--prefill-variants", default="bf16,spear+ec,spear")
    ap.add_argument("--deadline", type=float, default=1e9, help="skip steps starting after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._logging.set_logs(perf_hints=True)  # "skipping cudagraphs due to ..." lands in the log
    import triton
    import transformers
    row(check="env", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv))
    steps = ([] if args.skip_variants else [("variants", lambda: variants_check(args))]) + \
            ([] if args.skip_kernel else [("kernel", lambda: kernel_probe(args))]) + \
            ([] if args.skip_e2e else [(v, (lambda v=v: e2e(args, v))) for v in args.variants.split(",")]) + \
            ([] if not args.prefill_len else [("prefill " + v, (lambda v=v: prefill_timing(args, v)))
                                              for v in args.prefill_variants.split(",")]) + \
            ([] if args.skip_ref else [("ref", lambda: ref_checks(args))])
    start = time.perf_counter()
    for name, fn in steps:
        if time.perf_counter() - start > args.deadline:
            row(check=name, error=f"skipped: past --deadline {args.deadline}s")
            continue
        try:
            # caches off: every graph really runs our pass, so the fused counts below are real
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                fn()
        except Exception as e:  # noqa: BLE001  (report and go on with the next measurement)
            traceback.print_exc()
            row(check=name, error=f"{type(e).__name__}: {str(e)[:400]}")
    base = next((r["tok_per_s"] for r in ROWS if r.get("variant") == "bf16" and "tok_per_s" in r), None)
    with open(os.path.join(args.out, "decode_e2e.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    print("\n| variant | ECs | tok/s | ms/tok | host ms/tok | speedup vs bf16 | fused (EC) | grouped launches (members) | unfused | recompiles |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r.get("check") == "e2e" and "tok_per_s" in r:
            sp = f"{r['tok_per_s'] / base:.2f}x" if base else "-"
            print(f"| {r['variant']} | {r['ecs']} | {r['tok_per_s']} | {r['ms_per_tok']} | {r['host_ms_per_tok']} | {sp} | {r['fused']} ({r['fused_ec']}) | {r.get('grouped_launches', '-')} ({r.get('grouped_members', '-')}) | {r['unfused']} | {r['recompiles_after_warmup']} |")
    pre = {r["variant"]: r for r in ROWS if r.get("check") == "prefill"}
    if pre:
        b = pre.get(next((v for v in pre if v.startswith("bf16")), ""), {}).get("ms")
        print("\n| variant | prompt | TTFT ms | prefill tok/s | vs bf16 (time) | logits rel err vs eager | decomposed "
              "(our kernels) |\n|---|---|---|---|---|---|---|")
        for v, r in pre.items():
            ratio = f"{r['ms'] / b:.2f}x" if b else "-"
            wrong = "" if r["ok"] else " WRONG"
            print(f"| {v} | {r['prompt']} | {r['ms']} | {r['tok_per_s']} | {ratio} | {r['logits_rel_err_vs_eager']}{wrong} | "
                  f"{r['decomposed']} ({r['decomposed_spear']}) |")
    for r in ROWS:
        if r.get("check") == "ref16m":
            print(f"ref16m ecs={r['ecs']}: identical={r['identical']} (mismatches {r['mismatches']}), graphs gen1/gen2="
                  f"{r['graphs_first_gen']}/{r['graphs_second_gen']}, max layer rel err={r['max_layer_rel_err']:.2e}")


if __name__ == "__main__":
    main()
