"""Where the step cost model's error sits: a serving bench run's steps (``bench/serving.py --json``'s ``*_raw.json``),
predicted vs measured, grouped by what the step did. Session 21's H100 run had a p90 error of 6-7 % at 47 req/s and
9-18 % above 90 req/s, where the SLO policy chunks long prompts and packs several prefills into a step, whose prefill
attention (chunk rows x their keys, padded to the graph's sizes) the model's features (prefill tokens and their
square, decode context) do not see; this table says whether those steps carry the error.

    python -m bench.step_error bench/results/serving_slo_h100_s21_raw.json [--policies slo,slo-ec-blind]
"""
from __future__ import annotations

import argparse
import json

from bench.stats import pct


def step_kind(step: dict) -> str:
    """A step's class: decode-only, one prefill from a prompt's start, a chunk with context before it, several
    prefills; with whether it captured its graph (a one-off) or ran uncaptured."""
    if step["captured_graph"]:
        return "captured (first of its shape)"
    if step["uncaptured_mixed"]:
        return "uncaptured mixed"
    if not step["num_prefills"]:
        return "decode only"
    if step["num_prefills"] > 1:
        return "several prefills"
    return "one chunk after context" if step["prefill_context"] else "one prefill from the start"


def rows(raw: dict, policies) -> list:
    """(run label, kind, relative error) of every predicted step of the runs of ``policies``."""
    fields = [f.split(" ")[0] for f in raw["step_fields"]]
    out = []
    for run in raw["steps"]:
        if policies and run["label"] not in policies:
            continue
        for values in run["steps"]:
            step = dict(zip(fields, values))
            if step["predicted_s"] is None or not step["measured_s"]:
                continue
            err = (step["predicted_s"] - step["measured_s"]) / step["measured_s"]
            out.append((f"{run['label']} {run['rate'] or 0:.1f}", step_kind(step), err))
    return out


def table(errors: list) -> str:
    lines = ["| steps | kind | n | abs error p50 / p90 % | signed mean % (under-predicted < 0) |", "|---|---|---|---|---|"]
    groups: dict = {}
    for run, kind, err in errors:
        groups.setdefault(("all runs", kind), []).append(err)
        groups.setdefault((run, kind), []).append(err)
    for (run, kind), errs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "all runs", kv[0])):
        a = [abs(e) * 100 for e in errs]
        lines.append(f"| {run} | {kind} | {len(errs)} | {pct(a, 50):.1f} / {pct(a, 90):.1f} | "
                     f"{100 * sum(errs) / len(errs):+.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="a serving bench run's *_raw.json")
    ap.add_argument("--policies", default="slo,slo-ec-blind", help="run labels to read (comma list; '' all)")
    args = ap.parse_args(argv)
    with open(args.raw, encoding="utf-8") as f:
        raw = json.load(f)
    if "steps" not in raw:
        raise SystemExit(f"{args.raw}: no per-step records (written by bench/serving.py since session 21)")
    errors = rows(raw, set(filter(None, args.policies.split(","))))
    print(table(errors) if errors else "no predicted steps in these runs")


if __name__ == "__main__":
    main()
