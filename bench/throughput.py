"""Serving engine on one GPU: offline throughput, decode tokens/s, HF ``generate()`` after ``optimize``.

    python bench/throughput.py [--parts check,engine,hf,hfgen] [--requests 256] [--json] [--out DIR]

Parts (each reports rows; a part that fails is reported and the others go on):
* ``check``: spear-ref-16m W4 (+3 random gated ECs) on the GPU: the engine's greedy tokens for a mixed batch of prompt
  lengths vs HF eager ``generate`` of the same model, and zero recompiles after start-up.
* ``engine``: Llama-3.2-1B shape, random weights: the same ``--requests`` requests (seeded prompt lengths 32-512,
  output lengths 32-256, ignore EOS, greedy) through the engine for bf16, W4 (per-channel RTN) and W4 + gated r=32 ECs
  on ~10% of the linears; tokens/s; then batch-1 and batch-16 decode tokens/s (decode-only steps, wall clock).
* ``hf``: the same requests through HF ``generate`` (bf16, static cache, HF's own compiled decode, padded batches of
  ``--hf-batch`` in arrival order, each batch running to its longest output).
* ``hfgen``: HF ``generate()`` (128 new tokens, batch 1 and 8): bf16 with HF's compiled generate (static cache) vs
  ``optimize(mode="reduce-overhead")`` W4 and W4+EC; greedy tokens vs eager on spear-ref-16m.
Writes ``serving_throughput.md`` and ``serving_throughput.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
import traceback

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))  # run as a script: bench/ off the path (bench/kernels.py would
# shadow the `kernels` package transformers may import); run as `python -m bench.throughput` from the repo root
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
import spear_compile  # noqa: E402
from spear_compile.ec.module import CompensatedLinear  # noqa: E402
from spear_compile.modules import cache_kwarg  # noqa: E402
from spear_compile.lowering.runtime import TUNER  # noqa: E402

REF = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")
ROWS = []
DEV = {"device": "cuda", "tiny": False, "dtype": torch.bfloat16}
START = [time.perf_counter()]  # --device / --tiny (a CPU smoke run of the script)


def sync():
    if DEV["device"] == "cuda":
        torch.cuda.synchronize()


def row(**kw):
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)
    if DEV.get("rows_file"):  # each row on disk as it comes: a run killed by its timeout keeps what it measured
        with open(DEV["rows_file"], "a") as f:
            f.write(json.dumps(kw) + "\n")


def attach_random_ecs(model, fraction, rank, seed, scale=0.02):
    """Gated ECs of random weights on a random ``fraction`` of the linears (not the LM head); as bench/decode_e2e.py."""
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    chosen = sorted(rng.sample(names, max(1, round(fraction * len(names)))))
    for name in chosen:
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), rank, gate="sigmoid")
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype)
        setattr(par, attr, ec)
    return chosen


def llama1b(seed=0):
    """Llama-3.2-1B's shape (LlamaConfig built here), random weights, bf16, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if DEV["tiny"]:  # the script's own smoke test: same code, a 2-layer model
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).to(DEV["device"], DEV["dtype"]).eval()
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=4096, head_dim=64, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


VARIANTS = ("bf16", "w4", "w4+ec", "w4+ec+lmhead", "w4+lmhead")


def build(variant: str, seed=0):
    """``bf16``, ``w4`` (per-channel RTN), ``w4+ec`` (+ gated r=32 ECs on 10% of the linears); ``+lmhead``: the LM
    head quantized too (as gpt-fast / torchao do, and as the project's 1.86x hand loop ran: decode_e2e.md)."""
    if variant not in VARIANTS:   # (the "+overlap" and "+tattn" suffixes are run_engine's)
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    model = llama1b(seed)
    ecs = []
    if variant != "bf16":
        skip = () if variant.endswith("+lmhead") else ("lm_head",)
        spear_compile.quantize(model, "w4-pc-rtn", skip=skip, progress=False)
        if variant.startswith("w4+ec"):
            ecs = attach_random_ecs(model, 0.10, 32, seed=2)
    return model, ecs


def bf16_twin(variant: str) -> str:
    """The bf16 engine variant run in the same mode (overlap, decode attention) as ``variant``."""
    _, overlap, attention = split_variant(variant)
    return "bf16" + ("+overlap" if overlap else "") + ("+tattn" if attention == "triton" else "")


