"""Scheduler time per step (issue 17's bar: <= 0.2 ms at 64 running requests), on any host, without a GPU.

``time_schedule`` times ``Scheduler.schedule`` at ``n_running`` decodes and ``n_waiting`` queued prompts: the real
Scheduler, KV block manager and a fitted step cost model; the step itself is not run (decodes advance by one token).
``bench/serving.py`` calls it with the cost model it profiled on the GPU (its ``sched`` section). Run alone, the
cost models are fitted from committed H100 step-cost samples (``results/stepcost_h100_s16_w4*.json``: the same
profile session 16's SLO benchmark fitted), so only the host differs from that run.

  python -m bench.scheduler_time [--steps 2000] [--md results/scheduler_time_cpu.md]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from bench.stats import pct
from spear_compile.serving.kv_cache import KVBlockManager
from spear_compile.serving.request import Request, SamplingParams
from spear_compile.serving.scheduler import Scheduler, make_policy
from spear_compile.serving.scheduler.cost_model import StepSample, fit_models

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = [os.path.join(HERE, "results", f"stepcost_h100_s16_{v}.json") for v in ("w4", "w4_ec")]


def time_schedule(cost_model, sig, ttft_slo_s, tpot_slo_s, n_running=64, n_waiting=32, steps=2000,
                  policies=("slo", "budget-512")) -> dict:
    """Per policy: p50 / p99 wall and thread-CPU ms of one ``schedule()`` call, and the SLO policy's work counter."""
    out = {}
    buckets = cost_model.token_buckets or (2048,)
    for name in policies:
        kw = {}
        if name.startswith("slo"):
            kw = dict(cost_model=copy.deepcopy(cost_model), ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
        pol = make_policy(name, **kw)
        blocks = KVBlockManager(1 + (n_running + n_waiting) * 200, 16)
        # fill the batch with a plain budget policy, then time the policy under test
        sched = Scheduler(blocks, make_policy("budget-2048"), max_num_seqs=n_running, max_num_tokens=max(buckets),
                          token_buckets=buckets)
        now = time.monotonic()
        for k in range(n_running):
            sched.add(Request(f"run{k}", [1] * 300, SamplingParams(max_tokens=100000), arrival_time=now - 1))
        guard = 0
        while (len(sched.running) < n_running or any(r.num_tokens_to_compute > 1 for r in sched.running)) \
                and guard < 1000:
            plan = sched.schedule(sig)
            for r, c in plan.prefills:
                r.num_computed_tokens += c
                if r.num_computed_tokens == r.num_tokens:
                    r.output_token_ids.append(1)
                    r.last_token_time = time.monotonic()
            guard += 1
        for k in range(n_waiting):
            sched.add(Request(f"wait{k}", [1] * 4000, SamplingParams(max_tokens=4), arrival_time=now))
        sched.policy = pol  # the queue stays queued (the batch is full); the policy still orders and sizes it
        ts, cpu = [], []
        ops0 = getattr(pol, "ops", 0)
        for _ in range(steps):
            t, c = time.perf_counter(), time.thread_time()
            plan = sched.schedule(sig)
            cpu.append(time.thread_time() - c)
            ts.append(time.perf_counter() - t)
            tnow = time.monotonic()
            for r in plan.decodes:
                r.num_computed_tokens += 1
                r.output_token_ids.append(1)
                r.last_token_time = tnow
            for r, c in plan.prefills:
                r.num_computed_tokens += c
        ms = lambda xs, q: round(pct(xs, q) * 1e3, 3)  # noqa: E731
        out[name] = {"running": len(sched.running), "waiting": len(sched.waiting),
                     "p50_ms": ms(ts, 50), "p99_ms": ms(ts, 99), "cpu_p50_ms": ms(cpu, 50),
                     "cpu_p99_ms": ms(cpu, 99), "policy_ops_per_step": (getattr(pol, "ops", 0) - ops0) / steps}
    return out


def h100_cost_model():
    """The EC-aware model and the EC set of session 16's H100 profile (both EC states' samples, its layout)."""
    samples, fields = [], None
    for path in SAMPLES:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        fields = doc["fields"]
        samples += [StepSample.from_json(r) for r in doc["samples"]]
    lay = fields["layout"]
    aware, _ = fit_models(samples, lay["decode_buckets"], lay["token_buckets"],
                          kv_layout=(lay["block_size"], lay["table_buckets"]), mixed_min_rows=2)
    sig = max((s.signature for s in samples), key=lambda s: s.total_rank)
    return aware, sig, fields


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="whole measurements; the median run's numbers are kept")
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=90.0)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    aware, sig, fields = h100_cost_model()
    runs = [time_schedule(aware, sig, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3, steps=args.steps)
            for _ in range(args.repeats)]
    runs.sort(key=lambda r: r["slo"]["p50_ms"])
    res = runs[len(runs) // 2]
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps({"host": host, "runs": runs}, indent=1))
    if args.md:
        lines = [f"# Scheduler time per step at 64 running + 32 waiting ({time.strftime('%Y-%m-%d')})", "",
                 f"Host: {host}; torch {torch.__version__}. Command: `python -m bench.scheduler_time --steps "
                 f"{args.steps} --repeats {args.repeats} --md ...` (the median of {args.repeats} runs by slo p50).",
                 f"Cost model: fitted from the H100 step-cost samples of session 16 ({fields['gpu']}, EC set "
                 f"{fields['ec']}); SLO {args.ttft_slo_ms:g} ms TTFT, {args.tpot_slo_ms:g} ms per token. Bar: <= 0.2 ms.",
                 "", "| policy | wall p50 ms | wall p99 ms | CPU p50 ms | CPU p99 ms | policy ops / step |",
                 "|---|---:|---:|---:|---:|---:|"]
        for name, r in res.items():
            lines.append(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r['cpu_p50_ms']} | {r['cpu_p99_ms']} | "
                         f"{r['policy_ops_per_step']:.0f} |")
        lines.append("")
        lines.append("All runs (slo p50 / p99 ms): " + ", ".join(f"{r['slo']['p50_ms']} / {r['slo']['p99_ms']}"
                                                                 for r in runs))
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
