"""Capacity under the SLO per scheduling policy, simulated on a GPU's measured step costs (no GPU needed).

``bench/serving.py`` measures the real engine on a GPU; there, one-off costs (a mixed step's first occurrence of a
shape, which captures its CUDA graph; steps beyond the graph limit, uncaptured) can decide a few seconds' p99. This
bench asks the steady-state question on the host: the real ``Scheduler`` and policies, driven by a simulated clock,
each step costing what the GPU's start-up profile measured (``bench/tune_cache/stepcost-*.json``: the samples
``scheduler.profile`` took of the real compiled graphs; a piecewise-linear fit of them, times a lognormal noise of the
fit's own residual spread), over the same seeded traces and the same capacity search and criterion (p99 TTFT and p99
inter-token latency inside their SLOs). It shows at which per-token SLOs a scheduler can matter on that GPU: where
FIFO's longest step already fits the SLO, no policy can beat it by much.

    python -m bench.serving_sim --stepcost bench/tune_cache/stepcost-5415339e227db04d.json --tpot-slo-ms 35,17
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import statistics
import sys

from bench.serving import add_length_args, make_trace, metrics, passes, warmup_rate
from bench.stats import pct
from spear_compile.serving.buckets import MIN_DIM, mixed_step_dims_for, pow2_dim
from spear_compile.serving.cuda_graphs import MixedGraphs
from spear_compile.serving.kv_cache import KVBlockManager
from spear_compile.serving.model_runner import ModelRunner
from spear_compile.serving.request import Request, RequestStatus, SamplingParams
from spear_compile.serving.scheduler import Scheduler, make_policy
from spear_compile.serving.scheduler.cost_model import StepSample, fit_models

POLICIES = "fifo,budget-512,budget-2048,slo-ec-blind,slo"


def load_profile(paths, max_num_seqs):
    """(samples, layout, gpu) of step-cost files of one engine (ECs on and off). Mixed samples with
    ``max_num_seqs`` decodes are dropped: the engine never runs them (the prefilling request is running too), and
    grid-2 profiles took them uncaptured (session 20)."""
    samples, layout, gpu = [], None, None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        fields = doc["fields"]
        if layout is not None and fields["layout"]["token_buckets"] != layout["token_buckets"]:
            raise SystemExit(f"{path}: another engine layout than {paths[0]}")
        layout, gpu = fields["layout"], fields["gpu"]
        for row in doc["samples"]:
            s = StepSample.from_json(row)
            if not (s.shape.num_prefill_tokens and s.shape.num_decodes >= max_num_seqs):
                samples.append(s)
    return samples, layout, gpu


def fit(samples, layout):
    """The engine's (EC-aware, EC-blind) cost models fitted on ``samples``, padded as ``layout``'s engine pads."""
    return fit_models(samples, layout["decode_buckets"], layout["token_buckets"],
                      kv_layout=(layout["block_size"], tuple(layout["table_buckets"])), mixed_min_rows=MIN_DIM)


class TrueCost:
    """A step's simulated time: ``model``'s fitted time of the measured samples (``predict_raw``: no online
    correction; the policies get copies of their own) times lognormal noise whose spread is the fit's own residual
    spread on those samples."""

    def __init__(self, model, samples, seed):
        self.model = model
        logs = [math.log(s.seconds / self.predict_sample(s)) for s in samples]
        self.sigma = statistics.pstdev(logs)
        self.rng = random.Random(seed)

    def predict_sample(self, s):
        return self.model.predict_shape(s.shape, s.signature)

    def _fitted(self, decodes, prefills, sig, tokens=0):
        """The fit's time of a step of ``decodes`` and ``(request, chunk)`` ``prefills`` (before the step advances
        them), at ``tokens`` padded tokens (0: its own bucket)."""
        ctxs = [r.num_computed_tokens + 1 for r in decodes]
        p = sum(n for _, n in prefills)
        kv = self.model.context_feature(len(decodes), sum(ctxs), max(ctxs, default=0), p > 0, p)
        cells = self.model.prefill_cells([(r.num_computed_tokens, n) for r, n in prefills])
        return self.model.predict_raw(len(decodes), p, kv, sig, tokens, cells)

    def __call__(self, decodes, prefills, sig):
        return self._fitted(decodes, prefills, sig) * math.exp(self.rng.gauss(0.0, self.sigma))

    def at_tokens(self, plan, tokens, sig):
        """The fitted extra time of ``plan`` run at ``tokens`` (a larger token bucket) over its own bucket."""
        return max(0.0, self._fitted(plan.decodes, plan.prefills, sig, tokens)
                   - self._fitted(plan.decodes, plan.prefills, sig))


class _NoCapture:
    """``MixedGraphs``' capture, for key bookkeeping only: never low on memory."""
    cuda = False

    @staticmethod
    def low_on_memory() -> bool:
        return False


