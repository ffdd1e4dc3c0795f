"""``calibrate``: quantize a model, diagnose it, place ECs under a byte budget, initialise them by
activation-aware SVD and train them jointly against the FP model's logits.

Two steps, so that sweeps reuse the expensive part: ``prepare`` (load, quantize, diagnose,
second moments, cached FP logits) and ``fit`` (placement, init, training, export).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .config import QuantConfig
from .diagnostic import diagnose, save_report
from .ec import GATES, CompensatedLinear
from .ec_init import input_second_moments, svd_init_
from .ec_io import model_identity, save_ecs
from .ec_train import cast_model_, densify_, mean_kl, teacher_topk, train_ecs
from .errors import SpearError
from .evaluate import DEFAULT_CALIB, DEFAULT_MODEL, calibration_tokens
from .memory import model_bytes
from .perplexity import tokenize_file, windows
from .placement import MODES, check_budget, place
from .qtensor import QuantizedWeight
from .quantize import quantize



@dataclass
class Prepared:
    """Everything ``fit`` needs, computed once per (model, quant config, calibration set)."""
    config: QuantConfig
    q_model: nn.Module            # quantized model in its storage dtype (what gets ECs and ships)
    fp_work: nn.Module            # FP model, fp32, on the work device
    q_work: nn.Module             # quantized model, dequantized dense fp32, on the work device
    wins: torch.Tensor            # [W, T] calibration tokens (training)
    teacher: tuple                # FP top-k (log-probs, ids) [W, T, k] of wins
    heldout: torch.Tensor         # [H, T] held-out calibration tokens
    heldout_teacher: tuple
    scores: Dict[str, dict]
    sigmas: Dict[str, torch.Tensor]
    quant_bytes: int
    identity: dict
    timings: dict = field(default_factory=dict)
    heldout_kl_quantized: Optional[float] = None


def _load(model_or_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        path = getattr(getattr(model, "config", None), "_name_or_path", None)
    else:
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise SpearError(f"calibrate: {str(path)!r} is not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tok = None
    if path and Path(str(path)).is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


def calibration_windows(calib, tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    """``[W, seq_len]`` token windows from a text file path or a ``[W, T]`` LongTensor."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0 or calib.dtype not in (torch.int32, torch.int64):
            raise SpearError(f"calibrate: calibration tensor must be a non-empty [W, T] integer tensor, got {tuple(calib.shape)} {calib.dtype}")
        return calib[:n_windows].long()
    if tokenizer is None:
        raise SpearError("calibrate: a text calibration file needs the model's tokenizer; pass a model path or token windows")
    ids = tokenize_file(tokenizer, calib)
    return windows(ids, seq_len, n_windows, source=str(calib))[:, :seq_len].contiguous()


