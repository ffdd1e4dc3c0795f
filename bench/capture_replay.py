"""How many of a served run's graph captures a looser covering rule would have avoided (CPU, from a run's steps).

Reads ``bench/serving.py``'s ``_raw.json(.gz)`` (every step's ``mixed_dims`` as run, EC state and whether it captured
a graph) and, for each capturing step, asks whether a graph met earlier in the same file (any step's dims, in run
order, per EC state) would have covered it under ``MixedDims.covers`` at an attention padding and a token / decode-row
bucket padding. A lower bound: the warm-up runs' graphs are not in the file, and a looser rule changes the steps.

  python -m bench.capture_replay bench/results/serving_slo_h100_s24_raw.json.gz [...] [--md out.md]
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json

from spear_compile.serving.buckets import MixedDims

RULES = ((2.0, 1.0), (4.0, 1.0), (8.0, 1.0), (2.0, 2.0), (4.0, 2.0))   # (attention padding, bucket padding)


def replay(path: str) -> dict:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        raw = json.load(f)
    known = {True: [], False: []}
    captures, covered = 0, {rule: 0 for rule in RULES}
    for run in raw["steps"]:
        for step in run["steps"]:
            if not step[5]:
                continue
            dims, ec = MixedDims(*step[5]), bool(step[6])
            if step[7]:
                captures += 1
                for pad, bucket in RULES:
                    covered[(pad, bucket)] += any(g != dims and g.covers(dims, pad, bucket) for g in known[ec])
            known[ec].append(dims)
    return {"captures": captures, "covered": covered}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", nargs="+")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    lines = ["| run file | capturing steps | " + " | ".join(f"covered at padding {p:g}, buckets x{b:g}"
                                                         for p, b in RULES) + " |",
             "|---|---:|" + "---:|" * len(RULES)]
    for path in args.raw:
        r = replay(path)
        lines.append(f"| `{path.split('/')[-1]}` | {r['captures']} | "
                     + " | ".join(str(r["covered"][rule]) for rule in RULES) + " |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write("# Graph captures a looser covering rule would have avoided\n\n"
                    f"{datetime.date.today()}, CPU analysis of the step logs below (their GPU, torch and Triton: the "
                    f"runs' own result files). Command: `python -m bench.capture_replay {' '.join(args.raw)}`\n\n"
                    + text + "\n")


if __name__ == "__main__":
    main()