def split_variant(variant: str) -> tuple:
    """``(model variant, overlapped steps, decode attention)`` of an engine variant name: a ``+overlap`` suffix runs
    the whole run with overlapped steps (EngineConfig.overlap_decode), a last ``+tattn`` the paged Triton decode
    attention (EngineConfig.decode_attention)."""
    base, tattn = (variant[:-len("+tattn")], True) if variant.endswith("+tattn") else (variant, False)
    overlap = base.endswith("+overlap")
    return (base[:-len("+overlap")] if overlap else base), overlap, "triton" if tattn else "torch"


def make_requests(n, seed, vocab):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = rng.randint(32, 512), rng.randint(32, 256)
        out.append(([rng.randrange(10, vocab) for _ in range(p)], o))
    return out


def reset_compiler():
    torch._dynamo.reset()  # the passes' records are per compile: nothing else to clear
    if DEV["device"] == "cuda":
        torch.cuda.empty_cache()


# ---- parts -------------------------------------------------------------------------------------------------------
def part_check(args):
    """spear-ref-16m on the GPU: engine greedy vs HF eager generate greedy, with and without ECs. In float32 (the
    W4 linears then run the reference dequantize + matmul in both: the paging, batching and compiled graphs are what
    is checked) the tokens must be identical. In bf16 the engine's fused kernels and HF's eager path round
    differently, so a near-tie can flip: each first mismatch is reported with the reference's logit gap between its
    token and the engine's (teacher-forced on the common prefix) and the engine token's rank under the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from spear_compile.serving import Engine, EngineConfig, SamplingParams
    tok = AutoTokenizer.from_pretrained(REF)
    lens, new = (5, 23, 40, 9, 17, 64), 24
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in lens]
    dtypes = (torch.float32, DEV["dtype"]) if DEV["device"] == "cuda" else (DEV["dtype"],)
    if args.check_dtypes:
        dtypes = tuple(getattr(torch, d) for d in args.check_dtypes.split(","))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for dtype in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = tf32 and dtype != torch.float32   # float32: exact products
        for ecs in (False, True):
            reset_compiler()
            model = AutoModelForCausalLM.from_pretrained(REF, dtype=dtype).to(DEV["device"]).eval()
            spear_compile.quantize(model, "w4-pc-rtn", progress=False)
            if ecs:
                attach_random_ecs(model, 0.15, 8, seed=1, scale=0.1)
            with torch.no_grad():
                ref = [model.generate(torch.tensor([p], device=DEV["device"]), max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False)[0, len(p):].tolist() for p in prompts]
            t0 = time.perf_counter()
            eng = Engine(model, tok, EngineConfig(max_num_seqs=8, max_num_tokens=64, token_buckets=(16, 32, 64),
                                                  max_model_len=256, num_blocks=256, policy="budget-32",
                                                  device=DEV["device"], dtype=dtype, compile=not DEV["tiny"]))
            startup = time.perf_counter() - t0
            outs = eng.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
            got = [o.output_token_ids for o in outs]
            first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(got, ref)]
            gaps, ranks = [], []
            with torch.no_grad():
                for p, r, x, d in zip(prompts, ref, got, first_diff):
                    if d is None:
                        continue
                    logits = model(torch.tensor([p + r[:d]], device=DEV["device"])).logits[0, -1].float()
                    gaps.append(round(float(logits[r[d]] - logits[x[d]]), 4))
                    ranks.append(int((logits > logits[x[d]]).sum()))
            st = eng.stats()
            row(part="check", dtype=str(dtype).replace("torch.", ""), ecs=ecs, identical=got == ref,
                identical_requests=sum(d is None for d in first_diff), requests=len(ref), first_mismatch_at=first_diff,
                ref_logit_gap=gaps, engine_token_rank=ranks, recompiles=st.recompiles, startup_s=round(startup, 1),
                graphs=len(eng.runner.graphs), blocks_free=eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks)
            del eng, model
    torch.backends.cuda.matmul.allow_tf32 = tf32


def make_engine(variant, args):
    """``(engine, model, ecs, start-up seconds)`` of one variant, sized by ``args`` (also bench.engine_profile's)."""
    from spear_compile.serving import Engine, EngineConfig
    reset_compiler()
    base, overlap, attention = split_variant(variant)
    model, ecs = build(base)
    sizes = dict(max_num_seqs=args.max_num_seqs, max_num_tokens=args.max_num_tokens)
    if args.decode_only:  # batch-1 / batch-16 decode rates only: two decode buckets, one token bucket
        sizes = dict(max_num_seqs=16, max_num_tokens=64, decode_buckets=(1, 16), token_buckets=(64,))
    cfg = EngineConfig(**sizes, max_model_len=1024, policy=f"budget-{sizes['max_num_tokens']}", device=DEV["device"],
                       detokenize=False, dtype=DEV["dtype"], compile=not DEV["tiny"],
                       num_blocks=None if DEV["device"] == "cuda" else 2048, gpu_memory_utilization=0.3,
                       overlap_decode=overlap, decode_attention=attention, mixed_shape_cache=args.shape_cache,
                       mixed_capture_first=args.capture_first)
    t0 = time.perf_counter()
    eng = Engine(model, None, cfg, model_name=f"llama1b-{variant}")
    return eng, model, ecs, time.perf_counter() - t0


def run_engine(variant, args, reqs):
    from spear_compile.serving import SamplingParams
    eng, model, ecs, startup = make_engine(variant, args)
    overlap = split_variant(variant)[1]
    frozen = eng.gc_frozen or {}
    row(part="startup", variant=variant, startup_s=round(startup, 1), graphs=len(eng.runner.graphs),
        tuned_keys=len(TUNER.picks), gc_collect_ms=round(1e3 * frozen["collect_s"], 1) if frozen else None,
        gc_frozen_objects=frozen.get("frozen"),
        warmup={k: round(v, 1) for k, v in eng.runner.warmup_breakdown.items()})
    if args.decode_only:
        for batch in (1, 16):
            decode_rate(eng, variant, batch, args, new=args.decode_tokens + 1)
        del eng, model
        return
    samplings = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in reqs]
    prompts = [p for p, _ in reqs]
    eng.generate(prompts[:4], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 4)  # warm path
    sync()
    steps_before, captures_before = eng.num_steps, eng.runner.mixed.first_steps
    t0 = time.perf_counter()
    outs = eng.generate(prompts, samplings)
    sync()
    wall = time.perf_counter() - t0
    out_tokens = sum(o.num_output_tokens for o in outs)
    assert out_tokens == sum(o for _, o in reqs)
    steps = list(eng.step_log)[-(eng.num_steps - steps_before):]
    host = [r.host_s for r in steps if r.num_prefill_tokens == 0]
    row(part="engine", variant=variant, ecs=len(ecs), requests=len(reqs), output_tokens=out_tokens,
        prompt_tokens=sum(len(p) for p in prompts), wall_s=round(wall, 2), tok_per_s=round(out_tokens / wall, 1),
        total_tok_per_s=round((out_tokens + sum(len(p) for p in prompts)) / wall, 1), startup_s=round(startup, 1),
        recompiles=eng.stats().recompiles, preemptions=eng.num_preemptions, steps=len(steps),
        graphs=len(eng.runner.graphs), mixed_captures=eng.runner.mixed.first_steps - captures_before,
        captured_first=eng.runner.mixed.captured_first,
        decode_host_ms_median=round(1e3 * sorted(host)[len(host) // 2], 3) if host else None)
    if args.warm:
        # a server's steady state: as many other requests of the same distribution (seed + 1), unseen, on the engine
        # the first pass warmed (its mixed-step graphs captured lazily, at each step shape's first step)
        step_breakdown(variant + " cold", steps)
        other = make_requests(len(reqs), args.seed + 1, 128256)
        steps_before, captures_before = eng.num_steps, eng.runner.mixed.first_steps
        t0 = time.perf_counter()
        outs = eng.generate([p for p, _ in other], [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
                                                    for _, o in other])
        sync()
        wall = time.perf_counter() - t0
        steps = list(eng.step_log)[-(eng.num_steps - steps_before):]
        row(part="engine-warm", variant=variant, requests=len(other), output_tokens=sum(o for _, o in other),
            wall_s=round(wall, 3), tok_per_s=round(sum(o.num_output_tokens for o in outs) / wall, 1), steps=len(steps),
            mixed_captures=eng.runner.mixed.first_steps - captures_before, recompiles=eng.stats().recompiles)
    step_breakdown(variant + (" warm" if args.warm else ""), steps)
    if args.profile:
        profile_passes(eng, variant, args)
    if overlap:
        row(part="overlap", variant=variant, launched=eng.overlap.num_launched, steps=eng.num_steps)
        del eng, model
        return
    for batch in (1, 16):
        decode_rate(eng, variant, batch, args, new=args.decode_tokens + 1)
    from spear_compile.serving.overlap import OverlappedSteps
    eng.overlap = OverlappedSteps(eng)   # the same engine, steps launched ahead of their read-back
    for batch in (1, 16):
        decode_rate(eng, variant + " overlap", batch, args, new=args.decode_tokens + 1)
    row(part="overlap", variant=variant, launched=eng.overlap.num_launched)
    eng.overlap = None
    del eng, model


def profile_passes(eng, variant, args):
    """Where a pass's time goes (printed, not timed): 64 new requests (other lengths: new mixed-step shapes, so the
    pass captures graphs) under cProfile, the host's top functions by own time; then the same requests again
    (replays) under the torch profiler, the device's top kernels."""
    import cProfile
    import pstats
    from spear_compile.serving import SamplingParams
    reqs = make_requests(64, args.seed + 1, 128256)
    prompts, samplings = [p for p, _ in reqs], [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
                                                 for _, o in reqs]
    prof = cProfile.Profile()
    prof.enable()
    eng.generate(prompts, samplings)
    sync()
    prof.disable()
    print(f"== {variant}: host, 64 new requests (captures), top by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV["device"] == "cuda" else [])
    with profile(activities=activities) as tp:
        eng.generate(prompts, samplings)
        sync()
    print(f"== {variant}: device, the same requests again (replays), top kernels")
    print(tp.key_averages().table(sort_by="device_time_total" if DEV["device"] == "cuda" else "cpu_time_total",
                                  row_limit=30, max_name_column_width=90))


def step_breakdown(variant, steps):
    """Where the 256 requests' device time went: decode-only steps by batch bucket, mixed steps by token bucket
    (count, total and median measured ms), so a slower variant names the step kind that makes it slower."""
    buckets = {}
    for r in steps:
        tokens = r.num_decodes + r.num_prefill_tokens
        kind = "decode" if not r.num_prefill_tokens else \
            "mixed-capture" if r.captured_graph else "mixed-eager" if r.uncaptured_mixed else "mixed"
        size = 1 << max(0, (tokens - 1).bit_length())
        buckets.setdefault((kind, size), []).append(r.measured_s)
    for (kind, size), times in sorted(buckets.items()):
        times.sort()
        row(part="steps", variant=variant, kind=kind, tokens_le=size, steps=len(times),
            total_ms=round(1e3 * sum(times), 1), median_ms=round(1e3 * times[len(times) // 2], 3))


def decode_rate(eng, variant, batch, args, new=129):
    """Decode tokens/s with ``batch`` requests (prompt 32) decoding together: wall clock over decode-only steps.
    Also where the slowest step sits (its index, whether it had prefill tokens) and the garbage collector's pauses
    inside the window, so that a one-off outlier is named rather than averaged in."""
    import gc
    from spear_compile.serving import SamplingParams
    batch = min(batch, eng.config.max_num_seqs)
    rng = random.Random(batch)
    for _ in range(batch):
        eng.add_request([rng.randrange(10, 1000) for _ in range(32)], SamplingParams(max_tokens=new, temperature=0.0,
                                                                                 ignore_eos=True))
    while eng.has_unfinished():  # until every request decodes (prefills done)
        eng.step()
        if all(r.num_tokens_to_compute == 1 for r in eng.scheduler.running) and not eng.scheduler.waiting:
            break
    if eng.overlap is not None:
        eng.overlap.drain()   # the step in flight's tokens belong before the timed window
    sync()
    gc_pauses, gc_t = [], [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_t[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_t[0]))
    gc.callbacks.append(on_gc)
    before = eng.step_log[-1] if eng.step_log else None
    keys_before, uncaptured_before = set(TUNER.picks), eng.runner.num_uncaptured_decodes
    allocs_before = alloc_counters()
    t0 = time.perf_counter()
    tokens = 0
    host, walls, mixed_at, running = [], [], [], []
    try:
        while eng.has_unfinished():
            running.append(len(eng.scheduler.running))
            t_step = time.perf_counter()
            n_before = eng.num_steps
            outs = eng.step()
            walls.append(time.perf_counter() - t_step)
            tokens += sum(len(o.new_token_ids) for o in outs)
            if eng.num_steps > n_before:  # a step ran (one that found nothing to do logs nothing)
                host.append(eng.step_log[-1].host_s)
                if eng.step_log[-1].num_prefill_tokens > 0:
                    mixed_at.append(len(walls) - 1)
        sync()
    finally:
        gc.callbacks.remove(on_gc)
    wall = time.perf_counter() - t0
    allocs = {k: v - allocs_before.get(k, 0) for k, v in alloc_counters().items()}
    records = []
    for rec in reversed(eng.step_log):   # the window's steps (overlapped: measured on the device, CUDA events)
        if rec is before:
            break
        records.append(rec)
    device = sorted(r.measured_s for r in records if r.num_prefill_tokens == 0)
    slowest = max(range(len(walls)), key=walls.__getitem__) if walls else None
    ordered = sorted(walls)
    row(part="decode", variant=variant, batch=batch, tokens=tokens, tok_per_s=round(tokens / wall, 1),
        ms_per_step=round(1e3 * wall / max(1, len(walls)), 3), steps=len(walls), mixed_steps=len(mixed_at),
        step_ms_median=round(1e3 * ordered[len(ordered) // 2], 3) if walls else None,
        step_ms_max=round(1e3 * ordered[-1], 3) if walls else None, slowest_step=slowest,
        mixed_step_at=mixed_at[:4], gc_pauses=len(gc_pauses), gc_ms_total=round(1e3 * sum(t for _, t in gc_pauses), 3),
        gc_ms_max=round(1e3 * max((t for _, t in gc_pauses), default=0.0), 3),
        gc_gen2=sum(g == 2 for g, _ in gc_pauses),
        running_at_slowest=running[slowest] if walls else None,
        # the step in which the first request finished (its rows move on the device from the next step on)
        first_finish_at=next((i - 1 for i in range(1, len(running)) if running[i] < running[i - 1]), None),
        last_steps=[(n, round(1e3 * w, 3)) for n, w in zip(running[-6:], walls[-6:])],  # (running, ms)
        tuned_keys_in_window=[str(k) for k in set(TUNER.picks) - keys_before][:4],
        uncaptured_decodes=eng.runner.num_uncaptured_decodes - uncaptured_before,
        mixed_graphs=len(eng.runner.mixed.graphs), uncaptured_mixed=eng.runner.mixed.uncaptured,
        step_measured_ms_median=round(1e3 * device[len(device) // 2], 3) if device else None,
        # a slow wall step whose device time is slow too was the GPU's (a kernel), else the host's
        step_measured_ms_max=round(1e3 * device[-1], 3) if device else None,
        host_ms_per_step=round(1e3 * sorted(host)[len(host) // 2], 3) if host else None,
        recompiles=eng.stats().recompiles,
        # cudaMalloc / cudaFree (a free synchronizes the device) and pinned host allocations inside the window: a
        # step that pays one stalls (session 20: one W4 batch-16 step of 77 ms, unexplained)
        allocs_in_window={k: v for k, v in allocs.items() if v})


def alloc_counters() -> dict:
    """The CUDA caching allocators' counts of device and pinned-host allocations, frees and retries ({} off CUDA)."""
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.memory_stats()
    out = {k: dev.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    out.update({f"host_{k}": host.get(k, 0) for k in ("num_host_alloc", "num_host_free")})
    return out


def part_engine(args):
    reqs = make_requests(args.requests, args.seed, 128256)
    for variant in args.variants.split(","):
        if time.perf_counter() - START[0] > args.deadline:
            row(part="engine", variant=variant, error=f"skipped: past --deadline {args.deadline}s")
            continue
        try:
            run_engine(variant, args, reqs)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row(part="engine", variant=variant, error=f"{type(e).__name__}: {str(e)[:300]}")


def part_hf(args):
    """HF generate, bf16, static cache (HF's compiled decode), padded batches in arrival order."""
    from transformers import StaticCache
    reset_compiler()
    reqs = make_requests(args.requests, args.seed, 128256)
    model, _ = build("bf16")
    model.generation_config.pad_token_id = 0
    b = args.hf_batch
    max_len = 512 + 256
    batches = [reqs[i:i + b] for i in range(0, len(reqs), b)]
    cache = StaticCache(config=model.config, max_cache_len=max_len)  # one cache: HF's compiled decode keeps its shapes

    def run(batch):
        p = max(len(x) for x, _ in batch)
        ids = torch.zeros(len(batch), p, dtype=torch.long)
        mask = torch.zeros(len(batch), p, dtype=torch.long)
        for i, (x, _) in enumerate(batch):  # left padding
            ids[i, p - len(x):] = torch.tensor(x)
            mask[i, p - len(x):] = 1
        new = max(o for _, o in batch)
        cache.reset()
        with torch.no_grad():
            model.generate(ids.to(DEV["device"]), attention_mask=mask.to(DEV["device"]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, **{cache_kwarg(model): cache})
    t0 = time.perf_counter()
    run(batches[0][:b])  # compile
    warm = time.perf_counter() - t0
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    sync()
    wall = time.perf_counter() - t0
    useful = sum(o for _, o in reqs)
    row(part="hf", variant="bf16 HF generate", requests=len(reqs), batch=b, output_tokens=useful, wall_s=round(wall, 2),
        tok_per_s=round(useful / wall, 1), generated_tokens=sum(len(bt) * max(o for _, o in bt) for bt in batches),
        warmup_s=round(warm, 1))
    del model


def hf_generate_rate(model, batch, new=128, prompt=32, reps=2):
    new = 128 if not DEV["tiny"] else 8
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(DEV["device"])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, **kw)  # compile / capture
        warm = time.perf_counter() - t0
        best = float("inf")
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            sync()
            best = min(best, time.perf_counter() - t0)
    return batch * new / best, warm


def first_mismatch_gaps(got, want, ref_logits, prompt_len: int) -> list:
    """Per row whose tokens differ from the eager reference's: (new-token index of the first difference, the
    reference's logit of its own token minus its logit of the compiled run's token there). Before that index both
    runs saw the same tokens, so a gap near bf16's rounding (a few 0.01) is a near-tie that either rounding may
    break; a large one is a wrong kernel."""
    out = []
    for b in range(got.shape[0]):
        diff = (got[b, prompt_len:] != want[b, prompt_len:]).nonzero()
        if len(diff):
            j = int(diff[0])
            lg = ref_logits[b, j].float()
            out.append([j, round(float(lg[want[b, prompt_len + j]] - lg[got[b, prompt_len + j]]), 4)])
    return out


def part_hfcheck(args):
    """HF generate() after optimize on spear-ref-16m: greedy tokens vs eager, batch 1 and 8, with and without ECs."""
    from transformers import AutoModelForCausalLM
    from spear_compile.compile.api import optimize
    for ecs in (False, True):
        reset_compiler()
        torch._dynamo.utils.counters.clear()
        model = AutoModelForCausalLM.from_pretrained(REF, dtype=DEV["dtype"]).to(DEV["device"]).eval()
        spear_compile.quantize(model, "w4-pc-rtn", progress=False)
        if ecs:
            attach_random_ecs(model, 0.15, 8, seed=1, scale=0.1)
        for batch in (1, 8):
            ids = torch.randint(3, 8000, (batch, 12), generator=torch.Generator().manual_seed(batch)).to(DEV["device"])
            kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, cache_implementation="static")
            with torch.no_grad():
                ref = model.generate(ids, disable_compile=True, return_dict_in_generate=True, output_logits=True,
                                     **kw)
                want = ref.sequences
                if batch == 1:
                    optimize(model, quant=None, mode="reduce-overhead", fullgraph=True, dynamic=False)
                got = model.generate(ids, **kw)
                again = model.generate(ids, **kw)
            row(part="hfgen-check", ecs=ecs, batch=batch, identical=bool(torch.equal(got, want)),
                identical_rerun=bool(torch.equal(again, want)), mismatches=int((got != want).sum()),
                first_mismatch_gaps=first_mismatch_gaps(got, want, torch.stack(ref.logits, 1), ids.shape[1]),
                cudagraph_skips=int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)))
        del model


def part_hfgen(args):
    """HF generate() tokens/s on the 1B shape: bf16 under HF's compiled generate vs optimize()d W4 / W4+EC."""
    from spear_compile.compile.api import optimize
    for variant in [v for v in args.hfgen_variants.split(",") if v]:
        try:
            reset_compiler()
            torch._dynamo.utils.counters.clear()
            model, ecs = build(variant)
            if variant == "bf16":
                from transformers import CompileConfig
                model.generation_config.compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
            else:
                optimize(model, quant=None, mode="reduce-overhead", fullgraph=True, dynamic=False)
            for batch in (1, 8):
                rate, warm = hf_generate_rate(model, batch)
                row(part="hfgen", variant=variant, ecs=len(ecs), batch=batch, tok_per_s=round(rate, 1), warmup_s=round(warm, 1),
                    cudagraph_skips=int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)))
            del model
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row(part="hfgen", variant=variant, error=f"{type(e).__name__}: {str(e)[:300]}")


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(env):
    lines = [f"# Serving engine: throughput and decode ({env['device']})", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}. "
             f"Command: `{env['command']}`", ""]
    chk = [r for r in ROWS if r.get("part") == "check"]
    if chk:
        lines += ["## Greedy tokens vs HF eager generate (spear-ref-16m, W4 per-channel RTN, GPU)", "",
                  "float32: must be identical. bf16: at each first mismatch, the reference's logit gap between its "
                  "token and the engine's, and the engine token's rank under the reference (0 = its top token).", "",
                  "| dtype | ECs | identical requests | first mismatch at | ref logit gap | engine token rank | "
                  "recompiles after start-up | CUDA graphs | start-up s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('dtype', '-')} | {r['ecs']} | {r['identical_requests']}/{r['requests']} | "
                  f"{r['first_mismatch_at']} | {r.get('ref_logit_gap', '-')} | {r.get('engine_token_rank', '-')} | "
                  f"{r['recompiles']} | {r['graphs']} | {r['startup_s']} |" for r in chk if "error" not in r]
        lines.append("")
    ups = [r for r in ROWS if r.get("part") == "startup"]
    if ups:
        lines += ["## Engine start-up (compile, tune, capture; Llama-3.2-1B shape)", "",
                  "| variant | start-up s | CUDA graphs | tuner keys (cumulative in the process) | gc.collect before "
                  "gc.freeze ms | objects frozen |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['startup_s']} | {r['graphs']} | {r['tuned_keys']} | "
                  f"{r.get('gc_collect_ms', '-')} | {r.get('gc_frozen_objects', '-')} |" for r in ups]
        lines.append("")
    eng = {r["variant"]: r for r in ROWS if r.get("part") == "engine" and "tok_per_s" in r}
    hf = next((r for r in ROWS if r.get("part") == "hf" and "tok_per_s" in r), None)
    if eng or hf:
        lines += ["## Offline throughput (Llama-3.2-1B shape, random weights, same requests)", "",
                  "A fresh engine (after start-up): mixed-step graphs are captured at each step shape's first step, "
                  "inside this pass (`mixed captures`).", "",
                  "| system | output tok/s | vs HF generate bf16 | vs bf16 engine | wall s | start-up s | recompiles | "
                  "preemptions | mixed captures |", "|---|---|---|---|---|---|---|---|---|"]
        for v, r in eng.items():
            vs_hf = f"{r['tok_per_s'] / hf['tok_per_s']:.2f}x" if hf else "-"
            base = (eng.get(bf16_twin(v)) or eng.get("bf16") or {}).get("tok_per_s")  # same mode where it ran
            vs_b = f"{r['tok_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| engine {v} ({r['ecs']} ECs) | {r['tok_per_s']} | {vs_hf} | {vs_b} | {r['wall_s']} | "
                         f"{r['startup_s']} | {r['recompiles']} | {r['preemptions']} | {r.get('mixed_captures', '-')} |")
        if hf:
            lines.append(f"| HF generate bf16 (static cache, batches of {hf['batch']}) | {hf['tok_per_s']} | 1.00x | - | "
                         f"{hf['wall_s']} | {hf['warmup_s']} | - | - |")
        lines.append("")
    warm = {r["variant"]: r for r in ROWS if r.get("part") == "engine-warm"}
    if warm:
        lines += ["## The warmed engine (`--warm`): as many other requests (seed + 1) after the pass above", "",
                  "| system | output tok/s | vs bf16 engine (warm) | wall s | mixed captures | recompiles |",
                  "|---|---|---|---|---|---|"]
        for v, r in warm.items():
            base = (warm.get(bf16_twin(v)) or {}).get("tok_per_s")
            vs_b = f"{r['tok_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| engine {v} | {r['tok_per_s']} | {vs_b} | {r['wall_s']} | {r['mixed_captures']} | "
                         f"{r['recompiles']} |")
        lines.append("")
    dec = [r for r in ROWS if r.get("part") == "decode" and "tok_per_s" in r]
    if dec:
        lines += ["## Engine decode tokens/s (decode-only steps, wall clock, prompt 32, --decode-tokens new tokens)", "",
                  "| variant | batch | tok/s | vs bf16 engine (same mode) | ms/step | step ms median / max (at step) "
                  "| GC pauses in window (ms, max) | host ms/step (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            name, late = (r["variant"][:-len(" overlap")], " overlap") if r["variant"].endswith(" overlap") else (r["variant"], "")
            _, overlap, attention = split_variant(name)
            base = "bf16" + ("+overlap" if overlap else "") + ("+tattn" if attention == "triton" else "") + late
            b = next((x["tok_per_s"] for x in dec if x["variant"] == base and x["batch"] == r["batch"]), None)
            lines.append(f"| {r['variant']} | {r['batch']} | {r['tok_per_s']} | {ratio(r['tok_per_s'], b)} | "
                         f"{r['ms_per_step']} | {r.get('step_ms_median', '-')} / {r.get('step_ms_max', '-')} "
                         f"({r.get('slowest_step', '-')}) | {r.get('gc_pauses', '-')} ({r.get('gc_ms_max', '-')}) | "
                         f"{r['host_ms_per_step']} |")
        lines.append("")
    gen = [r for r in ROWS if r.get("part") == "hfgen" and "tok_per_s" in r]
    gchk = [r for r in ROWS if r.get("part") == "hfgen-check"]
    if gen or gchk:
        lines += ["## HF generate() after optimize(mode=\"reduce-overhead\")", ""]
        if gchk:
            lines += ["| spear-ref-16m | batch | greedy == eager | rerun == eager | first mismatch [new token, eager's "
                      "logit gap] per row | cudagraph skips |", "|---|---|---|---|---|---|"]
            lines += [f"| W4{' + ECs' if r['ecs'] else ''} | {r['batch']} | {r['identical']} | {r['identical_rerun']} | "
                      f"{r.get('first_mismatch_gaps') or '-'} | {r['cudagraph_skips']} |" for r in gchk]
            lines.append("")
        if gen:
            lines += ["| 1B variant | batch | tok/s | vs bf16 HF compiled generate | cudagraph skips |", "|---|---|---|---|---|"]
            for r in gen:
                b = next((x["tok_per_s"] for x in gen if x["variant"] == "bf16" and x["batch"] == r["batch"]), None)
                lines.append(f"| {r['variant']} | {r['batch']} | {r['tok_per_s']} | {ratio(r['tok_per_s'], b)} | "
                             f"{r['cudagraph_skips']} |")
            lines.append("")
    errs = [r for r in ROWS if "error" in r]
    if errs:
        lines += ["## Errors", ""] + [f"- {r['part']} {r.get('variant', '')}: {r['error']}" for r in errs] + [""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="check,hfcheck,engine,hf,hfgen")
    ap.add_argument("--variants", default="bf16,w4+ec,w4,w4+ec+lmhead",
                    help=f"engine variants, in order (a variant starting past --deadline is skipped): {', '.join(VARIANTS)}; "
                         "+overlap: the 256 requests with overlapped steps; +tattn (last): the paged Triton decode "
                         "attention (EngineConfig.decode_attention='triton')")
    ap.add_argument("--hfgen-variants", default="bf16,w4,w4+ec")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capture-first", action=argparse.BooleanOptionalAction, default=True,
                    help="EngineConfig.mixed_capture_first (default on): a new mixed-step shape of token count and "
                         "logits rows already run eagerly is captured without an eager run first")
    ap.add_argument("--shape-cache", action="store_true",
                    help="EngineConfig.mixed_shape_cache (off by default here: a fresh engine, as the bar measures); "
                         "on, a variant whose engine ran before on this machine starts with its mixed-step shapes "
                         "captured")
    ap.add_argument("--warm", action="store_true", help="the engine part then serves as many other requests (seed + "
                    "1) on the warmed engine (engine-warm rows: a server's steady state; mixed-step graphs are "
                    "captured at each step shape's first step, which the first pass pays)")
    ap.add_argument("--profile", action="store_true", help="engine part: also profile a pass (bench.throughput."
                    "profile_passes: host and device top lists; printed only)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-tokens", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens timed per decode-rate run")
    ap.add_argument("--decode-only", action="store_true",
                    help="engine part: only the batch-1 / batch-16 decode rates (an engine of 2 decode buckets and "
                         "1 token bucket: a few minutes' start-up per variant, not the 256 requests)")
    ap.add_argument("--check-dtypes", default="", help="the check part's dtypes, e.g. 'bfloat16' (default: "
                                                        "float32 and the device's dtype on CUDA)")
    ap.add_argument("--deadline", type=float, default=1e9, help="skip parts starting after this many seconds")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model in place of the 1B shape (smoke test)")
    ap.add_argument("--json", action="store_true", help="print all rows as one JSON list last")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows_file = os.path.join(args.out, "serving_throughput.rows.jsonl")
    open(rows_file, "w").close()
    DEV.update(device=args.device, tiny=args.tiny, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
               rows_file=rows_file)
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers
    import triton
    env = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu" + (" (tiny smoke)" if args.tiny else ""), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, command="python " + " ".join(sys.argv),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    row(part="env", **env)
    parts = {"check": part_check, "hfcheck": part_hfcheck, "engine": part_engine, "hf": part_hf, "hfgen": part_hfgen}
    START[0] = start = time.perf_counter()
    for name in args.parts.split(","):
        if time.perf_counter() - start > args.deadline:
            row(part=name, error=f"skipped: past --deadline {args.deadline}s")
            continue
        try:
            parts[name](args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row(part=name, error=f"{type(e).__name__}: {str(e)[:400]}")
    md = markdown(env)
    with open(os.path.join(args.out, "serving_throughput.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "serving_throughput.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    print(md)
    if args.json:
        print(json.dumps(ROWS))


if __name__ == "__main__":
    main()
