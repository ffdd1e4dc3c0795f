"""Where the step cost model's error sits: a serving bench run's steps (``bench/serving.py --json``'s ``*_raw.json``,
or its ``.gz``), predicted vs measured, grouped by what the step did. Session 21's H100 run had a p90 error of 6-7 % at 47 req/s and
9-18 % above 90 req/s, where the SLO policy chunks long prompts and packs several prefills into a step; session 22's
table put the error there (chunks after a context, several chunks), which the model's prefill tokens squared did not
see, and the model now prices the padded attention work instead.

    python -m bench.step_error bench/results/serving_slo_h100_s22_raw.json.gz [--policies slo,slo-ec-blind]
    python -m bench.step_error bench/results/serving_slo_h100_s22_raw.json.gz --replay [--own-sizes]

``--replay``: the SLO runs' mixed steps predicted again, offline, by the cost model of this tree and by the model
before session 22 (``p^2`` in place of the prefill attention feature, one online correction per bin), both fitted on the run's own start-up profile
and corrected online step by step as the engine does; decode-only steps keep their recorded predictions (neither
model changed them). The decode context of a mixed step is approximated (the log keeps its sum, not its longest
row), the same for both models, so compare the two replayed columns with each other. The prefill attention work is
the step's logged sizes, which are the covering graph's for a step that ran padded (``mixed_graph_padding``); the
live policy prices such a step at its own sizes, which ``--own-sizes`` does for the steps of one chunk (their chunk
is known from the log: its tokens and the context before it; a step of several chunks keeps its logged sizes).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math

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


def replay(raw: dict, policies, own_sizes: bool = False) -> list:
    """(run label, kind, model, relative error) of every SLO run's predicted step, replayed (see the docstring)."""
    from spear_compile.serving.buckets import attention_cells_at
    from spear_compile.serving.scheduler.cost_model import StepCostModel, StepSample
    from spear_compile.serving.scheduler.ec_signature import ECSignature

    class SquareModel(StepCostModel):
        """The cost model before session 22: the chunk's tokens squared as its attention's work, one online
        correction per bin (not per graph bucket)."""
        def cells(self, num_prefill_tokens, prefill_cells=None):
            return num_prefill_tokens * num_prefill_tokens

        def correction_key(self, num_tokens, mixed, sig):
            return (self.bin_of(num_tokens), bool(mixed), sig if self.ec_terms else None)

    fields = [f.split(" ")[0] for f in raw["step_fields"]]
    (doc,) = raw["samples"].values()
    samples = [StepSample.from_json(r) for r in doc["samples"]]
    layout = doc["model"]
    common = dict(decode_buckets=layout["decode_buckets"], token_buckets=layout["token_buckets"],
                  kv_layout=(layout["kv_layout"][0], layout["kv_layout"][1]), mixed_min_rows=layout["mixed_min_rows"])
    full_sig = next((s.signature for s in samples if not s.signature.is_empty), ECSignature())
    out = []
    for run in raw["steps"]:
        if run["label"] not in policies:
            continue
        aware = run["label"] == "slo"
        models = {}
        for label, cls in (("this tree", StepCostModel), ("p^2 (before)", SquareModel)):
            types = sorted({t for s in samples for t, _, _ in s.signature.per_type}) if aware else ()
            models[label] = cls(types, ec_terms=aware, **common).fit(samples)
        for values in run["steps"]:
            step = dict(zip(fields, values))
            if step["predicted_s"] is None or not step["measured_s"]:
                continue
            kind = step_kind(step)
            run_label = f"{run['label']} {run['rate'] or 0:.1f}"
            if not step["num_prefills"] or step["mixed_dims"] is None:
                for label in models:
                    out.append((run_label, kind, label, (step["predicted_s"] - step["measured_s"]) / step["measured_s"]))
                continue
            d, p = step["num_decodes"], step["num_prefill_tokens"]
            tokens, _, _, chunk_rows, chunk_len, width, _ = step["mixed_dims"]
            sig = full_sig if (aware and step["ec_enabled"]) else ECSignature()
            for label, m in models.items():
                block = m.kv_layout[0]
                longest = math.ceil(1.5 * step["sum_context"] / d) if d else 0   # approximated (see the docstring)
                kv = m.context_feature(d, step["sum_context"], min(longest, block * m.kv_layout[1][-1]), True, p)
                if own_sizes and step["num_prefills"] == 1:
                    cells = m.prefill_cells([(step["prefill_context"], p)])
                else:
                    cells = attention_cells_at(chunk_rows, chunk_len, width, 0, block)   # as the graph ran
                pred = m.predict(d, p, kv, sig, tokens, cells)
                if not step["captured_graph"]:
                    m.observe(d, p, kv, sig, step["measured_s"], tokens, cells)
                out.append((run_label, kind, label, (pred - step["measured_s"]) / step["measured_s"]))
    return out


def replay_table(errors: list) -> str:
    labels = sorted({e[2] for e in errors}, reverse=True)
    lines = ["| run | steps | n | " + " | ".join(f"{m}: abs error p50 / p90 %" for m in labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    groups: dict = {}
    for run, kind, label, err in errors:
        if kind.startswith("captured"):
            continue
        for key in ((run, "all"), (run, "mixed" if kind != "decode only" else "decode only"), ("all runs", "all")):
            groups.setdefault(key, {}).setdefault(label, []).append(abs(err) * 100)
    for (run, kind), by in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all runs", kv[0])):
        cells = [f"{pct(by[m], 50):.1f} / {pct(by[m], 90):.1f}" for m in labels]
        lines.append(f"| {run} | {kind} | {len(by[labels[0]])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    ap.add_argument("--replay", action="store_true", help="the SLO runs replayed by this tree's cost model and the "
                                                          "one before session 22 (see the docstring)")
    ap.add_argument("--own-sizes", action="store_true", help="--replay: one-chunk steps priced at their own sizes, as "
                                                             "the live policy prices them, not the covering graph's")
    args = ap.parse_args(argv)
    with (gzip.open if args.raw.endswith(".gz") else open)(args.raw, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    if "steps" not in raw:
        raise SystemExit(f"{args.raw}: no per-step records (written by bench/serving.py since session 21)")
    policies = set(filter(None, args.policies.split(",")))
    if args.replay:
        errors = replay(raw, policies & {"slo", "slo-ec-blind"} or {"slo", "slo-ec-blind"}, args.own_sizes)
        print(replay_table(errors) if errors else "no predicted steps in these runs")
        return
    errors = rows(raw, policies)
    print(table(errors) if errors else "no predicted steps in these runs")


if __name__ == "__main__":
    main()
