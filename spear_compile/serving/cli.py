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
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (GPUs; on CPU, processes): relaunches itself under torchrun")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="activations and unquantized weights (default bfloat16)")
    p.add_argument("--quant-lm-head", action="store_true", help="quantize the LM head too (as gpt-fast and torchao do)")
    p.add_argument("--no-peer-reduce", action="store_true",
                   help="with --tp on CUDA: all-reduce the row-parallel ECs' u instead of the peer-reduction epilogue")
    p.add_argument("--overlap-decode", action="store_true",
                   help="launch each decode step before the previous one's tokens are read back (docs/serving.md)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV blocks of prompt prefixes already computed (docs/serving.md)")
    p.add_argument("--decode-attention", default="torch", choices=("torch", "triton"),
                   help="decode rows' attention: torch ops (gather, matmuls, softmax; default) or one paged Triton "
                        "kernel per layer")
    p.add_argument("--eager", action="store_true",
                   help="no torch.compile and no CUDA graphs (the default on CPU)")
    p.add_argument("--compile-regions", action="store_true",
                   help="compile one decoder layer (per distinct layer structure) and the LM head instead of the "
                        "whole model per phase: a fraction of the start-up compile time (docs/serving.md)")
    p.add_argument("--mixed-cuda-graphs", type=int, default=None,
                   help="most mixed-step (prefill + decode) CUDA graphs, each captured at its shapes' first step "
                        "(default 1024; 0: mixed steps run uncaptured, decode steps still replay graphs)")
    p.add_argument("--mixed-graph-padding", type=float, default=None,
                   help="a mixed step with no graph of its own replays a captured one of larger shapes, its attention "
                        "padded at most this many times (default 2; 0: off, every new shape captures its own)")
    p.add_argument("--mixed-graph-bucket-padding", type=float, default=None,
                   help="that graph may also have up to this many times the step's tokens and decode rows (default 2; "
                        "1: the same)")
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
    if args.quant_lm_head and args.quant == "none":
        raise SpearError("serve: --quant-lm-head needs --quant (not none)")
    for name in ("tp", "max_batch", "max_model_len", "max_num_tokens", "num_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SpearError(f"serve: --{name.replace('_', '-')} {value}: expected a positive integer")
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SpearError(f"serve: --{name.replace('_', '-')} {value}: expected a positive number of ms")
    if args.mixed_cuda_graphs is not None and args.mixed_cuda_graphs < 0:
        raise SpearError(f"serve: --mixed-cuda-graphs {args.mixed_cuda_graphs}: expected an integer >= 0")
    if args.mixed_graph_padding is not None and not (args.mixed_graph_padding == 0
                                                     or 1 <= args.mixed_graph_padding <= 64):
        raise SpearError(f"serve: --mixed-graph-padding {args.mixed_graph_padding}: expected 0 (off) or a number in "
                         "[1, 64]")
    if args.mixed_graph_bucket_padding is not None and not 1 <= args.mixed_graph_bucket_padding <= 64:
        raise SpearError(f"serve: --mixed-graph-bucket-padding {args.mixed_graph_bucket_padding}: expected a number in "
                         "[1, 64]")
    if args.compile_regions and args.tp > 1:
        raise SpearError("serve: --compile-regions is not supported with --tp > 1 yet (tensor parallelism compiles "
                         "the whole model: its peer-reduction epilogue needs static decode rows)")
    if args.policy is not None:
        if args.policy.startswith("slo"):
            from .scheduler.slo import SLO_POLICY_NAMES
            if args.policy not in SLO_POLICY_NAMES:
                raise SpearError(f"serve: --policy {args.policy}: expected fifo, budget-<n> or one of "
                                 f"{', '.join(SLO_POLICY_NAMES)}")
        else:
            from .scheduler.policies import make_policy
            make_policy(args.policy)
    if args.tp > 1:
        from ..options import torchrun_launch
        launch = torchrun_launch()
        if launch.world_size is not None and launch.world_size != args.tp:
            raise SpearError(f"serve: --tp {args.tp} under torchrun with WORLD_SIZE={launch.world_size}")
        if device.startswith("cuda") and launch.world_size is None and torch.cuda.device_count() < args.tp:
            raise SpearError(f"serve: --tp {args.tp}: only {torch.cuda.device_count()} CUDA devices")
        if device.startswith("cuda:"):
            raise SpearError(f"serve: --device {device} with --tp: each rank takes cuda:LOCAL_RANK (say --device cuda)")
        if args.overlap_decode:
            raise SpearError("serve: --overlap-decode with --tp: not supported (the other ranks replay host inputs)")
        if launch.local_rank:  # a follower rank: rank 0 alone listens
            return device
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


def _run_ranks(tp: int, argv: list) -> int:
    """``serve --tp N`` started by hand: run N copies of this command as ranks, as ``torchrun`` would (torch's elastic
    launcher, in this process). A rank's user error prints its own one line (exit 2 here); Ctrl-C or SIGTERM here
    stops every rank (exit 0)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):   # the launcher's own notices ("Received 2 death signal")
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "spear_compile.cli", *argv)
    except SignalException:
        return 0
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {2}:   # user errors: each rank printed its one line
            return 2
        raise SpearError(f"serve --tp {tp}: rank(s) {sorted(e.failures)} exited with {sorted(codes)}") from None
    return 0


def _run_serve(args) -> int:
    device = check_args(args)
    if args.tp > 1:
        from ..options import torchrun_launch
        if torchrun_launch().world_size is None:
            return _run_ranks(args.tp, args.argv)
    import torch
    import uvicorn

    from .async_engine import AsyncEngine
    from .config import EngineConfig
    from .engine import Engine
    from .server import build_app

    fast = device.startswith("cuda") and not args.eager
    options = dict(max_num_seqs=args.max_batch, device=device, compile=fast, cuda_graphs=fast,
                   ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms, max_model_len=args.max_model_len,
                   num_blocks=args.num_blocks, progress=args.tp == 1, dtype=getattr(torch, args.dtype),
                   overlap_decode=args.overlap_decode, decode_attention=args.decode_attention,
                   enable_prefix_caching=args.enable_prefix_caching, compile_regions=args.compile_regions)
    if args.policy is not None:  # an SLO policy profiles the engine's step cost model at start-up (cached on disk)
        options["policy"] = args.policy
        if args.policy.startswith("slo") and not device.startswith("cuda"):
            options["profile_points"] = CPU_PROFILE_POINTS  # eager CPU steps are slow: a small sweep
    if args.mixed_cuda_graphs is not None:
        options["mixed_cuda_graphs"] = args.mixed_cuda_graphs
    if args.mixed_graph_padding is not None:
        options["mixed_graph_padding"] = args.mixed_graph_padding
    if args.mixed_graph_bucket_padding is not None:
        options["mixed_graph_bucket_padding"] = args.mixed_graph_bucket_padding
    if args.max_num_tokens is not None:
        options["max_num_tokens"] = args.max_num_tokens   # EngineConfig refuses one below --max-batch
    elif args.max_batch > EngineConfig.max_num_tokens:
        options["max_num_tokens"] = args.max_batch
    config = EngineConfig(**options)
    quant = None if args.quant == "none" else args.quant
    name = args.served_model_name or Path(args.model).resolve().name
    if args.tp > 1:
        from .tensor_parallel import start_engine
        engine = start_engine(args.model, quant=quant, ec=args.ec, config=config, quantize_lm_head=args.quant_lm_head,
                              peer_reduce=not args.no_peer_reduce, model_name=name)
        if engine is None:   # a follower rank: rank 0 closed the engine
            return 0
    else:
        print(f"spear-compile serve: loading {args.model} (quant {args.quant}, ec {args.ec}, device {device})",
              file=sys.stderr)
        engine = Engine.from_pretrained(args.model, quant=quant, ec=args.ec, config=config,
                                        quantize_lm_head=args.quant_lm_head)
    app = build_app(AsyncEngine(engine), name)
    tp = f", tensor parallel over {args.tp} ranks" if args.tp > 1 else ""
    print(f"spear-compile serve: model '{name}' on http://{args.host}:{args.port}/v1{tp}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: no traceback
        pass
    finally:
        engine.close()   # tensor parallelism: the follower ranks leave their step loop
    return 0
