"""Serving benchmark: scheduling policies on the real engine under seeded open-loop traces.

Each run releases a synthesized trace (Poisson arrivals at a rate, or gamma arrivals with burstiness < 1; prompt and
output lengths long-tailed like ShareGPT's, lognormal, clipped to the context) by wall clock into the in-process
engine and steps it for real (no simulated clock). Metrics follow ``vllm bench serve``: TTFT, TPOT (per request:
(last token - first token) / (outputs - 1)), ITL (every inter-token gap), E2EL, request goodput (requests meeting
both SLOs per second, DistServe's definition) and SLO attainment; plus the capacity under the SLO (highest rate at
which p99 TTFT and the p99 inter-token latency stay inside their SLOs, found by geometric bisection over the rate;
the per-token criterion is Sarathi-Serve's P99 TBT, which is what a per-step scheduler controls; the capacity by
vLLM's per-request p99 TPOT is reported from the same probes), predicted-vs-measured step time error and the
scheduler's time per step.

Policies: ``fifo`` (whole prompts), ``budget-512`` / ``budget-2048`` (Sarathi-style fixed token budget),
``slo-ec-blind`` (SLO-aware, cost model without the EC terms), ``slo`` (SLO- and EC-aware); the bf16 engine with
``slo`` is the unquantized baseline. Sections (``--sections``): ``capacity``, ``stability`` (the EC set varies: no
ECs, the default set, switched while serving, the large set), ``burst``, ``bf16``, ``sched`` (scheduler
micro-benchmark at 64 running). A time budget (``--time-budget``) skips the sections it cannot afford (reported).

  python -m bench.serving --device cuda --json out.json --plots DIR          # Llama-3.2-1B shape, random weights
  python -m bench.serving --device cpu --model spear_compile/assets/spear-ref-16m --smoke   # CPU smoke
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import random
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# run as a script: bench/ off the path (bench/kernels.py would shadow the `kernels` package transformers may import);
# or run as `python -m bench.serving` from the repo root
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from bench.scheduler_time import time_schedule  # noqa: E402
from bench.stats import pct  # noqa: E402
from spear_compile.ec.module import CompensatedLinear  # noqa: E402
from spear_compile.serving.config import EngineConfig  # noqa: E402
from spear_compile.serving.engine import Engine  # noqa: E402
from spear_compile.serving.request import Request, SamplingParams  # noqa: E402
from spear_compile.serving.scheduler import make_policy  # noqa: E402
from spear_compile.serving.scheduler.ec_signature import ec_signature  # noqa: E402
from spear_compile.serving.scheduler.profile import cost_models_for, profile_engine, template_for  # noqa: E402

POLICIES = ("fifo", "budget-512", "budget-2048", "slo-ec-blind", "slo")
LOG = []
ERRORS = []


def log(msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    LOG.append(line)
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- model
def llama1b_shape(device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=4096, head_dim=64)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def attach_ecs_by_bytes(model, fraction, rank, seed, scale=0.02):
    """Random gated rank-``rank`` ECs on randomly ordered linears (LM head excluded) until their bytes reach
    ``fraction`` of the quantized model's bytes (``spear_compile.memory.model_bytes``, SPEAR's budget unit)."""
    from spear_compile.quant.memory import model_bytes
    budget = fraction * model_bytes(model)["total"]
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    rng.shuffle(names)
    used, chosen = 0, []
    for name in names:
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        lin = getattr(par, attr)
        r = min(rank, lin.in_features, lin.out_features)
        ec = CompensatedLinear.wrap(lin, r, gate="sigmoid")
        if used + ec.ec_bytes() > budget and chosen:
            break
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype)
        setattr(par, attr, ec)
        used += ec.ec_bytes()
        chosen.append(name)
    total = model_bytes(model)["total"]
    return {"num_ecs": len(chosen), "ec_bytes": used, "model_bytes": total, "fraction": used / total}


def build_engine(args, kind, ec_fraction=0.0):
    """kind: 'w4' (W4 per-channel RTN, LM head bf16, + ECs on ``ec_fraction`` of the bytes) or 'bf16'."""
    import spear_compile
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    if args.model == "llama-1b-shape":
        model = llama1b_shape(dev)
    else:
        model = load_model(args.model, dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    ec_info = None
    if kind == "w4":
        spear_compile.quantize(model, "w4-pc-rtn", skip=("lm_head",), progress=False)
        if ec_fraction > 0:
            ec_info = attach_ecs_by_bytes(model, ec_fraction, args.ec_rank, seed=2)
    from transformers import AutoTokenizer
    tok_path = args.model if os.path.isdir(args.model) else args.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    cfg = EngineConfig(device=args.device, dtype=model.model.embed_tokens.weight.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_tokens=args.max_num_tokens, max_model_len=args.max_model_len, detokenize=False,
                       compile=args.compile, cuda_graphs=args.compile and dev.type == "cuda", progress=False,
                       cpu_num_blocks=args.cpu_num_blocks, step_log_size=100000, block_size=args.block_size,
                       ec_switch=True,  # the EC-aware vs EC-blind comparison and the EC on/off switching
                       compile_regions=args.compile_regions, decode_attention=args.decode_attention,
                       mixed_graph_padding=args.mixed_graph_padding,
                       mixed_graph_bucket_padding=args.mixed_graph_bucket_padding,
                       overlap_decode=args.overlap,
                       # off unless asked: the engines of later policies would start with the earlier ones' shapes
                       mixed_shape_cache=args.shape_cache)
    engine = Engine(model, tokenizer, cfg, model_name=f"{kind}")
    setup_s = time.perf_counter() - t0
    log(f"engine {kind} ec={ec_fraction}: setup {setup_s:.1f}s (warm-up {engine.runner.warmup_s:.1f}s: "
        f"{ {k: round(v, 1) for k, v in engine.runner.warmup_breakdown.items()} }), "
        f"ECs {ec_info}, signature {ec_signature(engine.model)}")
    t1 = time.perf_counter()
    samples = profile_engine(engine, repeats=args.profile_repeats, max_points=args.profile_points)
    aware, blind = cost_models_for(engine, samples=samples)
    prof_s = time.perf_counter() - t1
    log(f"  profile {len(samples)} samples in {prof_s:.1f}s; fit error per bin {aware.fit_error}")
    return {"engine": engine, "kind": kind, "ec_info": ec_info, "aware": aware, "blind": blind, "samples": samples,
            "setup_s": setup_s, "warmup_s": engine.runner.warmup_s, "warmup_breakdown": engine.runner.warmup_breakdown,
            "profile_s": prof_s}


def safe_build(args, kind, ec_fraction=0.0):
    try:
        return build_engine(args, kind, ec_fraction)
    except Exception as e:  # noqa: BLE001  (an optional engine failing keeps the rest of the results)
        import traceback
        log(f"engine {kind} ec={ec_fraction} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        ERRORS.append(f"engine {kind} ec={ec_fraction}: {type(e).__name__}: {e}")
        gc.collect()
        return None


def free_engine(bundle):
    bundle.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- traces
def make_trace(rate, duration_s, seed, max_prompt, max_output, vocab, burstiness=1.0, prompt_median=256,
               prompt_sigma=1.0, output_median=96, output_sigma=0.8):
    """Arrivals over ``duration_s``: gamma inter-arrival times with shape ``burstiness`` and mean 1/rate (1.0 =
    Poisson, as vLLM's ``--burstiness``); lognormal prompt / output lengths (ShareGPT-like long tails), clipped."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        if t > duration_s:
            break
        p = int(min(max_prompt, max(4, rng.lognormvariate(math.log(prompt_median), prompt_sigma))))
        o = int(min(max_output, max(2, rng.lognormvariate(math.log(output_median), output_sigma))))
        ids = [rng.randrange(3, vocab) for _ in range(p)]
        out.append((t, ids, o))
    return out


def add_length_args(ap):
    """The trace's prompt / output length options (``make_trace``), shared with ``bench/serving_http.py``."""
    ap.add_argument("--max-prompt", type=int, default=1536)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--prompt-median", type=int, default=256)
    ap.add_argument("--output-median", type=int, default=96)


# ----------------------------------------------------------------------------------------------- one run
def run_trace(bundle, policy_name, trace, args, ec_enabled=True, switch_period_s=None, label=None):
    """Release ``trace`` by wall clock into the engine under ``policy_name``; step until done or the drain cap.
    Returns the run's metrics (and raw per-request times for the plots)."""
    engine = bundle["engine"]
    ttft_slo, tpot_slo = args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3
    kwargs = {}
    if policy_name.startswith("slo"):
        kwargs = dict(cost_model=copy.deepcopy(bundle["aware"]), blind_cost_model=copy.deepcopy(bundle["blind"]),
                      ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo)
        if args.slo_safety is not None:
            kwargs["safety"] = args.slo_safety
    engine.set_policy(policy_name, **kwargs)
    policy = engine.policy
    if engine.runner.net.has_ecs:
        engine.set_ec_enabled(ec_enabled)
    sched = engine.scheduler
    sched_times = []
    slot_bound = [0]  # steps planned with every sequence slot taken and requests still waiting
    orig = sched.schedule

    def timed(sig=()):
        n = len(sched.running)
        t = time.perf_counter()
        plan = orig(sig)
        sched_times.append((n, time.perf_counter() - t))
        slot_bound[0] += sched.slots_full
        return plan

    sched.schedule = timed
    log_start = len(engine.step_log)
    steps_before, padded_before = engine.num_steps, engine.runner.mixed.padded_replays
    recompiles_before = engine.runner.recompiles
    overlapped_before = engine.overlap.num_launched if engine.overlap is not None else 0
    clock = sched.clock
    t0 = clock()
    times = {}    # rid -> list of token times
    meta = {}     # rid -> (arrival, prompt len, output len)
    i, n = 0, len(trace)
    end_arrivals = trace[-1][0] if trace else 0.0
    cap = end_arrivals + args.drain_s
    last_switch = t0
    capture_windows = []   # (start, end) of the steps that captured a graph: a one-off per shape, not the policy's
    try:
        while True:
            now = clock()
            rel = now - t0
            while i < n and trace[i][0] <= rel:
                arr, ids, o = trace[i]
                rid = f"{label or policy_name}-{i}"
                engine.add_request(ids, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True), request_id=rid,
                                   ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo, arrival_time=t0 + arr)
                meta[rid] = (t0 + arr, len(ids), o)
                times[rid] = []
                i += 1
            if switch_period_s and now - last_switch >= switch_period_s:
                engine.set_ec_enabled(not engine.ec_enabled)
                last_switch = now
            if rel > cap:
                break
            if engine.has_unfinished():
                captures, t_step = engine.runner.capture.captures, clock()
                outs = engine.step()
                t = clock()
                if engine.runner.capture.captures != captures:   # this step captured a CUDA graph (once per shape)
                    capture_windows.append((t_step, t))
                for out in outs:
                    if out.request_id in times:
                        times[out.request_id].extend([t] * len(out.new_token_ids))
            elif i >= n:
                break
            else:
                time.sleep(min(0.002, max(0.0, trace[i][0] - (clock() - t0))))
        unfinished = [rid for rid in times if len(times[rid]) < meta[rid][2]]
        for rid in unfinished:
            engine.abort_request(rid)
        while engine.has_unfinished():
            engine.step()
    finally:
        sched.schedule = orig
        if engine.runner.net.has_ecs:
            engine.set_ec_enabled(True)
    records = list(engine.step_log)[log_start:]
    m = metrics(times, meta, ttft_slo, tpot_slo, t0, capture_windows)
    predicted = [(abs(r.predicted_s - r.measured_s) / r.measured_s * 100, r.captured_graph, r.num_prefill_tokens > 0)
                 for r in records if r.predicted_s is not None and r.measured_s > 0]
    errs = [e for e, _, _ in predicted]
    # the same without the steps that captured a mixed-step CUDA graph (once per shape key: a one-off, which the
    # SLO policy keeps out of its online correction); both are reported, and the replayed ones per step kind
    errs_replayed = [e for e, captured, _ in predicted if not captured]
    errs_mixed = [e for e, captured, mixed in predicted if mixed and not captured]
    errs_decode = [e for e, _, mixed in predicted if not mixed]
    st = [dt for _, dt in sched_times]
    st64 = [dt for k, dt in sched_times if k >= 48]
    m.update(policy=policy_name, label=label or policy_name, num_steps=engine.num_steps - steps_before,
             unfinished=len(unfinished), recompiles=engine.runner.recompiles - recompiles_before,
             overlapped_steps=(engine.overlap.num_launched - overlapped_before) if engine.overlap is not None else 0,
             step_err_p50_pct=pct(errs, 50), step_err_p90_pct=pct(errs, 90), num_predicted_steps=len(errs),
             step_err_p90_pct_no_capture=pct(errs_replayed, 90), step_err_p90_pct_decode=pct(errs_decode, 90),
             step_err_p90_pct_mixed=pct(errs_mixed, 90), num_mixed_steps=len(errs_mixed),
             capture_steps=sum(r.captured_graph for r in records),
             uncaptured_mixed_steps=sum(r.uncaptured_mixed for r in records),
             padded_mixed_steps=engine.runner.mixed.padded_replays - padded_before,
             mixed_graphs=len(engine.runner.mixed.graphs),
             graph_capture_mib=round(engine.runner.capture.capture_bytes / 2 ** 20, 1),
             graph_captures=engine.runner.capture.captures,
             sched_ms_p50=_ms(pct(st, 50)), sched_ms_p99=_ms(pct(st, 99)), sched_ms_p50_at_48plus=_ms(pct(st64, 50)),
             max_running=max((k for k, _ in sched_times), default=0),
             slot_bound_pct=round(100.0 * slot_bound[0] / len(sched_times), 1) if sched_times else None,
             ec_switches=bool(switch_period_s), ec_enabled=ec_enabled,
             step_time_ms_p50=_ms(pct([r.measured_s for r in records], 50)),
             overhead_ms=_ms(getattr(policy, "overhead_s", None)), safety=getattr(policy, "safety_now", None))
    m["_raw"] = {"ttft": m.pop("_ttft"), "itl": m.pop("_itl"),
                 "steps": [[r.num_decodes, r.num_prefills, r.num_prefill_tokens, r.sum_context, r.prefill_context,
                            r.mixed_dims, r.ec_enabled, r.captured_graph, r.uncaptured_mixed, r.predicted_s,
                            r.measured_s] for r in records]}
    log(f"  {m['label']:>14} rate {m.get('rate', 0):6.2f} req/s: {m['completed']}/{m['num_requests']} done, "
        f"TTFT p99 {m['ttft_ms_p99']} ms, ITL p99 {m['itl_ms_p99']} ms, TPOT p99 {m['tpot_ms_p99']} ms, goodput "
        f"{m['goodput_rps']:.2f} req/s, tput {m['output_tok_s']:.0f} tok/s, step err p90 {m['step_err_p90_pct']}%, "
        f"sched p50 {m['sched_ms_p50']} ms, recompiles {m['recompiles']}")
    return m