class GraphKeys:
    """The engine's mixed-step CUDA graphs, by key (``buckets.mixed_step_dims``), kept by the engine's own
    ``MixedGraphs`` rules (its limit, logits buffer rows and ``covering``; graphs without contents): a step a captured
    graph covers replays it (the padding free here), a new key's first step runs uncaptured and captures (``extra_s``
    charges it ``uncaptured_s + capture_s``), a key beyond ``limit`` runs uncaptured every time (``uncaptured_s``).
    The engine keeps its graphs across runs and policies, so one object serves a whole search.
    ``uncaptured_s = capture_s = 0``: the steady state (every key captured)."""

    def __init__(self, limit, uncaptured_s, capture_s, layout, max_num_seqs, full_decode_tables=False,
                 max_padding=0.0, bucket_padding=1.0, truth=None):
        self.uncaptured_s, self.capture_s = uncaptured_s, capture_s
        self.full_decode_tables = full_decode_tables   # EngineConfig(decode_attention="triton")
        self.max_padding = max_padding                 # EngineConfig.mixed_graph_padding
        self.bucket_padding = bucket_padding           # EngineConfig.mixed_graph_bucket_padding
        self.truth = truth                             # charges a step replayed at a larger token bucket its extra work
        # (max_rows: the engine's logits buffer; capture_first off: the step costs above were fitted without it)
        self.mixed = MixedGraphs(_NoCapture(), limit, max_rows=pow2_dim(max_num_seqs), capture_first=False)
        self.layout = layout
        self.table_buckets = tuple(layout["table_buckets"])
        self.captures = self.uncaptured = self.padded = 0
        # what ``ModelRunner.padded_step`` reads of its runner, so that the SLO policy is told (``run_dims``) what the
        # engine would tell it
        self.config = argparse.Namespace(mixed_graph_padding=max_padding, mixed_graph_bucket_padding=bucket_padding,
                                         decode_attention="triton" if full_decode_tables else "torch")
        self.net = argparse.Namespace(has_ecs=True)
        self.block_size = layout.get("block_size", 16)
        self.decode_buckets, self.token_buckets = layout["decode_buckets"], tuple(layout["token_buckets"])

    def run_dims(self, num_decodes, decode_tokens, chunks):
        """``StepContext.run_dims`` as the engine answers it (``ModelRunner.padded_step`` on these keys)."""
        return ModelRunner.padded_step(self, True, num_decodes, decode_tokens, chunks)

    @property
    def keys(self):
        return self.mixed.graphs

    def extra_s(self, plan, sig=None) -> float:
        if not plan.prefills:
            return 0.0   # decode steps replay the graphs captured at start-up
        dims = mixed_step_dims_for(plan.decodes, plan.prefills, self.layout["decode_buckets"][-1],
                                   tuple(self.layout["token_buckets"]), self.table_buckets, self.full_decode_tables)
        graph_dims = self.mixed.covering(True, dims, self.max_padding, self.bucket_padding)
        if graph_dims is not None:
            self.padded += graph_dims != dims
            if graph_dims.tokens > dims.tokens and self.truth is not None:   # the larger bucket's linear work
                return self.truth.at_tokens(plan, graph_dims.tokens, sig)
            return 0.0
        if self.mixed.has_room(dims.logits_rows):
            self.mixed.graphs[(True, dims.shapes())] = None
            self.captures += 1
            return self.uncaptured_s + self.capture_s
        self.uncaptured += 1
        return self.uncaptured_s


