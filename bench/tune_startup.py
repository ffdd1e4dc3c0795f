"""Start-up cost of the dispatch tuner on a fresh machine: candidates compiled serially vs on a thread pool.

For each tuner key (Llama-3.2-1B linears at decode / batched M, with and without a gated r=32 EC) a fresh child
process with an empty Triton cache and no spear tuning cache runs ``dispatch.launch`` once (which tunes the key) and
reports the seconds it took, its pick, and the pick's error vs a float64 dequantize-then-matmul reference. One child
per ``SPEAR_TUNE_COMPILE_THREADS`` value, so the serial and parallel runs compile everything from scratch.

    python3 -m bench.tune_startup [--threads 1,16] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

KEYS = [  # (M, K, N, EC rank)
    (1, 2048, 8192, 32), (1, 8192, 2048, 0), (16, 2048, 2048, 32), (64, 8192, 2048, 0), (256, 2048, 8192, 32),
]


def child(keys):
    import torch
    from spear_compile.lowering import dispatch
    from spear_compile.quant.packing import pack
    torch.manual_seed(0)
    rows = []
    for m, k, n, r in keys:
        q = pack(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8), 4)   # per-channel (group K)
        scale = (torch.rand(n, 1, device="cuda") * 0.01 + 0.002).to(torch.bfloat16)
        zero = torch.randint(4, 12, (n, 1), device="cuda").to(torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ec = {}
        if r:
            ec = dict(ec_A=(torch.randn(r, k, device="cuda") * 0.02).bfloat16(),
                      ec_B=(torch.randn(n, r, device="cuda") * 0.02).bfloat16(),
                      gate_w=(torch.randn(r, r, device="cuda") * 0.1).bfloat16(),
                      gate_b=torch.zeros(r, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = dispatch.launch(x, q, scale, zero, None, k, **ec)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        key = dispatch.linear_key(m, k, n, k, x.dtype, bool(r), bool(r), r)
        timings = dispatch.TUNER.timings.get(key, [])
        rows.append(dict(m=m, k=k, n=n, ec_rank=r, tune_s=round(secs, 2), pick=dispatch.TUNER.picks[key].name,
                         candidates=len(timings), finite=bool(torch.isfinite(y).all())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _text(b) -> str:
    return b.decode() if isinstance(b, bytes) else (b or "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--keys", default=",".join(str(i) for i in range(len(KEYS))), help="indices into KEYS")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per child (rows so far are kept)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        child([KEYS[int(i)] for i in args.keys.split(",")])
        return
    import torch
    import triton
    env_line = (f"{torch.cuda.get_device_name()}, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
                f"torch {torch.__version__}, triton {triton.__version__}, {os.cpu_count()} CPUs. "
                f"Command: `python3 -m bench.tune_startup --threads {args.threads}`")
    results = {}
    for t in [int(v) for v in args.threads.split(",")]:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, SPEAR_TUNE_COMPILE_THREADS=str(t), SPEAR_TUNE_CACHE="0", TRITON_CACHE_DIR=cache)
            t0 = time.perf_counter()
            try:
                res = subprocess.run([sys.executable, "-m", "bench.tune_startup", "--child", "--keys", args.keys],
                                     env=env, capture_output=True, text=True, timeout=args.child_timeout)
                stdout, stderr, failed = res.stdout, res.stderr, res.returncode != 0
            except subprocess.TimeoutExpired as e:
                stdout, stderr, failed = _text(e.stdout), _text(e.stderr), True
            total = time.perf_counter() - t0
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if failed:
            print(stderr[-3000:])
        results[t] = (rows, total)
        print(f"threads={t}: {total:.1f} s", flush=True)
    lines = ["# Tuner start-up: candidate kernels compiled serially vs on a thread pool", "", env_line, "",
             "Each key tuned once in a fresh process (empty Triton cache, no spear tuning cache).", "",
             "| M | K | N | EC r | candidates | " + " | ".join(f"s, {t} thr | pick, {t} thr" for t in results) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(results)]
    base = max((rows for rows, _ in results.values()), key=len)
    for i, r in enumerate(base):
        cells = []
        for t, (rows, _) in results.items():
            row = rows[i] if i < len(rows) else {}
            cells += [str(row.get("tune_s", "-")), str(row.get("pick", "-"))]
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['ec_rank']} | {r['candidates']} | " + " | ".join(cells) + " |")
    lines += ["", "| threads | total s (process, incl. import and CUDA init) |", "|---|---|"]
    lines += [f"| {t} | {total:.1f} |" for t, (_, total) in results.items()]
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_startup.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
