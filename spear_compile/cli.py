"""``spear-compile`` command line: ``eval`` here, and one subcommand per entry of ``SUBCOMMANDS``.

Each module in ``SUBCOMMANDS`` provides ``add_cli(subparsers)`` (adds its subparser and
``set_defaults(func=...)``); the table is explicit and every module in it must import. A ``SpearError``
prints ``spear-compile: error: <message>`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Optional, Sequence

from .errors import SpearError

SUBCOMMANDS = {"calibrate": "spear_compile.ec.cli", "inspect": "spear_compile.compile.inspection",
               "serve": "spear_compile.serving.cli"}

TABLE_KEYS = ("model", "data", "quant", "device", "seq_len", "windows", "tokens", "fp_ppl", "quant_ppl",
              "ec_ppl", "gap_recovered", "model_bytes_fp", "model_bytes_quant", "quantized_weight_bytes",
              "quantized_weight_bytes_nominal", "ec_bytes", "ec_fraction", "quantize_s", "seconds")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def format_table(result: dict) -> str:
    rows = [(k, _fmt(result[k])) for k in TABLE_KEYS if result.get(k) is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _run_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, args.data, args.quant, seq_len=args.seq_len, max_windows=args.max_windows,
                      ec_dir=args.ec, batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                      calib_path=args.calib, nsamples=args.nsamples)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def add_eval_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of the FP vs quantized (vs EC) model")
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: bundled spear-ref-16m)")
    p.add_argument("--data", default=None, help="text file (default: bundled wikitext2_test.txt)")
    p.add_argument("--quant", default="w4-pc-rtn", help="quant spec, e.g. w4-pc-rtn, w4-g128-gptq, none")
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--max-windows", type=positive_int, default=None)
    p.add_argument("--ec", default=None, help="directory of ECs written by `spear-compile calibrate`")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--calib", default=None, help="GPTQ calibration text (default: bundled calib.txt)")
    p.add_argument("--nsamples", type=positive_int, default=128, help="GPTQ calibration segments of --seq-len tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spear-compile",
                                     description="SPEAR: low-bit LLMs with gated error compensators")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_cli(subparsers)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_cli(subparsers)
    return parser


# What a user's input can raise past the checks (a file unreadable, not UTF-8, not JSON): reported
# as one line. Anything else is a bug in spear_compile and keeps its traceback.
USER_ERRORS = (SpearError, OSError, UnicodeError, json.JSONDecodeError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import quiet

    quiet.quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # as given (serve --tp relaunches with it)
    try:
        with quiet.quiet_warnings():
            return int(args.func(args) or 0)
    except USER_ERRORS as e:
        msg = str(e) if isinstance(e, SpearError) else f"{type(e).__name__}: {e}"
        print(f"spear-compile: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spear-compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