def simulate(policy, trace, truth, sig, args, ttft_slo_s, tpot_slo_s, graphs=None):
    """Serve ``trace`` ((arrival s, prompt ids, output tokens) per request) under ``policy`` on a simulated clock:
    arrivals released as the clock passes them, one step at a time, requests still running ``drain_s`` after the
    last arrival aborted (as ``bench/serving.py``'s ``run_trace``); ``graphs``: the mixed-step graph keys (one-off
    costs), else none. Returns ``metrics``' dict."""
    clock = [0.0]
    sched = Scheduler(KVBlockManager(args.num_blocks, args.block_size), policy, max_num_seqs=args.max_num_seqs,
                      max_num_tokens=args.max_num_tokens, token_buckets=args.token_buckets, clock=lambda: clock[0],
                      max_decode_rows=args.max_decode_rows)   # as the engine (None: room for the exact decode count)
    if graphs is not None and graphs.max_padding:
        sched.run_dims = graphs.run_dims
    reqs, times, meta = [], {}, {}
    for k, (arr, ids, o) in enumerate(trace):
        r = Request(f"r{k}", ids, SamplingParams(max_tokens=o, ignore_eos=True), arrival_time=arr,
                    ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
        reqs.append(r)
        times[r.request_id], meta[r.request_id] = [], (arr, len(ids), o)
    cap = (trace[-1][0] if trace else 0.0) + args.drain_s
    i, steps, slot_bound = 0, 0, 0
    while clock[0] <= cap:
        while i < len(reqs) and reqs[i].arrival_time <= clock[0]:
            sched.add(reqs[i])
            i += 1
        if not sched.has_unfinished():
            if i == len(reqs):
                break
            clock[0] = reqs[i].arrival_time
            continue
        plan = sched.schedule(sig)
        steps += 1
        slot_bound += sched.slots_full
        dt = truth(plan.decodes, plan.prefills, sig) + args.host_ms / 1e3
        if graphs is not None:
            dt += graphs.extra_s(plan, sig)
        clock[0] += dt
        policy.observe(plan, dt)
        done = list(plan.decodes) + [r for r, n in plan.prefills if r.num_computed_tokens + n == r.num_tokens]
        for r in plan.decodes:
            r.num_computed_tokens += 1
        for r, n in plan.prefills:
            r.num_computed_tokens += n
        for r in done:
            r.output_token_ids.append(7)
            times[r.request_id].append(clock[0])
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
    m = metrics(times, meta, ttft_slo_s, tpot_slo_s, 0.0)
    m["slot_bound_pct"] = round(100.0 * slot_bound / steps, 1) if steps else None
    return m


def search(makers, truth, sig, args, ttft_ms, tpot_ms, graphs=None):
    """``bench/serving.py``'s capacity search, round-robin over the policies (so a shared ``graphs`` evolves as the
    engine's does): r0, then x2 or /2 until bracketed, then geometric midpoints; a rate passes when every seed's run
    passes (p99 TTFT and p99 ITL within the SLOs). ``args.seeds`` None: probe k uses seed 1000 + k, as the GPU
    bench. Returns ({policy: (capacity, first failing)}, runs)."""
    crit = argparse.Namespace(ttft_slo_ms=ttft_ms, tpot_slo_ms=tpot_ms)
    state = {name: [None, None, args.start_rate] for name in makers}
    runs = []
    for k in range(args.probes):
        for name, make in makers.items():
            lo, hi, rate = state[name]
            ok = True
            for seed in args.seeds or [1000 + k]:
                trace = make_trace(rate, args.duration, seed, args.max_prompt, args.max_output, 32000, 1.0,
                                   args.prompt_median, output_median=args.output_median)
                before = (graphs.captures, graphs.uncaptured, graphs.padded) if graphs else (0, 0, 0)
                m = simulate(make(), trace, truth, sig, args, ttft_ms / 1e3, tpot_ms / 1e3, graphs)
                after = (graphs.captures, graphs.uncaptured, graphs.padded) if graphs else (0, 0, 0)
                runs.append(dict(policy=name, rate=rate, seed=seed, ttft_ms_p99=m["ttft_ms_p99"],
                                 itl_ms_p99=m["itl_ms_p99"], tpot_ms_p99=m["tpot_ms_p99"],
                                 goodput_rps=m["goodput_rps"], output_tok_s=m["output_tok_s"],
                                 slot_bound_pct=m["slot_bound_pct"],
                                 captures=after[0] - before[0], uncaptured=after[1] - before[1],
                                 padded=after[2] - before[2]))
                ok = ok and passes(m, crit)
            if ok:
                lo = rate if lo is None else max(lo, rate)
            else:
                hi = rate if hi is None else min(hi, rate)
            state[name] = [lo, hi, hi / 2 if lo is None else lo * 2 if hi is None else math.sqrt(lo * hi)]
    return {name: (lo, hi) for name, (lo, hi, _) in state.items()}, runs


def warm_up(makers, truth, sig, args, ttft_ms, tpot_ms, graphs):
    """``bench/serving.py``'s unmeasured warm-up runs: run k of each policy at ``warmup_rate(start rate, k)``, seed
    500 + k."""
    for k in range(args.warmup_runs):
        for make in makers.values():
            trace = make_trace(warmup_rate(args.start_rate, k), args.duration, 500 + k, args.max_prompt, args.max_output,
                               32000, 1.0, args.prompt_median, output_median=args.output_median)
            simulate(make(), trace, truth, sig, args, ttft_ms / 1e3, tpot_ms / 1e3, graphs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stepcost", required=True, help="comma list of stepcost-*.json files of one engine")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--tpot-slo-ms", default="35", help="comma list of per-token SLOs (ms)")
    ap.add_argument("--slo-safety", type=float, default=None,
                    help="SloAware's least factor on predicted step time (default: the policy's own)")
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--ec", choices=("on", "off"), default="on", help="serve with the profile's ECs on or off")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of arrivals per run")
    ap.add_argument("--drain-s", type=float, default=2.5)
    ap.add_argument("--seeds", default="1000,1001,1002", help="seeds of every probe's runs, or 'probe': probe k "
                    "runs seed 1000 + k once (as bench/serving.py)")
    ap.add_argument("--uncaptured-ms", type=float, default=0.0, help="extra ms of a mixed step run without a graph "
                    "(0 with --capture-ms 0: steady state, no graph keys kept)")
    ap.add_argument("--capture-ms", type=float, default=0.0, help="extra ms of a step capturing its graph, on top")
    ap.add_argument("--graph-limit", type=int, default=1024)
    ap.add_argument("--graph-padding", type=float, default=2.0, help="EngineConfig.mixed_graph_padding: a new shape "
                    "covered by a captured one (buckets.MixedDims.covers) replays it, free (0: off)")
    ap.add_argument("--graph-bucket-padding", type=float, default=2.0, help="EngineConfig.mixed_graph_bucket_padding: "
                    "the covering graph may have up to this many times the step's tokens and decode rows (the larger "
                    "bucket's extra linear work charged from the fit)")
    ap.add_argument("--warmup-runs", type=int, default=1)
    ap.add_argument("--decode-attention", choices=("torch", "triton"), default="torch",
                    help="the engine's decode attention: 'triton' pads mixed steps' decode tables to the largest width")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--start-rate", type=float, default=16.0)
    ap.add_argument("--host-ms", type=float, default=0.0, help="host time added to every step (ms)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--token-buckets", help="what-if: the engine's token buckets instead of the profile's (comma list; "
                    "step times interpolated by the fit)")
    ap.add_argument("--md", help="write a markdown report here")
    add_length_args(ap)
    args = ap.parse_args(argv)
    args.seeds = None if args.seeds == "probe" else [int(s) for s in args.seeds.split(",")]
    lines_graphs = []
    samples, layout, gpu = load_profile(args.stepcost.split(","), args.max_num_seqs)
    if args.token_buckets:   # what-if: other token buckets (the fit interpolates its per-token cost between them)
        layout = dict(layout, token_buckets=[int(x) for x in args.token_buckets.split(",")])
    args.block_size, args.token_buckets = layout["block_size"], tuple(layout["token_buckets"])
    args.max_num_tokens = args.token_buckets[-1]
    args.max_decode_rows = layout["decode_buckets"][-1]
    sigs = sorted({s.signature for s in samples}, key=lambda s: s.total_rank)
    sig = sigs[-1] if args.ec == "on" else sigs[0]
    aware, blind = fit(samples, layout)
    truth = TrueCost(aware, samples, args.noise_seed)
    with open(args.stepcost.split(",")[0], encoding="utf-8") as f:
        fields = json.load(f)["fields"]
    one_off = ("new mixed-step shapes' one-off costs as below" if args.uncaptured_ms or args.capture_ms
               else "no CUDA-graph captures, no uncaptured steps")
    lines = [f"# Simulated capacity per policy on measured step costs ({gpu})", "",
             f"{datetime.date.today()}; step costs profiled on the {gpu} with torch {fields.get('torch')}, triton "
             f"{fields.get('triton')}; simulated on {platform.machine()} CPU, Python {platform.python_version()}. "
             f"Command: `python -m bench.serving_sim {' '.join(argv or sys.argv[1:])}`", "",
             f"{len(samples)} profiled steps (`{args.stepcost}`), ECs {args.ec}; the simulated step time is their fit "
             f"times lognormal noise of sigma {truth.sigma:.3f} (the fit's residual spread); host time per step "
             f"{args.host_ms} ms; {one_off}. Trace: {args.duration} s of Poisson "
             f"arrivals per run, prompts lognormal (median {args.prompt_median}, clipped to {args.max_prompt}), outputs "
             f"lognormal (median {args.output_median}, clipped to {args.max_output}); max_num_seqs "
             f"{args.max_num_seqs}; a rate passes when all {len(args.seeds) if args.seeds else 1} seeds' runs have p99 TTFT <= "
             f"{args.ttft_slo_ms:.0f} ms and p99 inter-token latency <= the per-token SLO.", ""]
    longest = max(s.seconds for s in samples if s.shape.num_prefill_tokens)
    lines += [f"Longest profiled mixed step: {1e3 * longest:.1f} ms.", "",
              "| per-token SLO ms | policy | capacity req/s | first failing | vs fifo | vs best budget |",
              "|---|---|---|---|---|---|"]
    all_runs = []
    for tpot_ms in [float(x) for x in args.tpot_slo_ms.split(",")]:
        def maker(name):
            if name.startswith("slo"):
                kw = {} if args.slo_safety is None else {"safety": args.slo_safety}
                return lambda: make_policy(name, cost_model=copy.deepcopy(aware), blind_cost_model=copy.deepcopy(blind),
                                           ttft_slo_s=args.ttft_slo_ms / 1e3, tpot_slo_s=tpot_ms / 1e3, **kw)
            return lambda: make_policy(name)
        makers = {name: maker(name) for name in args.policies.split(",")}
        graphs = None
        if args.uncaptured_ms or args.capture_ms:   # one engine per SLO setting, as one GPU bench run
            graphs = GraphKeys(args.graph_limit, args.uncaptured_ms / 1e3, args.capture_ms / 1e3, layout,
                               args.max_num_seqs, full_decode_tables=args.decode_attention == "triton",
                               max_padding=args.graph_padding, bucket_padding=args.graph_bucket_padding,
                               truth=truth)
            warm_up(makers, truth, sig, args, args.ttft_slo_ms, tpot_ms, graphs)
            warm = len(graphs.keys)
        caps, runs = search(makers, truth, sig, args, args.ttft_slo_ms, tpot_ms, graphs)
        all_runs += [dict(r, tpot_slo_ms=tpot_ms) for r in runs]
        for name, (lo, hi) in caps.items():
            print(f"SLO {tpot_ms} ms {name}: capacity {lo}, first failing {hi}", flush=True)
        if graphs is not None:
            lines_graphs.append(f"- SLO {tpot_ms:g} ms: {warm} mixed-step graph keys after the warm-up, "
                                f"{len(graphs.keys)} at the end (limit {args.graph_limit}); "
                                f"{sum(r['captures'] for r in runs)} capturing, {sum(r['uncaptured'] for r in runs)} "
                                f"uncaptured and {sum(r['padded'] for r in runs)} padded (into a covering graph) mixed "
                                f"steps in the measured runs.")
        budgets = [n for n in caps if n.startswith("budget-") and caps[n][0]]
        best = max(budgets, key=lambda n: caps[n][0], default=None)
        for name, (lo, hi) in caps.items():
            f = caps.get("fifo", (None, None))[0]
            b = caps[best][0] if best else None
            ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "-"  # noqa: E731
            lines.append(f"| {tpot_ms:g} | {name} | {lo and round(lo, 2)} | {hi and round(hi, 2)} | {ratio(lo, f)} | "
                         f"{ratio(lo, b)}{f' ({best})' if best and name.startswith('slo') else ''} |")
    if lines_graphs:
        lines += ["", f"One-off costs modelled: a new mixed-step shape's first step +{args.uncaptured_ms + args.capture_ms:g} "
                  f"ms (uncaptured + capture) unless a captured graph covers it (graph padding {args.graph_padding:g}, "
                  f"bucket padding {args.graph_bucket_padding:g}: "
                  f"replayed at no extra cost), a step beyond the {args.graph_limit}-graph limit +{args.uncaptured_ms:g} ms; "
                  f"{args.warmup_runs} warm-up run(s) per policy first."] + lines_graphs
    lines += ["", "## Runs", "", "`slots full %`: steps planned with every sequence slot taken while requests waited.",
              "", "| SLO ms | policy | rate | seed | TTFT p99 ms | ITL p99 ms | TPOT p99 ms | goodput | slots full % | "
              "capturing / uncaptured / padded steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in all_runs:
        lines.append(f"| {r['tpot_slo_ms']:g} | {r['policy']} | {r['rate']:.2f} | {r['seed']} | {r['ttft_ms_p99']} | "
                     f"{r['itl_ms_p99']} | {r['tpot_ms_p99']} | {r['goodput_rps']:.2f} | {r['slot_bound_pct']} | "
                     f"{r['captures']} / {r['uncaptured']} / {r['padded']} |")
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(text)
    print("\n".join(lines[:lines.index("## Runs")]))


if __name__ == "__main__":
    main()
