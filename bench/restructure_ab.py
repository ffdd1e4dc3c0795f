"""A/B of the restructure on one GPU, in one call: the per-layer kernel table (``bench/kernels.py``, both models,
M = 1, 16, 2048) and the end-to-end batch-1 decode (``bench/decode_e2e.py``) of the old tree and the new one, and
the Triton kernels' compiled code of both compared.

Run from the repository root (the new tree) with the old tree unpacked at ``bench/scratch/old``
(``git archive e44cd3e | tar -x -C bench/scratch/old --exclude spear_compile/assets``), e.g. through
``bench/restructure_ab.sh``:

    PYTHONUNBUFFERED=1 python3 -m bench.restructure_ab --out $OUT

Each tree runs its own scripts against its own package (the old ``bench/*.py`` put their tree first on
``sys.path``; the new ones run as ``python -m bench.X`` from their root) with a Triton cache of its own, so every
kernel is compiled in this call. Compiled code: for each kernel name, the PTX of every specialization either tree
compiled, with debug lines and locations (``.loc``, ``.file``, ``//`` comments, debug sections) removed, hashed;
a new specialization whose hash is among the old ones is identical. Order: old kernels, new kernels, old decode,
new decode (each step under its own timeout; ``--budget`` seconds in all; ``--steps kernels`` / ``--steps e2e`` runs
one half, for two calls when one is too short). Prints one table last.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.path.dirname(HERE)
OLD = os.path.join(HERE, "scratch", "old")
OPS = "bf16,ours_pc,ours_g128,fused,fused_pc,compiled_w4,compiled"
KERNEL_COLS = ("bf16", "ours pc", "ours g128", "fused EC", "fused EC pc", "compiled W4", "compiled EC", "bf16 again")
E2E_VARIANTS = "spear+ec+lmhead+sg,bf16"


def run_step(name, cmd, cwd, env, timeout, log_path):
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[{name}] rc={rc} {time.time() - t0:.0f}s ({log_path})", flush=True)
    return rc


def kernel_table(md_path):
    """{(model, M): {column: value}} from a kernels.md written by bench/kernels.py."""
    if not os.path.exists(md_path):
        return {}
    lines = open(md_path).read().splitlines()
    head = next((i for i, l in enumerate(lines) if l.startswith("| model | M |")), None)
    if head is None:
        return {}
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    out = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rec = dict(zip(cols, cells))
        out[(rec["model"], rec["M"])] = rec
    return out


def e2e_rows(log_path):
    """{variant: tok/s} from the JSON rows decode_e2e.py prints."""
    out = {}
    if not os.path.exists(log_path):
        return out
    for line in open(log_path, errors="replace"):
        line = line.strip()
        if line.startswith("{") and '"check": "e2e"' in line:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "tok_per_s" in r:
                out[r["variant"]] = r["tok_per_s"]
    return out


_DROP = re.compile(r"^\s*(\.loc|\.file|//)")


def normalized_ptx(path):
    text = open(path, errors="replace").read()
    cut = re.search(r"^\s*\.section\s+\.debug", text, flags=re.M)
    if cut:
        text = text[:cut.start()]
    return "\n".join(line for line in text.splitlines() if not _DROP.match(line)).strip()


def compiled_code(cache_dir):
    """{kernel name: {hash of its normalized PTX}} over every specialization in a Triton cache directory."""
    out = {}
    for path in glob.glob(os.path.join(cache_dir, "*", "*.ptx")):
        name = os.path.splitext(os.path.basename(path))[0]
        out.setdefault(name, set()).add(hashlib.sha256(normalized_ptx(path).encode()).hexdigest()[:16])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "ab_out"))
    ap.add_argument("--budget", type=float, default=520.0, help="seconds for the four steps together")
    ap.add_argument("--old", default=OLD)
    ap.add_argument("--steps", default="kernels,e2e", help="kernels, e2e or both (split them over two calls if the "
                                                            "budget is short)")
    ap.add_argument("--models", default="Llama-3.2-1B,Llama-2-7B")
    ap.add_argument("--ms", default="1,16,2048")
    ap.add_argument("--ops", default=OPS, help="bench/kernels.py --ops (fewer: less cold tuning in the old tree, whose "
                    "7B rows never fit the budget in session 21)")
    ap.add_argument("--variants", default=E2E_VARIANTS, help="decode_e2e variants, first ones first")
    args = ap.parse_args()
    wanted = set(args.steps.split(","))
    args.out = os.path.abspath(args.out)  # the old tree's steps run with cwd = the old tree
    os.makedirs(args.out, exist_ok=True)
    # the Triton caches (hundreds of files) outside --out: a device call brings back at most 8 files from $OUT
    caches = tempfile.mkdtemp(prefix="restructure_ab_triton_")
    if not os.path.isdir(os.path.join(args.old, "spear_compile")):
        raise SystemExit(f"no old tree at {args.old}: git archive e44cd3e | tar -x -C {args.old} "
                         "--exclude spear_compile/assets")
    share = ({"kernels": 0.30, "e2e": 0.19} if wanted >= {"kernels", "e2e"} else
             {"kernels": 0.49, "e2e": 0.0} if "kernels" in wanted else {"kernels": 0.0, "e2e": 0.49})  # per tree
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", SPEAR_TUNE_CACHE="0")
    steps = []
    for tag, root in (("old", args.old), ("new", NEW)) if "kernels" in wanted else ():
        env = dict(base_env, TRITON_CACHE_DIR=os.path.join(caches, f"triton_cache_{tag}"))
        entry = [sys.executable, "bench/kernels.py"] if tag == "old" else [sys.executable, "-m", "bench.kernels"]
        kb = share["kernels"] * args.budget
        steps.append((f"kernels {tag}", entry + ["--out", os.path.join(args.out, f"kernels_{tag}"),
                                                  "--models", args.models, "--ms", args.ms,
                                                  "--ops", args.ops, "--budget", str(int(kb - 40))], root, env, kb))
    for tag, root in (("old", args.old), ("new", NEW)) if "e2e" in wanted else ():
        env = dict(base_env, TRITON_CACHE_DIR=os.path.join(caches, f"triton_cache_{tag}"))
        entry = [sys.executable, "bench/decode_e2e.py"] if tag == "old" else [sys.executable, "-m", "bench.decode_e2e"]
        eb = share["e2e"] * args.budget
        steps.append((f"e2e {tag}", entry + ["--skip-ref", "--skip-kernel", "--skip-variants", "--variants",
                                              args.variants, "--reps", "3", "--deadline", str(int(eb - 45)),
                                              "--out", os.path.join(args.out, f"e2e_{tag}")], root, env, eb))
    status = {}
    for name, cmd, cwd, env, timeout in steps:
        status[name] = run_step(name, cmd, cwd, env, timeout, os.path.join(args.out, name.replace(" ", "_") + ".log"))

    lines = ["# Restructure A/B (old = e44cd3e, new = this tree), one call", "",
             "steps: " + ", ".join(f"{k} rc={v}" for k, v in status.items()), "",
             "## Per-layer µs (bench/kernels.py), old / new", "",
             "| model | M | " + " | ".join(KERNEL_COLS) + " |", "|---|---|" + "---|" * len(KERNEL_COLS)]
    old_k = kernel_table(os.path.join(args.out, "kernels_old", "kernels.md"))
    new_k = kernel_table(os.path.join(args.out, "kernels_new", "kernels.md"))
    for key in sorted(set(old_k) | set(new_k), key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0)):
        o, n = old_k.get(key, {}), new_k.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{o.get(c, '-')} / {n.get(c, '-')}" for c in KERNEL_COLS)
                     + " |")
    lines += ["", "(bf16 vs bf16 again: the run-to-run spread of one run)", "", "## Decode tok/s (bench/decode_e2e.py)", "",
              "| variant | old | new | new/old |", "|---|---|---|---|"]
    old_e, new_e = (e2e_rows(os.path.join(args.out, f"e2e_{t}.log")) for t in ("old", "new"))
    for v in args.variants.split(","):
        o, n = old_e.get(v), new_e.get(v)
        lines.append(f"| {v} | {o or '-'} | {n or '-'} | {f'{n / o:.3f}' if o and n else '-'} |")
    lines += ["", "## Compiled code (normalized PTX per specialization)", "",
              "| kernel | specializations old | new | new identical to an old one |", "|---|---|---|---|"]
    old_c = compiled_code(os.path.join(caches, "triton_cache_old"))
    new_c = compiled_code(os.path.join(caches, "triton_cache_new"))
    ours = lambda name: not name.startswith("triton_")  # noqa: E731  (Inductor's generated kernels: summed below)
    for name in sorted(k for k in set(old_c) | set(new_c) if ours(k)):
        o, n = old_c.get(name, set()), new_c.get(name, set())
        lines.append(f"| {name} | {len(o)} | {len(n)} | {len(n & o)}{'' if n <= o else '  <-- differs'} |")
    io = set().union(*[v for k, v in old_c.items() if not ours(k)] or [set()])
    inew = set().union(*[v for k, v in new_c.items() if not ours(k)] or [set()])
    lines.append(f"| Inductor-generated (all) | {len(io)} | {len(inew)} | {len(inew & io)} |")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "restructure_ab.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
