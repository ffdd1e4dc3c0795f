"""``calibrate``: quantize a model, diagnose it, place ECs under a byte budget, initialise them by
activation-aware SVD and train them jointly against the FP model's logits.

Two steps, so that sweeps reuse the expensive part: ``prepare`` (load, quantize, local and
model-level diagnostic, second moments and SVD factors, cached FP logits) and ``fit`` /
``fit_many`` (placement, init, training, export). ``fit_many`` trains many fits of one prepared
model together (:mod:`spear_compile.ec.train`): one larger step instead of many small ones.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import (check_device, check_float, check_int, check_model_dir, check_out_dir, check_seq_len,
                      load_causal_lm, load_tokenizer, read_text)
from ..quant.config import QuantConfig
from .diagnostic import SCORES, diagnose, model_level, save_report
from .module import GATES, CompensatedLinear
from .initialization import captured_fraction, dense_weight, input_second_moments, svd_factors
from .io import model_identity, save_ecs
from .train import (cast_model_, densify_, gate_stats, mean_kl, mean_kl_full, stack_ecs_, teacher_topk,
                       train_stacked)
from ..errors import SpearError
from ..modules import replace_submodule
from ..evaluate import DEFAULT_CALIB, DEFAULT_MODEL, calibration_tokens
from ..quant.memory import model_bytes
from ..perplexity import tokenize_file, windows
from .placement import MODES, check_budget, place
from ..quant.weight import QuantizedWeight
from ..quant.api import as_config, quantize

# The diagnostic placement's score and rank rule, chosen on held-out calibration KL (W4-pc RTN, 1%:
# bench/results/quality_sweep.md, bench/NOTES_quality.md): the model-level CKA/entropy score of
# quantizing one module alone, ranks allocated by score x captured error share per byte, up to 16.
DIAGNOSTIC_SCORE = "solo_score"
DIAGNOSTIC_ALLOC = "capture"
DIAGNOSTIC_RANK = 16  # the fixed rank, or the largest rank of the "capture" rule
DEFAULT_RANK = 8      # every other placement
# Training defaults of `calibrate` / the CLI, and per quantization config the choice made on held-out calibration KL
# (full vocabulary, 512-token windows; bench/results/quality_select_*.md, bench/NOTES_quality.md). W4-pc RTN keeps
# the cached top-64 KL at lr 1e-3: the selected full-KL/lr 2e-3 design was 1.3% lower in held-out KL but the same on
# test (56.8 ± 1.8 vs 56.6 ± 1.8%), and its FP forward per step would bring the 1-thread CPU path to ~30 min.
TRAIN_DEFAULTS = dict(steps=600, lr=1e-3, topk=None)
CONFIG_TRAIN = {
    "w3-pc-rtn": dict(steps=1200, lr=2e-3, topk=0),   # held-out full KL 0.1660 -> 0.1601; test 53.2 -> 57.3%
    "w4-pc-gptq": dict(lr=2e-3, topk=0),              # the W4-pc RTN selection: held-out 0.0231 -> 0.0228,
                                                      # test 42.2 -> 45.2%
}
ALLOCS = ("fixed", "per_byte", "capture")  # fixed rank by score; fixed rank by score per byte; allocated ranks
SVD_CACHE_RANK = 64
# The model-level diagnostic variants a score needs (the local score needs none): `calibrate` runs only these.
SCORE_VARIANTS = {"solo_score": ("solo",), "model_score": ("restore",), "kl_gain": ("restore",), "local_score": ()}
GATE_INITS = ("zero", "random")
GATE_INIT_STD = 0.3  # "random" gate init: std of the initial gate pre-activation W_g u over calibration tokens
FULL_CONTEXT = 512   # held-out full-vocabulary KL on windows of this many tokens (the perplexity eval's length)


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
    scores: Dict[str, dict]       # per module: local and model-level diagnostic stats
    sigmas: Dict[str, torch.Tensor]
    quant_bytes: int
    identity: dict
    timings: dict = field(default_factory=dict)
    heldout_kl_quantized: Optional[float] = None
    model_all: dict = field(default_factory=dict)     # the fully quantized model's output damage and KL
    svd: Dict[str, tuple] = field(default_factory=dict)       # name -> (A [r, K], B [N, r]) at SVD_CACHE_RANK
    capture: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> captured error share by rank
    heldout_kl_full_quantized: Optional[float] = None  # set by the first fit (``heldout_long``)
    max_positions: Optional[int] = None  # the model's max_position_embeddings: no window is longer

    def heldout_long(self) -> torch.Tensor:
        """The held-out windows joined into ``FULL_CONTEXT``-token windows (consecutive windows are
        consecutive text), for the full-vocabulary held-out KL at the perplexity eval's context."""
        t = self.heldout.shape[1]
        context = FULL_CONTEXT if not self.max_positions else min(FULL_CONTEXT, max(t, self.max_positions // t * t))
        return join_windows(self.heldout, context)

    def train_windows(self, seq_len: Optional[int]) -> torch.Tensor:
        return self.wins if not seq_len or seq_len == self.wins.shape[1] else join_windows(self.wins, seq_len)

    def svd_init(self, name: str, rank: int):
        """``(A [rank, K], B [N, rank])`` of the activation-aware SVD of module ``name``'s error."""
        a, b = self.svd[name]
        if rank > a.shape[0]:
            mods = dict(self.q_work.named_modules())
            err = dict(self.fp_work.named_modules())[name].weight.detach().float() - dense_weight(mods[name].weight)
            a, b = svd_factors(err, self.sigmas[name], rank)
        return a[:rank], b[:, :rank]


def join_windows(wins: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[W, T]`` consecutive windows of one token stream as ``[W·T // seq_len, seq_len]`` (``seq_len``
    a multiple of ``T``; a trailing partial group is dropped). ``seq_len < T``: split instead."""
    w, t = wins.shape
    if seq_len % t and t % seq_len:
        raise SpearError(f"calibrate: windows of {t} tokens cannot be joined into windows of {seq_len}")
    if seq_len >= t:
        g = seq_len // t
        if w < g:
            return wins
        return wins[:w // g * g].reshape(w // g, seq_len)
    return wins.reshape(-1, seq_len)


def _load(model_or_path, dtype):
    if isinstance(model_or_path, nn.Module):  # the caller's module is only read (prepare works on copies)
        path = getattr(getattr(model_or_path, "config", None), "_name_or_path", None)
        tok = load_tokenizer(path) if path and (Path(str(path)) / "config.json").is_file() else None
        return model_or_path, tok
    model = load_causal_lm(model_or_path, dtype)
    return model, load_tokenizer(model_or_path)


def calibration_windows(calib, tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    """``[W, seq_len]`` token windows from a text file path or a ``[W, T]`` LongTensor."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0 or calib.dtype not in (torch.int32, torch.int64):
            raise SpearError(f"calibrate: calibration tensor must be a non-empty [W, T] integer tensor, "
                             f"got {tuple(calib.shape)} {calib.dtype}")
        return calib[:n_windows].long()
    if tokenizer is None:
        raise SpearError("calibrate: a text calibration file needs the model's tokenizer; "
                         "pass a model path or token windows")
    ids = tokenize_file(tokenizer, calib)
    return windows(ids, seq_len, n_windows, source=str(calib))[:, :seq_len].contiguous()


def prepare(model=DEFAULT_MODEL, quant: Union[str, QuantConfig] = "w4-pc-rtn", calib=DEFAULT_CALIB,
            seq_len: int = 256, n_windows: Optional[int] = None, n_diag: int = 64, n_heldout: int = 16,
            topk: int = 64, device=None, dtype=torch.bfloat16, progress: bool = True,
            n_diag_model: int = 16, model_variants: Sequence[str] = ("restore", "solo"),
            cache_teacher: bool = True) -> Prepared:
    """Load and quantize ``model``; local diagnostic and input second moments on the first
    ``n_diag`` calibration windows, model-level diagnostic on the first ``n_diag_model``; cache FP
    top-``topk`` outputs over the training windows (``cache_teacher``; without it every fit runs the
    FP model beside each step); hold out the last ``n_heldout`` windows (never trained on) to report
    held-out KL."""
    t0 = time.time()
    cfg = QuantConfig.from_spec(quant) if isinstance(quant, str) else quant
    if not isinstance(cfg, QuantConfig):
        raise SpearError(f"calibrate: quant must be a quantization spec such as 'w4-pc-rtn', got {quant!r}")
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    phases = tqdm(total=7, desc="calibrate: load", disable=not progress, leave=False,
                  bar_format="{desc} [{n_fmt}/{total_fmt} phases, {elapsed}]")

    def phase(desc: str) -> None:
        phases.update(1)
        phases.set_description_str(f"calibrate: {desc}")
    try:
        return _prepare(model, cfg, calib, seq_len, n_windows, n_diag, n_heldout, topk, device, dtype, progress,
                        n_diag_model, model_variants, cache_teacher, t0, phase)
    finally:
        phases.close()


def _prepare(model, cfg, calib, seq_len, n_windows, n_diag, n_heldout, topk, device, dtype, progress,
             n_diag_model, model_variants, cache_teacher, t0, phase) -> Prepared:
    fp_model, tok = _load(model, dtype)
    check_seq_len(fp_model, seq_len, "calibrate: seq_len")
    phase("quantize")
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
    phase("local diagnostic")
    scores = diagnose(fp_work, q_work, wins[:n_diag], names)
    t2 = time.time()
    phase("model-level diagnostic")
    model_all = {}
    if model_variants:
        ml = model_level(fp_work, q_work, wins[:n_diag_model], names, variants=model_variants, topk=topk,
                         progress=progress)
        model_all = ml.pop("_all")
        for n in names:
            scores[n].update(ml[n])
            scores[n]["score"] = scores[n].get(DIAGNOSTIC_SCORE, scores[n]["local_score"])
    t3 = time.time()
    phase("input second moments + SVD")
    sigmas = input_second_moments(fp_work, wins[:n_diag], names)
    fp_mods, q_mods = dict(fp_work.named_modules()), dict(q_work.named_modules())
    svd, capture = {}, {}
    for n in names:
        w_fp = fp_mods[n].weight.detach().float()
        r = min(SVD_CACHE_RANK, *w_fp.shape)
        a, b, s = svd_factors(w_fp - dense_weight(q_mods[n].weight), sigmas[n], r, spectrum=True)
        svd[n], capture[n] = (a, b), captured_fraction(s)
    t4 = time.time()
    phase("FP teacher outputs")
    teacher = teacher_topk(fp_work, wins, topk) if cache_teacher else None  # None: fits run the FP model beside
    heldout_teacher = teacher_topk(fp_work, heldout, topk) if n_heldout else None
    phase("held-out KL")
    kl_q = mean_kl(q_work, heldout, heldout_teacher) if n_heldout else None
    t5 = time.time()
    phase("done")
    return Prepared(cfg, q_model, fp_work, q_work, wins, teacher, heldout, heldout_teacher, scores, sigmas,
                    quant_bytes, model_identity(fp_model),
                    {"load_quantize_s": t1 - t0, "diagnose_local_s": t2 - t1, "diagnose_model_s": t3 - t2,
                     "svd_s": t4 - t3, "teacher_s": t5 - t4}, kl_q, model_all, svd, capture,
                    max_positions=getattr(getattr(fp_model, "config", None), "max_position_embeddings", None))


def _to_device_(model: nn.Module, device) -> nn.Module:
    """``model.to(device)``: ``QuantizedWeight`` moves its inner tensors through torchao's ``_to_copy``."""
    return model.to(device)


FIT_DEFAULTS = dict(budget=0.01, gate="sigmoid", placement="diagnostic", rank=None, lr=1e-3, gate_lr_mult=1.0,
                    init="svd", seed=0, score=None, alloc=None, topk=None, gate_init="zero", balance=False)
# topk: the training loss's teacher. None: the cached top-k of ``prepare`` (64; the full-vocabulary KL if
#   ``prepare`` cached none); 0: the full-vocabulary KL,
#   the FP model run beside each step (no cache); k > 0: top-k + rest bucket, FP model run beside each step.
# gate_init: "zero" (g ≡ 1) or "random" (W_g drawn so that W_g u has std GATE_INIT_STD; gated fits only).
# balance: rescale A's rows / B's columns at init (same function) so every u = A x coordinate has unit
#   variance over the calibration inputs (the SVD init gives var(u_i) = s_i).


def _spec(spec: dict) -> dict:
    unknown = set(spec) - set(FIT_DEFAULTS)
    if unknown:
        raise SpearError(f"calibrate: unknown fit option(s) {sorted(unknown)}; supported: {sorted(FIT_DEFAULTS)}")
    sp = dict(FIT_DEFAULTS, **spec)
    check_budget(sp["budget"])
    if sp["gate"] not in GATES:
        raise SpearError(f"calibrate: unknown gate {sp['gate']!r}; supported: {GATES}")
    if sp["placement"] not in MODES:
        raise SpearError(f"calibrate: unknown placement {sp['placement']!r}; supported: {MODES}")
    if sp["init"] not in ("svd", "zero"):
        raise SpearError(f"calibrate: unknown init {sp['init']!r}; supported: ('svd', 'zero')")
    if sp["gate_init"] not in GATE_INITS:
        raise SpearError(f"calibrate: unknown gate_init {sp['gate_init']!r}; supported: {GATE_INITS}")
    if sp["topk"] is not None and (not isinstance(sp["topk"], int) or sp["topk"] < 0):
        raise SpearError(f"calibrate: topk must be None (cached teacher), 0 (full vocabulary) or k > 0, "
                         f"got {sp['topk']!r}")
    if sp["placement"] == "local":
        sp["score"] = sp["score"] or "local_score"
        sp["alloc"] = sp["alloc"] or "fixed"
    sp["score"] = sp["score"] or DIAGNOSTIC_SCORE
    sp["alloc"] = sp["alloc"] or DIAGNOSTIC_ALLOC
    if sp["rank"] is None:
        sp["rank"] = DIAGNOSTIC_RANK if sp["placement"] == "diagnostic" else DEFAULT_RANK
    if sp["score"] not in SCORES:
        raise SpearError(f"calibrate: unknown score {sp['score']!r}; supported: {SCORES}")
    if sp["alloc"] not in ALLOCS:
        raise SpearError(f"calibrate: unknown rank allocation {sp['alloc']!r}; supported: {ALLOCS}")
    return sp


def _placement(prep: Prepared, sp: dict, bytes_per_param: int) -> Dict[str, int]:
    modules = dict(prep.q_work.named_modules())
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in prep.scores}
    scores = None
    if sp["placement"] in ("diagnostic", "local"):
        missing = [n for n in shapes if sp["score"] not in prep.scores[n]]
        if missing:
            raise SpearError(f"calibrate: score {sp['score']!r} was not computed (prepare's model_variants); "
                             f"missing for {missing[0]!r}")
        scores = {n: prep.scores[n][sp["score"]] for n in shapes}
    ranked = scores is not None
    capture = prep.capture if sp["alloc"] == "capture" and ranked else None
    return place(shapes, int(math.floor(sp["budget"] * prep.quant_bytes)), sp["placement"], scores,
                 rank=sp["rank"], gate=sp["gate"],
                 bytes_per_param=bytes_per_param, seed=sp["seed"], per_byte=ranked and sp["alloc"] == "per_byte",
                 capture=capture)


def fit_many(prep: Prepared, specs: Sequence[dict], steps: int = 600, batch_size: int = 8,
             max_stack: int = 16, out_dirs: Optional[Sequence] = None, progress: bool = True,
             seq_len: Optional[int] = None):
    """Fit one EC set per spec (``{budget, gate, placement, rank, lr, gate_lr_mult, init, seed,
    score, alloc, topk, gate_init, balance}``, defaults ``FIT_DEFAULTS``; rank ``None``:
    ``DIAGNOSTIC_RANK`` for the diagnostic placement, else ``DEFAULT_RANK``) on a prepared model, up to
    ``max_stack`` of them trained together; returns ``[(model, manifest)]`` in spec order, each
    model a copy of the quantized model (storage dtype) with ``CompensatedLinear`` modules.
    ``seq_len``: train on windows of this many tokens (consecutive calibration windows joined;
    the teacher then runs beside each step); default the prepared windows' length."""
    specs = [_spec(dict(sp)) for sp in specs]
    if seq_len and prep.max_positions and seq_len > prep.max_positions:
        raise SpearError(f"calibrate: seq_len={seq_len} exceeds the model's "
                         f"max_position_embeddings={prep.max_positions}")
    if not specs:
        raise SpearError("calibrate: no fit requested")
    if out_dirs is not None and len(out_dirs) != len(specs):
        raise SpearError(f"calibrate: {len(out_dirs)} output directories for {len(specs)} fits")
    store_dtype = next(p for p in prep.q_model.parameters() if not isinstance(p, QuantizedWeight)).dtype
    bpp = torch.empty((), dtype=store_dtype).element_size()
    placements = [_placement(prep, sp, bpp) for sp in specs]
    results = []
    for lo in range(0, len(specs), max(1, max_stack)):
        chunk = list(range(lo, min(len(specs), lo + max(1, max_stack))))
        results += _fit_stack(prep, [specs[i] for i in chunk], [placements[i] for i in chunk], steps, batch_size,
                              [out_dirs[i] for i in chunk] if out_dirs is not None else None, progress, seq_len)
    return results


def _init_stack(prep: Prepared, stacked, specs, placements) -> None:
    """SVD (or zero) init of every fit's ECs, then the optional rescaling (``balance``) and random
    gate init (``gate_init``), both measured with the module's input second moment Σ."""
    for f, (sp, ranks) in enumerate(zip(specs, placements)):
        gen = torch.Generator().manual_seed(sp["seed"])
        ggen = torch.Generator().manual_seed(10_000 + sp["seed"])
        for name, r in ranks.items():
            m = stacked[name]
            if sp["init"] == "svd":
                a, b = prep.svd_init(name, r)
            else:  # small random A, zero B: output unchanged at start
                a = torch.randn(r, m.in_features, generator=gen) / math.sqrt(m.in_features)
                b = torch.zeros(m.out_features, r)
            gate_w = None
            if sp["balance"] or (sp["gate_init"] == "random" and sp["gate"] != "none"):
                sig, a64 = prep.sigmas[name].to(torch.float64).cpu(), a.detach().double().cpu()
                std_u = ((a64 @ sig) * a64).sum(1).clamp(min=1e-24).sqrt().float()  # [r], on the CPU
                if sp["balance"]:
                    su = std_u.to(a.device)
                    a, b, std_u = a / su[:, None], b * su[None, :], torch.ones_like(std_u)
                if sp["gate_init"] == "random" and sp["gate"] != "none":
                    gate_w = torch.randn(r, r, generator=ggen) * GATE_INIT_STD / math.sqrt(r) / std_u[None, :]
            m.set_ec(f, a.to(m.A.device), b.to(m.B.device), None if gate_w is None else gate_w.to(m.A.device))


def _fit_stack(prep, specs, placements, steps, batch_size, out_dirs, progress, seq_len=None):
    t0 = time.time()
    work = copy.deepcopy(prep.q_work)
    stacked = stack_ecs_(work, placements, [sp["gate"] for sp in specs])
    _init_stack(prep, stacked, specs, placements)
    wins = prep.train_windows(seq_len)
    cache_k = prep.teacher[1].shape[-1] if prep.teacher is not None else 0
    topks = [cache_k if sp["topk"] is None else sp["topk"] for sp in specs]
    online = wins is not prep.wins or any(k == 0 or k > cache_k for k in topks)
    prec = torch.get_float32_matmul_precision()
    if next(work.parameters()).is_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for training on the GPU
    kl_full, gstats = None, [None] * len(specs)
    try:
        losses = train_stacked(work, wins, None if online else prep.teacher, [sp["seed"] for sp in specs],
                               steps=steps, lr=[sp["lr"] for sp in specs], batch_size=batch_size,
                               gate_lr_mult=[sp["gate_lr_mult"] for sp in specs], progress=progress,
                               fp_model=prep.fp_work if online else None, topks=topks)
        kl_h = mean_kl(work, prep.heldout, prep.heldout_teacher, n_fits=len(specs)) if prep.heldout.numel() else None
        if prep.heldout.numel():
            long = prep.heldout_long()
            if prep.heldout_kl_full_quantized is None:
                prep.heldout_kl_full_quantized = mean_kl_full(prep.q_work, long, prep.fp_work, batch_size=4)
            ecs = list(stacked.values())
            for m in ecs:
                m.stats = {}
            kl_full = mean_kl_full(work, long, prep.fp_work, batch_size=4, n_fits=len(specs))
            kl_full = [kl_full] if len(specs) == 1 else kl_full
            gstats = gate_stats(ecs, len(specs))
            for m in ecs:
                m.stats = None
    finally:
        torch.set_float32_matmul_precision(prec)
    if kl_h is not None and len(specs) == 1:
        kl_h = [kl_h]

    def heldout(f):
        if kl_h is None:
            return None
        return {"quantized": prep.heldout_kl_quantized, "with_ecs": kl_h[f],
                "full_quantized": prep.heldout_kl_full_quantized, "full_with_ecs": kl_full[f],
                "full_context": int(prep.heldout_long().shape[1])}
    fit_s = (time.time() - t0) / len(specs)
    out = []
    budget_bytes_of = lambda sp: int(math.floor(sp["budget"] * prep.quant_bytes))  # noqa: E731
    for f, (sp, ranks) in enumerate(zip(specs, placements)):
        model = copy.deepcopy(prep.q_model)
        mods = dict(model.named_modules())
        for name, r in ranks.items():
            dst = CompensatedLinear.wrap(mods[name], r, sp["gate"])
            with torch.no_grad():
                for pname, t in stacked[name].ec_state(f).items():
                    getattr(dst, pname).copy_(t)
            replace_submodule(model, name, dst)
        ec_bytes = sum(m.ec_bytes() for m in model.modules() if isinstance(m, CompensatedLinear))
        assert ec_bytes <= budget_bytes_of(sp), (ec_bytes, budget_bytes_of(sp))
        ls = losses[f]
        manifest = {
            "quant": prep.config.to_dict(), "base_model": prep.identity, "gate": sp["gate"],
            "placement": sp["placement"], "score": sp["score"] if sp["placement"] in ("diagnostic", "local") else None,
            "alloc": sp["alloc"] if sp["placement"] in ("diagnostic", "local") else None, "rank": sp["rank"],
            "budget": sp["budget"], "budget_bytes": budget_bytes_of(sp),
            "quantized_model_bytes": prep.quant_bytes, "ec_bytes": ec_bytes, "ranks": ranks,
            "init": sp["init"], "steps": steps, "lr": sp["lr"], "batch_size": batch_size,
            "gate_lr_mult": sp["gate_lr_mult"], "seed": sp["seed"], "calib_tokens": int(prep.wins.numel()),
            "fits_trained_together": len(specs),
            "loss_first": ls[0] if ls else None, "loss_last": sum(ls[-10:]) / max(1, len(ls[-10:])) if ls else None,
            "kl_heldout": heldout(f), "gate_stats": gstats[f], "topk": sp["topk"], "teacher_topk": topks[f] or None,
            "teacher": "online" if online else "cached", "gate_init": sp["gate_init"],
            "balance": sp["balance"], "seq_len": int(wins.shape[1]),
            "scores": {n: {k: round(s[k], 8) for k in ("score",) + SCORES if k in s} for n, s in prep.scores.items()},
            "model_level_all": prep.model_all,
            "timings": dict(prep.timings, fit_s=fit_s),
        }
        if out_dirs is not None and out_dirs[f] is not None:
            manifest = save_ecs(model, out_dirs[f], manifest)
            report = save_report(prep.scores, out_dirs[f], title=prep.config.spec)
            out_dir = Path(out_dirs[f])
            manifest = dict(manifest, files_written=[str(out_dir / n) for n in ("ecs.safetensors", "manifest.json")]
                            + [str(v) for v in report.values()])
        out.append((model, manifest))
    return out


def fit(prep: Prepared, budget: float = 0.01, gate: str = "sigmoid", placement: str = "diagnostic",
        rank: Optional[int] = None, steps: int = 600, lr: float = 1e-3, batch_size: int = 8, gate_lr_mult: float = 1.0,
        init: str = "svd", seed: int = 0, out_dir=None, progress: bool = True,
        score: Optional[str] = None, alloc: Optional[str] = None, topk: Optional[int] = None):
    """Place, initialise and train ECs on a prepared model; returns ``(model, manifest)``:
    a copy of the quantized model (storage dtype) with ``CompensatedLinear`` modules."""
    spec = dict(budget=budget, gate=gate, placement=placement, rank=rank, lr=lr, gate_lr_mult=gate_lr_mult,
                init=init, seed=seed, score=score, alloc=alloc, topk=topk)
    torch.manual_seed(seed)
    return fit_many(prep, [spec], steps=steps, batch_size=batch_size, out_dirs=[out_dir], progress=progress)[0]


def train_defaults(quant: Union[str, QuantConfig]) -> dict:
    """``{steps, lr, topk}`` for ``calibrate`` on quantization config ``quant``: ``TRAIN_DEFAULTS``
    updated with the configuration's own choice in ``CONFIG_TRAIN`` (if any)."""
    spec = quant.spec if isinstance(quant, QuantConfig) else QuantConfig.from_spec(quant).spec
    return dict(TRAIN_DEFAULTS, **CONFIG_TRAIN.get(spec, {}))


def calibrate(model=DEFAULT_MODEL, quant: Union[str, QuantConfig] = "w4-pc-rtn", calib=DEFAULT_CALIB,
              budget: float = 0.01, gate: str = "sigmoid", placement: str = "diagnostic", rank: Optional[int] = None,
              steps: Optional[int] = None, lr: Optional[float] = None, batch_size: int = 8, seed: int = 0, out_dir=None,
              device=None, progress: bool = True, seq_len: int = 256, n_windows: Optional[int] = None,
              gate_lr_mult: float = 1.0, init: str = "svd", score: Optional[str] = None,
              alloc: Optional[str] = None, topk: Union[int, None, str] = "auto"):
    """Quantize ``model`` (a path or an FP ``nn.Module``) with ``quant``, fit ECs on ``calib``
    within ``budget`` × the quantized model's bytes; returns ``(model_with_ecs, manifest)`` and,
    with ``out_dir``, writes ``ecs.safetensors``, ``manifest.json`` and the diagnostic report.
    ``steps``/``lr`` ``None`` and ``topk`` ``"auto"``: the configuration's defaults (:func:`train_defaults`)."""
    cfg = as_config(quant, "calibrate")
    if cfg is None:
        raise SpearError("calibrate: quant 'none' has nothing to compensate; give a spec such as 'w4-pc-rtn'")
    d = train_defaults(cfg)
    steps = d["steps"] if steps is None else steps
    lr = d["lr"] if lr is None else lr
    topk = d["topk"] if topk == "auto" else topk
    sp = _spec(dict(budget=budget, gate=gate, placement=placement, init=init, score=score, alloc=alloc, topk=topk))
    # every argument and file checked before minutes of diagnostic and training
    check_int(steps, "calibrate: steps", minimum=0)  # 0: the SVD init alone
    check_float(lr, "calibrate: lr", 0.0, 1.0)
    check_float(gate_lr_mult, "calibrate: gate_lr_mult", 0.0)
    check_int(batch_size, "calibrate: batch_size")
    check_int(seq_len, "calibrate: seq_len")
    check_int(n_windows, "calibrate: n_windows (--max-windows)", allow_none=True)
    check_int(seed, "calibrate: seed", minimum=0)
    check_int(rank, "calibrate: rank", allow_none=True)
    if device is not None:
        check_device(device, "calibrate: device")
    if not isinstance(model, nn.Module):
        check_model_dir(model)
    if not isinstance(calib, torch.Tensor):
        read_text(calib, "calibration file")
    if out_dir is not None:
        check_out_dir(out_dir, "calibrate: out_dir")
    quant = cfg
    torch.manual_seed(seed)
    # Only the model-level variant the placement ranks by (one forward per module instead of two): the placement
    # is the same; the manifest then holds that variant's scores and the local ones.
    variants = SCORE_VARIANTS[sp["score"]] if sp["placement"] in ("diagnostic", "local") else ()
    prep = prepare(model, quant, calib, seq_len=seq_len, n_windows=n_windows, device=device, progress=progress,
                   cache_teacher=topk is None or topk > 0, model_variants=variants)
    return fit(prep, budget, gate, placement, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
               gate_lr_mult=gate_lr_mult, init=init, seed=seed, out_dir=out_dir, progress=progress,
               score=score, alloc=alloc, topk=topk)
