"""``spear-compile calibrate``: the command line of the calibrate pipeline (``pipeline.calibrate``)."""
from __future__ import annotations

from pathlib import Path

from ..cli import positive_int
from .module import GATES
from .diagnostic import SCORES
from .placement import MODES
from .pipeline import (ALLOCS, CONFIG_TRAIN, DEFAULT_RANK, DIAGNOSTIC_ALLOC, DIAGNOSTIC_RANK, DIAGNOSTIC_SCORE,
                       TRAIN_DEFAULTS, calibrate)
from ..evaluate import DEFAULT_CALIB, DEFAULT_MODEL


def add_cli(subparsers) -> None:
    """Register ``spear-compile calibrate``."""
    p = subparsers.add_parser("calibrate", help="fit error compensators for a quantized model")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--quant", default="w4-pc-rtn")
    p.add_argument("--calib", default=str(DEFAULT_CALIB))
    p.add_argument("--budget", type=float, default=0.01)
    p.add_argument("--out", required=True)
    p.add_argument("--gate", default="sigmoid", choices=GATES)
    p.add_argument("--placement", default="diagnostic", choices=MODES)
    p.add_argument("--rank", type=int, default=None,
                   help=f"EC rank (with --alloc capture: the largest rank); default {DIAGNOSTIC_RANK} for the "
                        f"diagnostic placement, else {DEFAULT_RANK}")
    p.add_argument("--score", default=None, choices=SCORES,
                   help=f"diagnostic score the placement ranks by (default {DIAGNOSTIC_SCORE}; 'local' placement: "
                        "local_score)")
    p.add_argument("--alloc", default=None, choices=ALLOCS,
                   help="'fixed' rank by score, 'per_byte' fixed rank by score per byte, or 'capture': ranks allocated "
                        f"by score x captured error share per byte (default {DIAGNOSTIC_ALLOC})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {TRAIN_DEFAULTS['steps']}; per config: "
                        + ", ".join(f"{k} {v['steps']}" for k, v in CONFIG_TRAIN.items() if "steps" in v) + ")")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {TRAIN_DEFAULTS['lr']:g}; per config: "
                        + ", ".join(f"{k} {v['lr']:g}" for k, v in CONFIG_TRAIN.items() if "lr" in v) + ")")
    p.add_argument("--topk", type=int, default=None,
                   help="training loss: KL over the FP model's top-k tokens + a rest bucket (cached), 0 = the "
                        "full-vocabulary KL with the FP model run beside each step (default: per config, "
                        + ", ".join(f"{k} {v['topk']}" for k, v in CONFIG_TRAIN.items() if "topk" in v)
                        + "; else the cached top-64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--seq-len", type=positive_int, default=256, help="calibration window length in tokens")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="use at most this many calibration windows of --seq-len tokens (default: the whole file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was written, sizes, held-out KL) "
                                                       "as the last stdout line")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    import json

    if args.no_progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    _, manifest = calibrate(args.model, args.quant, args.calib, budget=args.budget, gate=args.gate,
                            placement=args.placement, rank=args.rank, steps=args.steps, lr=args.lr,
                            seed=args.seed, out_dir=args.out, device=args.device, score=args.score, alloc=args.alloc,
                            topk="auto" if args.topk is None else args.topk, n_windows=args.max_windows,
                            seq_len=args.seq_len,
                            progress=not args.no_progress)
    files = manifest.get("files_written", [])
    if args.json:
        keys = ("quant", "budget", "budget_bytes", "ec_bytes", "ranks", "steps", "lr", "kl_heldout", "timings")
        print(json.dumps(dict({k: manifest.get(k) for k in keys}, out=args.out, files_written=files,
                              modules=len(manifest["modules"])), default=str))
    else:
        print(f"wrote {len(manifest['modules'])} ECs ({manifest['ec_bytes']} bytes, budget {manifest['budget_bytes']}) "
              f"to {args.out}: {', '.join(Path(f).name for f in files)}")
    return 0