def prepare(model=DEFAULT_MODEL, quant: Union[str, QuantConfig] = "w4-pc-rtn", calib=DEFAULT_CALIB,
            seq_len: int = 256, n_windows: Optional[int] = None, n_diag: int = 64, n_heldout: int = 16,
            topk: int = 64, device=None, dtype=torch.bfloat16, progress: bool = True) -> Prepared:
    """Load and quantize ``model``; diagnose and take input second moments on the first
    ``n_diag`` calibration windows; cache FP top-``topk`` outputs; hold out the last
    ``n_heldout`` windows (never trained on) to report held-out KL."""
    t0 = time.time()
    cfg = QuantConfig.from_spec(quant) if isinstance(quant, str) else quant
    if not isinstance(cfg, QuantConfig):
        raise SpearError(f"calibrate: quant must be a quantization spec such as 'w4-pc-rtn', got {quant!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fp_model, tok = _load(model, dtype)
    if any(isinstance(m, CompensatedLinear) or isinstance(getattr(m, "weight", None), QuantizedWeight)
           for m in fp_model.modules()):
        raise SpearError("calibrate: pass the floating-point model; it is quantized here")
    all_wins = calibration_windows(calib, tok, seq_len, n_windows)
    n_heldout = min(n_heldout, all_wins.shape[0] // 4)
    wins, heldout = all_wins[:all_wins.shape[0] - n_heldout], all_wins[all_wins.shape[0] - n_heldout:]
    gptq_calib = wins[:128]
    if cfg.method == "gptq" and not isinstance(calib, torch.Tensor):
        # The same samples `spear-compile eval` quantizes with, so ECs meet the W_q they were fitted on.
        gptq_calib = calibration_tokens(tok, calib, nsamples=128, seq_len=512)
    q_model = quantize(copy.deepcopy(fp_model).to(device), cfg, calib=gptq_calib, progress=progress)
    names = [n for n, m in q_model.named_modules() if isinstance(getattr(m, "weight", None), QuantizedWeight)]
    quant_bytes = model_bytes(q_model)["total"]
    fp_work = cast_model_(copy.deepcopy(fp_model), torch.float32).to(device).eval()
    q_work = densify_(cast_model_(copy.deepcopy(q_model), torch.float32))
    _to_device_(q_work, device)
    q_work.eval()
    t1 = time.time()
    scores = diagnose(fp_work, q_work, wins[:n_diag], names)
    sigmas = input_second_moments(fp_work, wins[:n_diag], names)
    teacher = teacher_topk(fp_work, wins, topk)
    heldout_teacher = teacher_topk(fp_work, heldout, topk) if n_heldout else None
    kl_q = mean_kl(q_work, heldout, heldout_teacher) if n_heldout else None
    t2 = time.time()
    return Prepared(cfg, q_model, fp_work, q_work, wins, teacher, heldout, heldout_teacher, scores, sigmas,
                    quant_bytes, model_identity(fp_model),
                    {"load_quantize_s": t1 - t0, "diagnose_teacher_s": t2 - t1}, kl_q)


def _to_device_(model: nn.Module, device) -> nn.Module:
    """``model.to(device)`` that also moves ``QuantizedWeight`` tensors."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, QuantizedWeight):
                qw = QuantizedWeight(p.qdata.to(device), p.scale.to(device), p.zero.to(device), p.bits,
                                     p.group_size, p.symmetric, p.shape)
                setattr(mod, name, nn.Parameter(qw, requires_grad=False))
            else:
                p.data = p.data.to(device)
        for name, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[name] = b.to(device)
    return model


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fit(prep: Prepared, budget: float = 0.01, gate: str = "sigmoid", placement: str = "diagnostic",
        rank: int = 8, steps: int = 600, lr: float = 1e-3, batch_size: int = 8, gate_lr_mult: float = 1.0,
        init: str = "svd", per_byte: bool = False, seed: int = 0, out_dir=None, progress: bool = True):
    """Place, initialise and train ECs on a prepared model; returns ``(model, manifest)``:
    a copy of the quantized model (storage dtype) with ``CompensatedLinear`` modules."""
    check_budget(budget)
    if gate not in GATES:
        raise SpearError(f"calibrate: unknown gate {gate!r}; supported: {GATES}")
    if placement not in MODES:
        raise SpearError(f"calibrate: unknown placement {placement!r}; supported: {MODES}")
    if init not in ("svd", "zero"):
        raise SpearError(f"calibrate: unknown init {init!r}; supported: ('svd', 'zero')")
    t0 = time.time()
    torch.manual_seed(seed)
    modules = dict(prep.q_work.named_modules())
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in prep.scores}
    store_dtype = next(p for p in prep.q_model.parameters() if not isinstance(p, QuantizedWeight)).dtype
    bpp = torch.empty((), dtype=store_dtype).element_size()
    budget_bytes = int(math.floor(budget * prep.quant_bytes))
    ranks = place(shapes, budget_bytes, placement, {n: s["score"] for n, s in prep.scores.items()},
                  rank=rank, gate=gate, bytes_per_param=bpp, seed=seed, per_byte=per_byte)

    work = copy.deepcopy(prep.q_work)
    fp_weights = dict(prep.fp_work.named_modules())
    for name, r in ranks.items():
        ec = CompensatedLinear.wrap(modules[name], r, gate, dtype=torch.float32)
        _swap(work, name, ec)
    work_mods = dict(work.named_modules())
    for name in ranks:
        ec = work_mods[name]
        if init == "svd":
            svd_init_(ec, fp_weights[name].weight.detach(), prep.sigmas[name])
        else:  # small random A, zero B: output unchanged at start
            with torch.no_grad():
                ec.ec_A.normal_(0, 1 / math.sqrt(ec.in_features))
    losses = train_ecs(work, prep.wins, prep.teacher, steps=steps, lr=lr, batch_size=batch_size,
                       gate_lr_mult=gate_lr_mult, seed=seed, progress=progress)

    kl_heldout = None
    if prep.heldout.numel():
        kl_heldout = {"quantized": prep.heldout_kl_quantized,
                      "with_ecs": mean_kl(work, prep.heldout, prep.heldout_teacher)}
    out = copy.deepcopy(prep.q_model)
    for name, r in ranks.items():
        src = work_mods[name]
        dst = CompensatedLinear.wrap(dict(out.named_modules())[name], r, gate)
        with torch.no_grad():
            for p_src, p_dst in zip(src.ec_parameters(), dst.ec_parameters()):
                p_dst.copy_(p_src)
        _swap(out, name, dst)
    ec_bytes = sum(m.ec_bytes() for m in out.modules() if isinstance(m, CompensatedLinear))
    assert ec_bytes <= budget_bytes, (ec_bytes, budget_bytes)
    manifest = {
        "quant": prep.config.to_dict(), "base_model": prep.identity, "gate": gate, "placement": placement,
        "rank": rank, "budget": budget, "budget_bytes": budget_bytes, "quantized_model_bytes": prep.quant_bytes,
        "ec_bytes": ec_bytes, "ranks": ranks, "per_byte": per_byte, "init": init, "steps": steps, "lr": lr, "batch_size": batch_size,
        "gate_lr_mult": gate_lr_mult, "seed": seed, "calib_tokens": int(prep.wins.numel()),
        "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
        "kl_heldout": kl_heldout,
        "scores": {n: round(s["score"], 6) for n, s in prep.scores.items()},
        "timings": dict(prep.timings, fit_s=time.time() - t0),
    }
    if out_dir is not None:
        manifest = save_ecs(out, out_dir, manifest)
        save_report(prep.scores, out_dir, title=prep.config.spec)
    return out, manifest


def calibrate(model=DEFAULT_MODEL, quant: Union[str, QuantConfig] = "w4-pc-rtn", calib=DEFAULT_CALIB,
              budget: float = 0.01, gate: str = "sigmoid", placement: str = "diagnostic", rank: int = 8,
              steps: int = 600, lr: float = 1e-3, batch_size: int = 8, seed: int = 0, out_dir=None,
              device=None, progress: bool = True, seq_len: int = 256, n_windows: Optional[int] = None,
              gate_lr_mult: float = 1.0, init: str = "svd"):
    """Quantize ``model`` (a path or an FP ``nn.Module``) with ``quant``, fit ECs on ``calib``
    within ``budget`` × the quantized model's bytes; returns ``(model_with_ecs, manifest)`` and,
    with ``out_dir``, writes ``ecs.safetensors``, ``manifest.json`` and the diagnostic report."""
    check_budget(budget)
    if gate not in GATES:
        raise SpearError(f"calibrate: unknown gate {gate!r}; supported: {GATES}")
    if placement not in MODES:
        raise SpearError(f"calibrate: unknown placement {placement!r}; supported: {MODES}")
    torch.manual_seed(seed)
    prep = prepare(model, quant, calib, seq_len=seq_len, n_windows=n_windows, device=device, progress=progress)
    return fit(prep, budget, gate, placement, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
               gate_lr_mult=gate_lr_mult, init=init, seed=seed, out_dir=out_dir, progress=progress)


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
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    _, manifest = calibrate(args.model, args.quant, args.calib, budget=args.budget, gate=args.gate,
                            placement=args.placement, rank=args.rank, steps=args.steps, lr=args.lr,
                            seed=args.seed, out_dir=args.out, device=args.device)
    print(f"wrote {len(manifest['modules'])} ECs ({manifest['ec_bytes']} bytes, budget {manifest['budget_bytes']}) to {args.out}")
    return 0
