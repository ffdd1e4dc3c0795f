"""Perplexity table of spear-ref-16m on WikiText-2 test: bf16, RTN variants, GPTQ variants.

    PYTHONPATH=$PWD python3 bench/perplexity.py --out bench/results/perplexity.md

Every row goes through ``spear_compile.evaluate.evaluate``; the FP perplexity is measured once
(the bf16 row). Prints a compact table last and writes markdown (+ JSON beside it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from spear_compile.evaluate import default_device, evaluate  # noqa: E402

SPECS = ["none", "w4-pc-rtn", "w4-pc-sym-rtn", "w4-g128-rtn", "w3-pc-rtn", "w4-pc-gptq", "w4-g128-gptq", "w3-pc-gptq"]
REFERENCE = {"none": 56.60, "w4-pc-rtn": 58.31, "w4-pc-sym-rtn": 58.77, "w4-g128-rtn": 57.82, "w3-pc-rtn": 65.98}
RTN_OF = {"w4-pc-gptq": "w4-pc-rtn", "w4-g128-gptq": "w4-g128-rtn", "w3-pc-gptq": "w3-pc-rtn"}


def versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    import transformers
    return f"torch {torch.__version__}, triton {tv}, transformers {transformers.__version__}, python {platform.python_version()}"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})"


def to_markdown(rows, args, device, command, total_s) -> str:
    fp = rows[0]["ppl"]
    lines = [
        "# Perplexity: spear-ref-16m on WikiText-2 test", "",
        f"- device: {device_name(device)}", f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- versions: {versions()}", f"- command: `{command}`",
        f"- protocol: whole file as one token stream, windows of {args.seq_len + 1} tokens with stride {args.seq_len}"
        f" ({rows[0]['windows']} windows, {rows[0]['tokens']:,} predicted tokens{'' if args.max_windows is None else ', capped by --max-windows'}),"
        f" bf16 compute, linears quantized (embeddings and tied lm_head kept in bf16); GPTQ calibrated on"
        f" {args.nsamples} random segments of {args.seq_len} tokens of calib.txt (seed 0), damp 0.01, block 128",
        f"- total time: {total_s:.0f} s", "",
        "| weights | ppl | shared README | deviation | gap vs bf16 | GPTQ closes of RTN gap | model bytes | quantized-weight bytes (stored / nominal) | quantize s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_spec = {r["spec"]: r for r in rows}
    for r in rows:
        ref = REFERENCE.get(r["spec"])
        dev = f"{100 * (r['ppl'] - ref) / ref:+.2f}%" if ref else "–"
        gap = f"{r['ppl'] - fp:+.2f}" if r["spec"] != "none" else "–"
        closes = "–"
        rtn = by_spec.get(RTN_OF.get(r["spec"], ""))
        if rtn is not None and rtn["ppl"] != fp:
            closes = f"{100 * (rtn['ppl'] - r['ppl']) / (rtn['ppl'] - fp):.0f}%"
        qw = f"{r['qbytes']:,} / {r['qbytes_nominal']:,}" if r["qbytes"] else "–"
        lines.append(f"| {r['spec'] if r['spec'] != 'none' else 'bf16'} | {r['ppl']:.3f} | {ref if ref else '–'} | {dev} | {gap} | {closes} | "
                     f"{r['bytes']:,} | {qw} | {r.get('quantize_s') or '–'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/perplexity.md")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = args.device or default_device()
    command = "python3 bench/perplexity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.time()
    rows = []
    specs = args.specs.split(",")
    if specs[0] != "none":
        specs = ["none"] + specs
    fp_ppl = None
    for spec in specs:
        r = evaluate(quant=spec, seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size,
                     device=device, progress=False, nsamples=args.nsamples, fp=(spec == "none"))
        ppl = r["fp_ppl"] if spec == "none" else r["quant_ppl"]
        fp_ppl = fp_ppl or ppl
        rows.append(dict(spec=spec, ppl=ppl, windows=r["windows"], tokens=r["tokens"], bytes=r["model_bytes_quant"],
                         qbytes=r["quantized_weight_bytes"], qbytes_nominal=r["quantized_weight_bytes_nominal"],
                         quantize_s=r.get("quantize_s"), seconds=r["seconds"]))
        print(f"{spec:>14}  ppl {ppl:8.3f}  ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
    md = to_markdown(rows, args, device, command, time.time() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(dict(device=device_name(device), versions=versions(), command=command,
                                                        rows=rows), indent=1))
    print(md)


if __name__ == "__main__":
    main()
