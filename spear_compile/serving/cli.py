"""``spear-compile serve``: the OpenAI-compatible server (uvicorn) over an engine built from a model directory.

Every option is checked before the model is loaded (a bad one exits 2 with ``spear-compile: error: ...``), the
port included (bound once, then released for uvicorn). The server listens on 127.0.0.1 unless ``--host`` says
otherwise.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..errors import SpearError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CPU_PROFILE_POINTS = 16   # eager CPU steps are slow: a small step-cost sweep for SLO policies


def add_cli(subparsers) -> None:
    """Register ``spear-compile serve``."""
    from ..evaluate import DEFAULT_MODEL

    p = subparsers.add_parser("serve", help="serve a (quantized) model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health, /metrics.")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="Hugging Face model directory (default: bundled spear-ref-16m)")
    p.add_argument("--quant", default="w4-pc-rtn", help="quant spec, e.g. w4-pc-rtn, w4-g128-rtn, or none (bf16)")
    p.add_argument("--ec", default=None, help="directory of ECs written by `spear-compile calibrate`")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-batch", type=int, default=64, help="most requests running at once (default 64)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens per request, prompt + completion (default: the model's context)")
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="most tokens in one engine step, the largest compiled token bucket (default 2048)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: from free memory)")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="time-to-first-token target for SLO policies")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="time-per-output-token target for SLO policies")
    p.add_argument("--policy", default=None,
                   help="scheduler policy: fifo, budget-<n> (e.g. budget-512), slo, slo-ec-blind "
                        "(default: the engine's)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--eager", action="store_true",
                   help="no torch.compile and no CUDA graphs (the default on CPU)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_run_serve)


def check_args(args: argparse.Namespace) -> str:
    """Refuse bad options before anything is loaded; returns the device."""
    import torch

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SpearError(f"serve: --model {args.model}: not a Hugging Face model directory (no config.json)")
    if args.ec is not None and not Path(args.ec).is_dir():
        raise SpearError(f"serve: --ec {args.ec}: no such directory")
    from ..quant.api import as_config
    as_config(args.quant)   # raises SpearError naming the spec
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise SpearError(f"serve: --device {device!r}: expected cuda or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpearError(f"serve: --device {device}: no CUDA device is available (use --device cpu)")
    if not 1 <= args.port <= 65535:
        raise SpearError(f"serve: --port {args.port}: expected 1..65535")
    for name in ("max_batch", "max_model_len", "max_num_tokens", "num_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SpearError(f"serve: --{name.replace('_', '-')} {value}: expected a positive integer")
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SpearError(f"serve: --{name.replace('_', '-')} {value}: expected a positive number of ms")
    if args.policy is not None:
        if args.policy.startswith("slo"):
            from .scheduler.slo import SLO_POLICY_NAMES
            if args.policy not in SLO_POLICY_NAMES:
                raise SpearError(f"serve: --policy {args.policy}: expected fifo, budget-<n> or one of "
                                 f"{', '.join(SLO_POLICY_NAMES)}")
        else:
            from .scheduler.policies import make_policy
            make_policy(args.policy)
    _check_port_free(args.host, args.port)
    return device


def _check_port_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SpearError(f"serve: --host {host}: cannot resolve ({e})") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SpearError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from e


def _run_serve(args) -> int:
    device = check_args(args)
    import uvicorn

    from .async_engine import AsyncEngine
    from .config import EngineConfig
    from .engine import Engine
    from .server import build_app

    fast = device.startswith("cuda") and not args.eager
    options = dict(max_num_seqs=args.max_batch, device=device, compile=fast, cuda_graphs=fast,
                   ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms, max_model_len=args.max_model_len,
                   num_blocks=args.num_blocks)
    if args.policy is not None:  # an SLO policy profiles the engine's step cost model at start-up (cached on disk)
        options["policy"] = args.policy
        if args.policy.startswith("slo") and not device.startswith("cuda"):
            options["profile_points"] = CPU_PROFILE_POINTS  # eager CPU steps are slow: a small sweep
    if args.max_num_tokens is not None:
        options["max_num_tokens"] = args.max_num_tokens   # EngineConfig refuses one below --max-batch
    elif args.max_batch > EngineConfig.max_num_tokens:
        options["max_num_tokens"] = args.max_batch
    config = EngineConfig(**options)
    quant = None if args.quant == "none" else args.quant
    print(f"spear-compile serve: loading {args.model} (quant {args.quant}, ec {args.ec}, device {device})",
          file=sys.stderr)
    engine = Engine.from_pretrained(args.model, quant=quant, ec=args.ec, config=config)
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(AsyncEngine(engine), name)
    print(f"spear-compile serve: model '{name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: no traceback
        pass
    return 0