def _pct1(x):
    return "-" if x is None else f"{x:.1f}%"


def _ms(x):
    return None if x is None else round(x * 1e3, 3)


def metrics(times, meta, ttft_slo, tpot_slo, t0, capture_windows=()):
    """Latency metrics of one run. ``itl_ms_p99_no_capture`` leaves out the inter-token gaps that span a step which
    captured a CUDA graph (``capture_windows``: a shape's first occurrence, a one-off start-up cost however the
    policy schedules, which a few seconds' probe would otherwise charge to whichever policy met the shape first)."""
    ttft, tpot, itl, e2el = [], [], [], []
    itl_no_capture = []
    good = completed = 0
    finish = t0
    tokens = 0
    within_tokens = 0
    for rid, ts in times.items():
        arr, _, o = meta[rid]
        tokens += len(ts)
        if ts:
            ttft.append(ts[0] - arr)
            gaps = [b - a for a, b in zip(ts, ts[1:])]
            itl.extend(gaps)
            itl_no_capture.extend(b - a for a, b in zip(ts, ts[1:])
                                  if not any(a < we and b > ws for ws, we in capture_windows))
            within_tokens += sum(g <= tpot_slo for g in gaps)
            finish = max(finish, ts[-1])
        else:
            ttft.append(math.inf)
        if len(ts) >= o:
            completed += 1
            e2el.append(ts[-1] - arr)
            tp = (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else 0.0
            tpot.append(tp)
            if ts[0] - arr <= ttft_slo and tp <= tpot_slo:
                good += 1
        elif len(ts) > 1:  # cut off by the window: its TPOT so far (its TTFT and gaps are real)
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
    span = max(finish - t0, 1e-9)
    nreq = len(times)
    return {
        "num_requests": nreq, "completed": completed, "duration_s": round(span, 3),
        "ttft_ms_p50": _ms(pct(ttft, 50)), "ttft_ms_p99": _ms(pct(ttft, 99)),
        "tpot_ms_p50": _ms(pct(tpot, 50)), "tpot_ms_p99": _ms(pct(tpot, 99)),
        "itl_ms_p50": _ms(pct(itl, 50)), "itl_ms_p99": _ms(pct(itl, 99)),
        "itl_ms_p99_no_capture": _ms(pct(itl_no_capture, 99)), "capture_stall_s": sum(we - ws for ws, we in
                                                                                      capture_windows),
        "e2el_ms_p50": _ms(pct(e2el, 50)), "e2el_ms_p99": _ms(pct(e2el, 99)),
        "goodput_rps": good / span, "throughput_rps": completed / span, "output_tok_s": tokens / span,
        "slo_attainment": good / max(nreq, 1), "itl_within_slo": within_tokens / max(len(itl), 1),
        "itl_violations": len(itl) - within_tokens, "num_itl": len(itl), "output_tokens": tokens,
        "_ttft": ttft, "_itl": itl,
    }


def passes(m, args, exclude_captures=None):
    """Capacity criterion: p99 TTFT and p99 inter-token latency within their SLOs. A request never started by the
    end of the window counts as an infinite TTFT (it waited longer than the drain, itself longer than the TTFT SLO);
    one cut off mid-output keeps its measured latencies. ``exclude_captures`` (default: ``--capacity-criterion``)
    judges the inter-token latency without the gaps that span a graph-capturing step."""
    if exclude_captures is None:
        exclude_captures = getattr(args, "capacity_criterion", "itl") == "itl-no-capture"
    itl = m.get("itl_ms_p99_no_capture") if exclude_captures else m["itl_ms_p99"]
    return (m["ttft_ms_p99"] is not None and m["ttft_ms_p99"] <= args.ttft_slo_ms
            and itl is not None and itl <= args.tpot_slo_ms)


def passes_tpot(m, args):
    """The same with vLLM's per-request p99 TPOT instead of the per-token latency."""
    return (m["ttft_ms_p99"] is not None and m["ttft_ms_p99"] <= args.ttft_slo_ms
            and m["tpot_ms_p99"] is not None and m["tpot_ms_p99"] <= args.tpot_slo_ms)


# ----------------------------------------------------------------------------------------------- sections
class Clock:
    def __init__(self, budget_s):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    @property
    def left(self):
        return self.budget_s - (time.perf_counter() - self.t0)


def warm_up_shapes(bundle, policies, rate, args, clock, ec_states=(True,)):
    """Unmeasured runs of a trace (its own seed) per policy before the measured ones: a mixed step's first occurrence
    of a shape runs uncaptured and captures its CUDA graph (tens of ms, once per shape while serving), which in a few
    seconds' probe would count against whichever policy met the shape first. Run k is at ``warmup_rate(rate, k)``
    (the start rate, then twice it, half of it, four times it, ...): the capacity search probes up or down from the
    start rate, and another number of requests running meets other shapes (decode rows, block-table widths). Each
    EC state in ``ec_states`` has its own graphs (the stability runs serve with the ECs off too).
    Returns the mixed graphs before/after and the rates."""
    mixed = bundle["engine"].runner.mixed
    before, t0 = len(mixed.graphs), time.perf_counter()
    runs = [(k, policy, ec) for k in range(args.warmup_runs) for ec in ec_states for policy in policies]
    for k, policy, ec in runs:
        if clock.left < run_cost(args) * (1 + len(policies)):
            log("  warm-up cut short (time)")
            break
        probe(bundle, policy, warmup_rate(rate, k), args, seed=500 + k, label=f"warm-up {policy}", ec_enabled=ec)
    out = {"mixed_graphs_before": before, "mixed_graphs_after": len(mixed.graphs),
           "seconds": round(time.perf_counter() - t0, 1), "ec_states": list(ec_states),
           "rates": [round(warmup_rate(rate, k), 2) for k in range(args.warmup_runs)]}
    log(f"warm-up runs: mixed-step graphs {before} -> {len(mixed.graphs)} in {out['seconds']} s")
    return out


def warmup_rate(rate, k):
    """The rate of warm-up run k: ``rate``, ``2 rate``, ``rate / 2``, ``4 rate``, ``rate / 4``, ..."""
    step = (k + 1) // 2
    return rate * 2.0 ** (step if k % 2 else -step)


def run_cost(args):
    return args.duration + args.drain_s * 0.6 + 1.0


def probe(bundle, policy, rate, args, seed, label=None, burstiness=1.0, **kw):
    """One run; a run that raises is logged, its requests aborted, and reported as None (the benchmark goes on)."""
    engine = bundle["engine"]
    trace = make_trace(rate, args.duration, seed, args.max_prompt, args.max_output, engine.vocab_size, burstiness,
                       args.prompt_median, output_median=args.output_median)
    try:
        m = run_trace(bundle, policy, trace, args, label=label, **kw)
    except Exception as e:  # noqa: BLE001
        import traceback
        log(f"  run {label or policy} at {rate:.2f} req/s FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        ERRORS.append(f"{label or policy} @ {rate:.2f}: {type(e).__name__}: {e}")
        for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort_request(r.request_id)
        for _ in range(100):
            if not engine.has_unfinished():
                break
            engine.step()
        return None
    m.update(rate=rate, burstiness=burstiness, seed=seed)
    return m


def capacity_search(bundles_policies, r0, args, clock, results):
    """Geometric bisection over the rate for each (bundle, policy, label), round-robin so that every policy has had
    the same number of probes when time runs out: r0, then x2 or /2 until bracketed, then geometric midpoints.
    Returns {label: {"capacity_rps": highest passing rate or None, "first_failing_rps": lowest failing or None}}."""
    state = {label: {"lo": None, "hi": None, "rate": r0} for _, _, label in bundles_policies}
    for k in range(args.probes):
        for bundle, policy, label in bundles_policies:
            st = state[label]
            if clock.left < run_cost(args):
                results["skipped"].append(f"capacity probe {k + 1} of {label} (time)")
                continue
            m = probe(bundle, policy, st["rate"], args, seed=1000 + k, label=label)
            if m is not None:
                m["capacity_probe"] = True
                m["probe_index"] = k
                results["runs"].append(m)
                checkpoint(results, args)
            if m is not None and passes(m, args):
                st["lo"] = st["rate"] if st["lo"] is None else max(st["lo"], st["rate"])
            else:
                st["hi"] = st["rate"] if st["hi"] is None else min(st["hi"], st["rate"])
            if st["lo"] is None:
                st["rate"] = st["hi"] / 2
            elif st["hi"] is None:
                st["rate"] = st["lo"] * 2
            else:
                st["rate"] = math.sqrt(st["lo"] * st["hi"])
    out = {}
    for label, st in state.items():
        out[label] = {"capacity_rps": st["lo"], "first_failing_rps": st["hi"]}
        log(f"capacity {label}: passes at {st['lo']}, fails at {st['hi']}")
    return out


def checkpoint(results, args):
    """Write what we have so far (a run cut short by the device limit keeps its finished parts)."""
    if not args.json:
        return
    snap = dict(results, runs=[{k: v for k, v in m.items() if k != "_raw"} for m in results["runs"]], log=LOG)
    with open(args.json + ".partial", "w") as f:
        json.dump(snap, f, indent=1, default=str)


def estimate_rate(bundle, args):
    """A starting rate near the engine's service capacity, from the fitted cost model: a prompt's prefill at the
    largest bucket's per-token time plus its outputs at the per-token time of a 64-wide decode step."""
    cm = bundle["aware"]
    sig = ec_signature(bundle["engine"].model)
    n = max(cm.token_buckets)
    prefill_tok = cm.predict(0, n, 0, sig, n) / n
    b = max(cm.decode_buckets)
    ctx = args.prompt_median + args.output_median
    dec_tok = cm.predict(b, 0, cm.context_feature(b, b * ctx, 4 * ctx, False), sig) / b
    mean_prompt = args.prompt_median * math.exp(0.5)
    mean_out = args.output_median * math.exp(0.32)
    return 0.5 / (mean_prompt * prefill_tok + mean_out * dec_tok)


def sched_microbench(bundle, args, n_running=64, n_waiting=32, steps=2000):
    """``bench/scheduler_time.time_schedule`` with this run's fitted EC-aware cost model and the engine's EC set."""
    out = time_schedule(bundle["aware"], ec_signature(bundle["engine"].model), args.ttft_slo_ms / 1e3,
                        args.tpot_slo_ms / 1e3, n_running, n_waiting, steps)
    log(f"  scheduler micro-benchmark at {n_running} running: {out}")
    return out


# ----------------------------------------------------------------------------------------------- plots
def plots(results, args, bundles_samples):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.plots, exist_ok=True)
    files = []
    runs = results["runs"]
    # 1. latency CDFs per policy at the common rate
    common = [m for m in runs if m.get("common_rate")]
    if common:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m in common:
            for ax, key in zip(axes, ("ttft", "itl")):
                xs = sorted(x * 1e3 for x in m["_raw"][key] if math.isfinite(x))
                if xs:
                    ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=m["label"])
        for ax, key, slo in zip(axes, ("TTFT", "inter-token latency"), (args.ttft_slo_ms, args.tpot_slo_ms)):
            ax.axvline(slo, color="k", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(f"{key} (ms)")
            ax.set_ylabel("CDF")
            ax.legend(fontsize=7)
        fig.suptitle(f"latency CDFs at {common[0]['rate']:.2f} req/s")
        fig.tight_layout()
        files.append(os.path.join(args.plots, "serving_latency_cdf.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # 2. goodput and p99 ITL vs rate
    probes = [m for m in runs if m.get("capacity_probe")]
    if probes:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label in sorted({m["label"] for m in probes}):
            ms = sorted((m for m in probes if m["label"] == label), key=lambda m: m["rate"])
            axes[0].plot([m["rate"] for m in ms], [m["goodput_rps"] for m in ms], "o-", label=label)
            axes[1].plot([m["rate"] for m in ms], [m["itl_ms_p99"] for m in ms], "o-", label=label)
        axes[0].set_ylabel("goodput (req/s meeting both SLOs)")
        axes[1].set_ylabel("p99 inter-token latency (ms)")
        axes[1].axhline(args.tpot_slo_ms, color="k", ls="--", lw=0.8)
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("request rate (req/s)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(args.plots, "serving_goodput_vs_rate.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # 3. step time vs tokens with the fitted model
    if bundles_samples:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (samples, model) in bundles_samples.items():
            for sig in sorted({s.signature for s in samples}, key=lambda s: s.total_rank):
                pts = [s for s in samples if s.signature == sig]
                tag = f"{name} ECs {'off' if sig.is_empty else 'on'}"
                sc = ax.scatter([s.shape.num_tokens for s in pts], [s.seconds * 1e3 for s in pts], s=8, alpha=0.5,
                                label=f"{tag} measured")
                pred = sorted((s.shape.num_tokens, model.predict_shape(s.shape, s.signature) * 1e3) for s in pts)
                ax.plot([p[0] for p in pred], [p[1] for p in pred], ".", ms=3, color=sc.get_facecolor()[0],
                        alpha=0.9, label=f"{tag} fitted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens in the step (padded to the graph bucket)")
        ax.set_ylabel("step time (ms)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        files.append(os.path.join(args.plots, "serving_step_cost.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="llama-1b-shape", help="'llama-1b-shape' (random weights) or an HF model dir")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "spear_compile", "assets",
                                                         "spear-ref-16m"))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rates", default="auto", help="starting rate for the capacity search ('auto': from the cost "
                                                      "model) or a comma list of fixed rates (no search)")
    ap.add_argument("--sections", default="sched,capacity,stability,burst,bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write a markdown report here")
    ap.add_argument("--plots", default=None)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--slo-safety", type=float, default=None, help="SloAware's safety: the least factor on a step's "
                    "predicted time before it must fit the slack (default: the policy's own)")
    ap.add_argument("--tpot-slo-ms", default="auto", help="ms, or 'auto': 5x the profiled decode-only step at "
                                                          "32 running (Sarathi-Serve's strict SLO)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals per run")
    ap.add_argument("--drain-s", type=float, default=4.0, help="seconds after the last arrival before aborting")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--capacity-criterion", choices=("itl", "itl-no-capture"), default="itl",
                    help="the capacity search's per-token criterion: p99 of every inter-token gap, or of those that do "
                         "not span a step which captured a CUDA graph (both are reported over the same probes)")
    ap.add_argument("--decode-attention", choices=("torch", "triton"), default="torch",
                    help="EngineConfig.decode_attention ('triton': one paged kernel, mixed steps' decode tables at the "
                         "largest width: about 30 %% fewer mixed-step graph keys in serving_sim)")
    ap.add_argument("--warmup-runs", type=int, default=1, help="unmeasured runs per policy before the measured ones "
                    "(mixed-step graphs captured at their shapes' first step), at the start rate, twice it, half of it, ...")
    ap.add_argument("--mixed-graph-padding", type=float, default=2.0, help="EngineConfig.mixed_graph_padding (0: "
                    "every new mixed-step shape captures its own graph, as before session 21)")
    ap.add_argument("--mixed-graph-bucket-padding", type=float, default=2.0,
                    help="EngineConfig.mixed_graph_bucket_padding (> 1: a covering graph may have up to this many "
                         "times the step's tokens and decode rows)")
    ap.add_argument("--shape-cache", action="store_true",
                    help="EngineConfig.mixed_shape_cache for every engine (off by default here: an engine would "
                         "start with the mixed-step shapes every engine before it captured)")
    ap.add_argument("--overlap", action="store_true",
                    help="EngineConfig.overlap_decode for every engine: each step is planned and launched while the "
                         "device runs the one before (the trace is greedy, so every step qualifies), so the "
                         "scheduler's host time hides under the device's")
    ap.add_argument("--time-budget", type=float, default=480.0)
    ap.add_argument("--ec-fraction", type=float, default=0.01)
    ap.add_argument("--ec-fraction-large", type=float, default=0.05)
    ap.add_argument("--ec-rank", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    add_length_args(ap)
    ap.add_argument("--profile-points", type=int, default=None)
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--cpu-num-blocks", type=int, default=512)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-regions", action="store_true",
                    help="EngineConfig.compile_regions: one decoder layer compiled per layer structure (shorter start-up)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU settings (bundled 16M model, short traces)")
    ap.add_argument("--replot", default=None, help="draw the plots (and --md) from a finished run's JSON (+ _raw.json)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args)
    if args.smoke:
        args.model = args.model if args.model != "llama-1b-shape" else args.tokenizer
        args.device, args.compile = "cpu", False
        args.max_num_seqs, args.max_num_tokens, args.max_model_len = 8, 128, 384
        args.max_prompt, args.max_output, args.prompt_median, args.output_median = 200, 12, 40, 6
        # the smoke checks that every request completes, not latency: a shared CI core can step slowly (CI saw a
        # 324 ms step), so the drain is long; a run ends as soon as its last request finishes
        args.duration, args.drain_s, args.probes = 3.0, 60.0, 1
        args.profile_points, args.profile_repeats = 12, 1
        args.sections, args.policies, args.rates = "sched,capacity", "fifo,slo", "1.0"
        args.ttft_slo_ms, args.tpot_slo_ms = 20000.0, "2000"
        args.warmup_runs = 0   # no CUDA graphs on CPU
    policies = [p for p in args.policies.split(",") if p]
    sections = set(args.sections.split(","))
    clock = Clock(args.time_budget)
    results = {"args": {k: v for k, v in vars(args).items()}, "runs": [], "skipped": [], "engines": {},
               "argv": sys.argv[1:] if argv is None else list(argv)}
    env = {"torch": torch.__version__, "device": args.device}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        import triton
        env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    results["env"] = env
    log(f"env {env}")
    samples_for_plot = {}

    w4 = build_engine(args, "w4", args.ec_fraction)
    results["engines"]["w4_ec"] = {k: w4[k] for k in ("ec_info", "setup_s", "warmup_s", "warmup_breakdown",
                                                                  "profile_s")}
    results["engines"]["w4_ec"]["fit_error"] = w4["aware"].fit_error
    results["engines"]["w4_ec"]["fit_error_blind"] = w4["blind"].fit_error
    samples_for_plot["W4"] = (w4["samples"], w4["aware"])
    if args.tpot_slo_ms == "auto":
        cm = w4["aware"]
        sig = ec_signature(w4["engine"].model)
        ctx = args.prompt_median + args.output_median
        dec32 = cm.predict_raw(32, 0, cm.context_feature(32, 32 * ctx, 4 * ctx, False), sig)
        # the cheapest mixed step (32 decodes + the smallest chunk): no policy that ever prefills beside running
        # decodes can keep its inter-token latency below it
        chunk = max(1, min(b for b in cm.token_buckets if b > 32) - 32) if any(b > 32 for b in cm.token_buckets) else 1
        mix32 = cm.predict_raw(32, chunk, cm.context_feature(32, 32 * ctx, 4 * ctx, True, chunk), sig)
        slo_s = max(5 * dec32, 2 * mix32)
        args.tpot_slo_ms = float(max(5, math.ceil(slo_s * 1e3 / 5) * 5))
        log(f"TPOT SLO auto: max(5 x decode step at 32 running ({dec32 * 1e3:.2f} ms), 2 x that step with a "
            f"{chunk}-token chunk ({mix32 * 1e3:.2f} ms)) -> {args.tpot_slo_ms} ms")
        results["slo_note"] = (f"The per-token SLO is 5x the profiled decode-only step at 32 running requests "
                               f"({dec32 * 1e3:.2f} ms on this GPU, ECs on), Sarathi-Serve's 'strict' SLO construction "
                               f"(a small multiple of an undisturbed decode iteration), and at least 2x the cheapest "
                               f"mixed step at 32 running ({mix32 * 1e3:.2f} ms, 32 decodes + a {chunk}-token chunk): "
                               f"a stall-free scheduler can hold it, one "
                               f"long prefill in a step cannot. TTFT {args.ttft_slo_ms:.0f} ms is an interactive "
                               f"chat target for prompts up to {args.max_prompt} tokens on a 1B model.")
    else:
        args.tpot_slo_ms = float(args.tpot_slo_ms)
    results["slo"] = {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms}

    if "sched" in sections:
        results["sched_microbench"] = sched_microbench(w4, args)

    caps = {}
    r0 = estimate_rate(w4, args) if args.rates == "auto" else float(args.rates.split(",")[0])
    r0 = float(r0)
    results["r0"] = r0
    log(f"start rate {r0:.2f} req/s")
    if args.warmup_runs and {"capacity", "stability", "burst"} & set(sections):
        ec_states = (True, False) if "stability" in sections else (True,)
        results["warmup"] = warm_up_shapes(w4, policies, r0, args, clock, ec_states)
    if "capacity" in sections:
        if args.rates != "auto":
            for p in policies:
                for k, rate in enumerate(float(x) for x in args.rates.split(",")):
                    if clock.left < run_cost(args):
                        results["skipped"].append(f"rates {p}@{rate}")
                        continue
                    m = probe(w4, p, rate, args, seed=1000 + k)
                    if m is None:
                        continue
                    m["capacity_probe"] = True
                    results["runs"].append(m)
                    checkpoint(results, args)
        else:
            # keep room for the stability runs: fewer probes (at least 2) rather than no stability section
            reserve = 7 * run_cost(args) if "stability" in sections else 0.0
            afford = int((clock.left - reserve) // (len(policies) * run_cost(args)))
            if afford < args.probes:
                log(f"time left {clock.left:.0f}s: {max(2, afford)} capacity probes per policy instead of {args.probes}")
                args.probes = max(2, afford)
            caps.update(capacity_search([(w4, p, p) for p in policies], r0, args, clock, results))
        for m in results["runs"]:
            if m.get("capacity_probe") and abs(m["rate"] - r0) < 1e-9:
                m["common_rate"] = True
        # vLLM-TPOT criterion over the same probes
        for p in policies:
            ok = [m["rate"] for m in results["runs"] if m.get("capacity_probe") and m["label"] == p
                  and passes_tpot(m, args)]
            caps.setdefault(p, {})["capacity_rps_by_p99_tpot"] = max(ok) if ok else None
            for key, excl in (("capacity_rps_with_captures", False), ("capacity_rps_no_capture", True)):
                ok = [m["rate"] for m in results["runs"] if m.get("capacity_probe") and m["label"] == p
                      and passes(m, args, exclude_captures=excl)]
                caps[p][key] = max(ok) if ok else None
        results["capacity"] = caps

    if "stability" in sections:
        rate = (caps.get("slo") or {}).get("capacity_rps") or r0
        frac = (w4["ec_info"] or {}).get("fraction", args.ec_fraction)
        conds = [("no ECs", dict(ec_enabled=False)), (f"{frac:.1%} ECs", {}),
                 (f"switched 0 / {frac:.1%} every 1 s", dict(switch_period_s=1.0))]
        stab = []
        for name, kw in conds:
            for p in ("slo", "budget-2048") + (("slo-ec-blind",) if "switched" in name else ()):
                if clock.left < run_cost(args):
                    results["skipped"].append(f"stability {name} {p}")
                    continue
                m = probe(w4, p, rate, args, seed=77, label=f"{p} [{name}]", **kw)
                if m is None:
                    continue
                m["stability"] = name
                stab.append(m)
                results["runs"].append(m)
                checkpoint(results, args)
        results["stability_rate"] = rate

    if "burst" in sections:
        rate = (caps.get("slo") or {}).get("capacity_rps") or r0
        for p in ("slo", "slo-ec-blind", "budget-512"):
            if clock.left < run_cost(args):
                results["skipped"].append(f"burst {p}")
                continue
            m = probe(w4, p, rate, args, seed=99, label=f"{p} [gamma 0.25]", burstiness=0.25)
            if m is None:
                continue
            m["burst"] = True
            results["runs"].append(m)
            checkpoint(results, args)
    free_engine(w4)

    large_cost = 60 + (4 + 3 * args.warmup_runs) * run_cost(args)
    if "stability" in sections and args.ec_fraction_large > 0:
        big = None
        if clock.left < large_cost:
            results["skipped"].append(f"stability {args.ec_fraction_large:.0%} ECs (time)")
        else:
            big = safe_build(args, "w4", args.ec_fraction_large)
        if big is not None:
            results["engines"]["w4_ec_large"] = {k: big[k] for k in ("ec_info", "setup_s", "warmup_s",
                                                                          "warmup_breakdown", "profile_s")}
            samples_for_plot["W4 large EC set"] = (big["samples"], big["aware"])
            rate = results.get("stability_rate") or r0
            if args.warmup_runs:
                results["warmup_large"] = warm_up_shapes(big, ("slo", "budget-2048", "slo-ec-blind"), rate, args, clock)
            frac = (big["ec_info"] or {}).get("fraction", args.ec_fraction_large)  # all linears at r=32: ~4.5% (1B)
            for p in ("slo", "budget-2048", "slo-ec-blind"):
                if clock.left < run_cost(args):
                    results["skipped"].append(f"stability large {p}")
                    continue
                m = probe(big, p, rate, args, seed=77, label=f"{p} [{frac:.1%} ECs]")
                if m is None:
                    continue
                m["stability"] = f"{frac:.1%} ECs"
                results["runs"].append(m)
                checkpoint(results, args)
            free_engine(big)

    if "bf16" in sections:
        bf = None
        if clock.left < 60 + 2 * run_cost(args):
            results["skipped"].append("bf16 engine (time)")
        else:
            bf = safe_build(args, "bf16")
        if bf is not None:
            results["engines"]["bf16"] = {k: bf[k] for k in ("setup_s", "warmup_s", "profile_s")}
            samples_for_plot["bf16"] = (bf["samples"], bf["aware"])
            r_bf = (caps.get("slo") or {}).get("capacity_rps") or r0
            caps.update(capacity_search([(bf, "slo", "bf16 slo")], r_bf, args, clock, results))
            free_engine(bf)

    results["log"] = LOG
    results["errors"] = ERRORS
    raw = {"runs": [{"label": m["label"], "rate": m["rate"], "common_rate": bool(m.get("common_rate")),
                     "ttft": m["_raw"]["ttft"], "itl": m["_raw"]["itl"]} for m in results["runs"] if m.get("common_rate")],
           # every run's steps, for the cost model's error by step shape (columns in "step_fields")
           "step_fields": ["num_decodes", "num_prefills", "num_prefill_tokens", "sum_context", "prefill_context",
                           "mixed_dims (tokens, decode_rows, decode_width, prefills, chunk_len, prefill_width, "
                           "logits_rows)", "ec_enabled", "captured_graph", "uncaptured_mixed", "predicted_s",
                           "measured_s"],
           "steps": [{"label": m["label"], "rate": m.get("rate"), "steps": m["_raw"]["steps"]} for m in results["runs"]],
           "samples": {name: {"samples": [x.to_json() for x in smp], "model": model.to_json()}
                       for name, (smp, model) in samples_for_plot.items()}}
    if args.json:
        with open(args.json.replace(".json", "") + "_raw.json", "w") as f:
            json.dump(raw, f, default=str)
    if args.plots:
        try:
            results["plots"] = plots(results, args, samples_for_plot)
        except Exception as e:  # noqa: BLE001  (a plot failure must not lose the numbers)
            log(f"plots failed: {type(e).__name__}: {e}")
    for m in results["runs"]:
        m.pop("_raw", None)
    results["elapsed_s"] = round(time.perf_counter() - clock.t0, 1)
    summary(results)
    if args.md:
        write_markdown(results, args.md, results["argv"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def _cap_ratio(caps, num, den):
    """(text, value or lower bound) of capacity(num) / capacity(den); a denominator that failed at every probe gives
    a lower bound (its capacity is below its lowest failing rate)."""
    a, b = caps.get(num) or {}, caps.get(den) or {}
    if not a.get("capacity_rps"):
        return "not measured (no passing probe for " + num + ")", None
    if b.get("capacity_rps"):
        r = a["capacity_rps"] / b["capacity_rps"]
        return f"{r:.2f}x", r
    if b.get("first_failing_rps"):
        r = a["capacity_rps"] / b["first_failing_rps"]
        return f"> {r:.2f}x ({den} failed at every probe, lowest {b['first_failing_rps']:.2f} req/s)", r
    return "not measured", None


def write_markdown(results, path, argv):
    a = results["args"]
    env = results["env"]
    slo = results["slo"]
    caps = results.get("capacity") or {}
    runs = results["runs"]
    L = []
    w = L.append
    w(f"# Serving benchmark: SLO- and EC-aware scheduling ({env.get('gpu', env['device'])}, "
      f"{time.strftime('%Y-%m-%d')})")
    w("")
    w(f"torch {env['torch']}, triton {env.get('triton', '-')}. Command: `python -m bench.serving {' '.join(argv)}` "
      f"({results['elapsed_s']} s in total).")
    w("")
    e = results["engines"].get("w4_ec", {})
    info = e.get("ec_info") or {}
    model = "Llama-3.2-1B shape (random weights)" if a["model"] == "llama-1b-shape" else f"`{a['model']}`"
    w(f"Model: {model}, W4 per-channel RTN (LM head bf16), gated r={a['ec_rank']} ECs on "
      f"{info.get('num_ecs', '?')} linears = {100 * info.get('fraction', 0):.2f}% of the model's bytes. Engine: "
      f"max_num_seqs {a['max_num_seqs']}, max_num_tokens {a['max_num_tokens']} (power-of-two token buckets), "
      f"max_model_len {a['max_model_len']}, block {a['block_size']}, compiled (`spear` backend"
      f"{', one decoder layer per layer structure' if a.get('compile_regions') else ''}) with CUDA graphs: "
      f"{a['compile']}; mixed-step graph padding {a.get('mixed_graph_padding', 0):g}, bucket padding "
      f"{a.get('mixed_graph_bucket_padding', 1):g} (a new shape a captured graph "
      f"covers replays it).")
    w("")
    w(f"Trace: {a['duration']} s of arrivals per run (Poisson at the rate; the burst runs gamma with burstiness 0.25), "
      f"prompt lengths lognormal (median {a['prompt_median']}, sigma 1.0, clipped to {a['max_prompt']}), outputs "
      f"lognormal (median {a['output_median']}, sigma 0.8, clipped to {a['max_output']}), ignore_eos, greedy; "
      f"requests still running {a['drain_s']} s after the last arrival are aborted (not started: infinite TTFT; "
      f"cut off mid-output: their measured latencies, not counted as good).")
    wu = results.get("warmup")
    if wu:
        w("")
        rates = ", ".join(f"{r:g}" for r in wu.get("rates", [])) or "the start rate"
        ecs = " with the ECs on and off" if False in wu.get("ec_states", [True]) else ""
        w(f"Before the measured runs, {a.get('warmup_runs', 1)} unmeasured run(s) per policy{ecs} (at {rates} req/s) "
          f"captured the mixed-step CUDA graphs of the shapes they met ({wu['mixed_graphs_before']} -> "
          f"{wu['mixed_graphs_after']} graphs, {wu['seconds']} s); shapes a measured run meets first still capture "
          f"there (counted under the cost model below).")
        wl = results.get("warmup_large")
        if wl:
            w(f"The large EC set's engine had its own warm-up runs ({wl['mixed_graphs_before']} -> "
              f"{wl['mixed_graphs_after']} graphs, {wl['seconds']} s).")
    unc = sum(m.get("uncaptured_mixed_steps") or 0 for m in runs)
    last = runs[-1] if runs else {}
    if last.get("graph_captures"):
        w("")
        w(f"CUDA graphs at the end: {last.get('mixed_graphs')} mixed-step graphs; all {last['graph_captures']} "
          f"captures took {last.get('graph_capture_mib')} MiB of device memory. Mixed steps run uncaptured in the "
          f"measured runs (graph limit reached or the device low on memory): {unc}. Padded into a captured graph "
          f"of larger shapes (`mixed_graph_padding`): {sum(m.get('padded_mixed_steps') or 0 for m in runs)}.")
    w("")
    w(f"SLO: TTFT {slo['ttft_ms']:.0f} ms, per-token latency {slo['tpot_ms']:.0f} ms. " + results.get("slo_note", ""))
    w("")
    w("## Engines and cost model")
    w("")
    w("| engine | setup s | warm-up s | profile s | fit error per bin (p50 / p90 rel.) |")
    w("| --- | ---: | ---: | ---: | --- |")
    for name, e in results["engines"].items():
        fe = e.get("fit_error") or {}
        fit = ", ".join(f"bin {b}: {v['p50'] * 100:.1f}/{v['p90'] * 100:.1f}% (n={v['n']})"
                        for b, v in sorted(fe.items(), key=lambda kv: int(kv[0])))
        w(f"| {name} | {e.get('setup_s', 0):.1f} | {e.get('warmup_s', 0):.1f} | {e.get('profile_s', 0):.1f} | {fit} |")
    w("")
    w("## Capacity under the SLO")
    w("")
    w("Highest probed rate at which p99 TTFT <= TTFT SLO and p99 inter-token latency <= the per-token SLO (a "
      "request not started when the window closes counts as an infinite TTFT); geometric bisection, round-robin over "
      "the policies. `by p99 TPOT`: the same probes judged "
      "by vLLM's per-request p99 TPOT instead of the per-token p99. `with / without capture stalls`: the highest "
      "probed rate passing with every inter-token gap, and without the gaps spanning a step that captured a CUDA "
      f"graph (a shape's first occurrence). The search itself used: `{a.get('capacity_criterion', 'itl')}`.")
    w("")
    w("| policy | capacity (req/s) | first failing (req/s) | capacity by p99 TPOT | with / without capture stalls |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for p, c in caps.items():
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        w(f"| {p} | {f(c.get('capacity_rps'))} | {f(c.get('first_failing_rps'))} | "
          f"{f(c.get('capacity_rps_by_p99_tpot'))} | {f(c.get('capacity_rps_with_captures'))} / "
          f"{f(c.get('capacity_rps_no_capture'))} |")
    w("")
    budgets = [p for p in caps if p.startswith("budget-")]
    best_budget = max(budgets, key=lambda p: (caps[p].get("capacity_rps") or 0), default=None)
    t1, r1 = _cap_ratio(caps, "slo", "fifo")
    w(f"- SLO- and EC-aware vs FIFO without chunking: {t1} (bar >= 2x)")
    if best_budget:
        t2, r2 = _cap_ratio(caps, "slo", best_budget)
        slo_cap = caps.get("slo") or {}
        same = [slo_cap.get(k) == caps[best_budget].get(k) for k in ("capacity_rps", "first_failing_rps")]
        unresolved = (" (not resolved: both passed the same highest probe and failed the same next one; more "
                      "probes would tell them apart)" if all(same) and slo_cap.get("first_failing_rps") else "")
        w(f"- SLO- and EC-aware vs the best fixed budget ({best_budget}): {t2} (bar >= 1.2x){unresolved}")
    fail = (caps.get("slo") or {}).get("first_failing_rps")
    bound = [m.get("slot_bound_pct") for m in runs if m.get("capacity_probe") and m["label"] == "slo"
             and fail is not None and abs(m["rate"] - fail) < 1e-9]
    if bound and bound[0] is not None and bound[0] >= 25:
        w(f"- At its first failing rate `slo` planned {bound[0]:.0f} % of its steps with every one of the "
          f"{a['max_num_seqs']} sequence slots taken while requests waited: the slots, not the SLO, bounded those "
          f"steps (more slots need not help: session 28's 128 lowered every policy's capacity)")
    w("")
    w("## All runs")
    w("")
    w("`slots full %`: steps planned with all `max_num_seqs` sequence slots taken while requests waited (their TTFT "
      "then grows whatever the step's slack).")
    w("")
    w("| run | rate | done | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 (no capture) ms | E2EL p50 / p99 ms | goodput "
      "req/s | attain. | tok/s | ITL > SLO | slots full % | step err p50 / p90 % | sched ms p50 / p99 | recompiles | "
      "mixed steps capturing / uncaptured / padded (graphs) |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in runs:
        g = lambda x: "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))  # noqa: E731
        w(f"| {m['label']} | {m['rate']:.2f} | {m['completed']}/{m['num_requests']} | {g(m['ttft_ms_p50'])} / "
          f"{g(m['ttft_ms_p99'])} | {g(m['tpot_ms_p50'])} / {g(m['tpot_ms_p99'])} | {g(m['itl_ms_p50'])} / "
          f"{g(m['itl_ms_p99'])} ({g(m.get('itl_ms_p99_no_capture'))}) | {g(m['e2el_ms_p50'])} / {g(m['e2el_ms_p99'])} | {m['goodput_rps']:.2f} | "
          f"{m['slo_attainment']:.2f} | {m['output_tok_s']:.0f} | {m.get('itl_violations')}/{m.get('num_itl')} | "
          f"{g(m.get('slot_bound_pct'))} | {g(m['step_err_p50_pct'])} / {g(m['step_err_p90_pct'])} | {g(m['sched_ms_p50'])} / {g(m['sched_ms_p99'])} "
          f"| {m['recompiles']} | {g(m.get('capture_steps'))} / {g(m.get('uncaptured_mixed_steps'))} / "
          f"{g(m.get('padded_mixed_steps'))} ({g(m.get('mixed_graphs'))}) |")
    w("")
    stab = [m for m in runs if m.get("stability")]
    if stab:
        w(f"## Stability as the EC set varies (rate {results.get('stability_rate', 0):.2f} req/s, same trace)")
        w("")
        w("Bar: p99 per-token latency inside the SLO at >= 90% of the throughput of the unconstrained scheduler "
          "(budget-2048) on the same trace.")
        w("")
        w("| condition | slo p99 ITL ms | without capture stalls | slo tok/s | budget-2048 tok/s | ratio | p99 within "
          "SLO | bar |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for cond in dict.fromkeys(m["stability"] for m in stab):
            s_ = next((m for m in stab if m["stability"] == cond and m["policy"] == "slo"), None)
            u_ = next((m for m in stab if m["stability"] == cond and m["policy"] == "budget-2048"), None)
            if not s_:
                continue
            ratio = s_["output_tok_s"] / u_["output_tok_s"] if u_ and u_["output_tok_s"] else None
            ok = s_["itl_ms_p99"] is not None and s_["itl_ms_p99"] <= slo["tpot_ms"]
            bar = "met" if ok and ratio is not None and ratio >= 0.9 else "missed"
            nc = s_.get("itl_ms_p99_no_capture")
            if bar == "missed" and nc is not None and nc <= slo["tpot_ms"] and ratio is not None and ratio >= 0.9:
                bar = "missed (met without capture stalls)"
            w(f"| {cond} | {s_['itl_ms_p99']} | {'-' if nc is None else nc} | {s_['output_tok_s']:.0f} | "
              f"{'-' if not u_ else round(u_['output_tok_s'])} | {'-' if ratio is None else f'{ratio:.2f}'} | "
              f"{'yes' if ok else 'no'} | {bar} |")
        w("")
    w("## EC-aware vs EC-blind cost model (same trace, same rate)")
    w("")
    w("| trace | policy | tokens with ITL > SLO | p99 ITL ms | tok/s | goodput |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")
    for m in runs:
        if m["policy"] in ("slo", "slo-ec-blind") and not m["label"].startswith("bf16"):
            tr = m.get("stability") or ("gamma 0.25" if m.get("burst") else f"Poisson {m['rate']:.2f} req/s")
            w(f"| {tr} | {m['policy']} | {m.get('itl_violations')} / {m.get('num_itl')} | {m['itl_ms_p99']} | "
              f"{m['output_tok_s']:.0f} | {m['goodput_rps']:.2f} |")
    w("")
    errs = [(m["label"], m["step_err_p50_pct"], m["step_err_p90_pct"]) for m in runs if m["step_err_p90_pct"] is not None]
    w("## Cost model and scheduler time")
    w("")
    if errs:
        p90s = [e[2] for e in errs]
        w(f"- Predicted vs measured step time (SLO policies, every step, online correction on): p90 abs error "
          f"{min(p90s):.1f}-{max(p90s):.1f}% over {len(errs)} runs (bar <= 10%); per run in the table above.")
        nc = [m.get("step_err_p90_pct_no_capture") for m in runs if m.get("step_err_p90_pct_no_capture") is not None]
        caps = sum(m.get("capture_steps") or 0 for m in runs)
        if nc and caps:
            w(f"- The same without the {caps} steps that captured a mixed-step CUDA graph (once per shape key): p90 "
              f"{min(nc):.1f}-{max(nc):.1f}%.")
        kinds = [(m["label"], m.get("rate"), m.get("step_err_p90_pct_decode"), m.get("step_err_p90_pct_mixed"),
                  m.get("num_mixed_steps")) for m in runs if m.get("step_err_p90_pct") is not None]
        if any(k[2] is not None or k[3] is not None for k in kinds):
            w("- p90 error per step kind (decode-only / replayed mixed steps, n mixed): " + "; ".join(
                f"{lab} {rate or 0:.1f} req/s {_pct1(dec)} / {_pct1(mix)} ({n})" for lab, rate, dec, mix, n in kinds) + ".")
    sm = results.get("sched_microbench")
    if sm:
        w(f"- Scheduler time per step at {sm['slo']['running']} running + {sm['slo']['waiting']} waiting (real "
          f"Scheduler + fitted cost model, micro-benchmark on this host): slo p50 {sm['slo']['p50_ms']} ms, p99 "
          f"{sm['slo']['p99_ms']} ms (thread CPU time p50 {sm['slo'].get('cpu_p50_ms')} ms, p99 "
          f"{sm['slo'].get('cpu_p99_ms')} ms); budget-512 p50 {sm['budget-512']['p50_ms']} ms (bar <= 0.2 ms).")
    w("")
    if results.get("skipped"):
        w("Skipped for time: " + "; ".join(results["skipped"]) + ".")
        w("")
    if results.get("errors"):
        w("Runs that failed (counted as failing probes): " + "; ".join(results["errors"]) + ".")
        w("")
    for f in results.get("plots", []):
        w(f"![{os.path.basename(f)}]({os.path.basename(f)})")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def replot(args):
    """Plots (and the markdown report) from a finished run's ``--json`` output and its ``_raw.json`` sibling, e.g. on
    a machine with matplotlib when the GPU host has none."""
    from spear_compile.serving.scheduler.cost_model import StepSample, model_from_json
    with open(args.replot) as f:
        results = json.load(f)
    with open(args.replot.replace(".json", "") + "_raw.json") as f:
        raw = json.load(f)
    by_label = {r["label"]: r for r in raw["runs"]}
    for m in results["runs"]:
        r = by_label.get(m["label"]) if m.get("common_rate") else None
        if r is not None:
            m["_raw"] = {"ttft": [float(x) for x in r["ttft"]], "itl": r["itl"]}
    samples = {name: ([StepSample.from_json(x) for x in d["samples"]], model_from_json(d["model"]))
               for name, d in raw["samples"].items()}
    saved = argparse.Namespace(**dict(results["args"], plots=args.plots or os.path.dirname(args.replot)))
    saved.ttft_slo_ms, saved.tpot_slo_ms = results["slo"]["ttft_ms"], results["slo"]["tpot_ms"]
    results["plots"] = plots(results, saved, samples)
    for m in results["runs"]:
        m.pop("_raw", None)
    if args.md:
        write_markdown(results, args.md, results.get("argv", []))
    return results


def summary(results):
    print(f"SLO: TTFT {results['slo']['ttft_ms']} ms, TPOT/ITL {results['slo']['tpot_ms']} ms")
    print(f"{'run':>28} {'rate':>6} {'done':>7} {'TTFT p50/p99 ms':>17} {'ITL p50/p99':>13} {'TPOT p99':>8} "
          f"{'goodput':>7} {'tok/s':>7} {'err p90%':>8} {'sched ms':>8}")
    for m in results["runs"]:
        print(f"{m['label'][:28]:>28} {m['rate']:6.2f} {m['completed']:>3}/{m['num_requests']:<3} "
              f"{str(m['ttft_ms_p50']):>8}/{str(m['ttft_ms_p99']):<8} {str(m['itl_ms_p50']):>6}/{str(m['itl_ms_p99']):<6} "
              f"{str(m['tpot_ms_p99']):>8} {m['goodput_rps']:7.2f} {m['output_tok_s']:7.0f} "
              f"{str(m['step_err_p90_pct'] and round(m['step_err_p90_pct'], 1)):>8} {str(m['sched_ms_p50']):>8}")
    for p, c in (results.get("capacity") or {}).items():
        print(f"capacity {p}: {c}")
    if results.get("skipped"):
        print("skipped:", results["skipped"])
    print(f"elapsed {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
