"""Which linears does quantization damage most? CKA-guided, entropy-aware scores.

Two views, both linear CKA between FP and quantized representations over calibration tokens,
weighted by how unevenly the error spreads over tokens (entropy of the per-token error):

Local (:func:`diagnose`): for every linear, with the FP model's own inputs ``x_t``,
``y_t = W x_t`` (FP) and ``ŷ_t = W_q x_t`` (quantized; the module's own error only).

- ``damage = 1 − CKA(Y, Ŷ)``, linear CKA over the T tokens (features centred);
- per-token error ``e_t = ||y_t − ŷ_t||``, ``p_t = e_t / Σ e``, entropy ``H = −Σ p_t log p_t``;
  ``unevenness = 1 − H / log T`` (0: error spread evenly over tokens, 1: on one token);
- ``local_score = damage · (1 + unevenness · log T) = damage · (1 + KL(p ‖ uniform))``.

Model level (:func:`model_level`): the damage a module does *downstream*, at the model's final
hidden state ``h`` (the lm_head input), FP model vs the fully quantized one:

- restore: the quantized model with module m alone restored to FP; ``cka_gain = D_q − D_−m``
  with ``D = 1 − CKA(H_FP, H)``: how much of the output damage fixing m removes, weighted by the
  unevenness of the per-token change it makes (``d_t = ||h_q,t − h_−m,t||``):
  ``model_score = cka_gain · (1 + unevenness · log T)``; also ``kl_gain``, the drop of
  KL(p_FP ‖ p) when m is restored;
- solo: the FP model with module m alone quantized: ``solo_damage = 1 − CKA(H_FP, H_m)``,
  ``solo_score = solo_damage · (1 + unevenness · log T)`` with ``e_t = ||h_FP,t − h_m,t||``;
  ``kl_solo``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from .initialization import dense_weight
from ..errors import SpearError
from ..perplexity import forward_windows
from ..quant.weight import QuantizedWeight

SCORES = ("model_score", "kl_gain", "solo_score", "local_score")

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of representations ``x [T, N1]`` and ``y [T, N2]`` (rows are samples)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise SpearError(f"linear_cka: expected [T, N] tensors with equal T, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().double() - x.detach().double().mean(0)
    y = y.detach().double() - y.detach().double().mean(0)
    cross = (x.T @ y).square().sum()
    den = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(cross / den) if den > 0 else 0.0


class _Moments:
    """Streaming sums for CKA of (Y, Ŷ) plus per-token error norms."""

    def __init__(self, keep: bool = True):
        self.n, self.syy, self.sqq, self.syq, self.sy, self.sq = 0, 0, 0, 0, 0, 0
        self.err, self.rel, self.keep = [], [], keep

    def add(self, y: torch.Tensor, q: torch.Tensor):
        y, q = y.double(), q.double()
        self.n += y.shape[0]
        self.syy = self.syy + y.T @ y
        self.sqq = self.sqq + q.T @ q
        self.syq = self.syq + y.T @ q
        self.sy = self.sy + y.sum(0)
        self.sq = self.sq + q.sum(0)
        if not self.keep:
            return
        e = (y - q).norm(dim=-1)
        self.err.append(e.float().cpu())
        self.rel.append((e / y.norm(dim=-1).clamp(min=1e-12)).float().cpu())

    def cka(self) -> float:
        n = self.n
        cyy = self.syy - torch.outer(self.sy, self.sy) / n
        cqq = self.sqq - torch.outer(self.sq, self.sq) / n
        cyq = self.syq - torch.outer(self.sy, self.sq) / n
        den = cyy.square().sum().sqrt() * cqq.square().sum().sqrt()
        return float(cyq.square().sum() / den) if den > 0 else 0.0


def entropy_unevenness(err: torch.Tensor) -> float:
    """``1 − H(p)/log T`` of ``p_t = e_t / Σ e`` (0 for a uniform spread)."""
    t = err.numel()
    if t < 2 or err.sum() <= 0:
        return 0.0
    p = err.double() / err.double().sum()
    h = -(p * torch.log(p.clamp(min=1e-300))).sum()
    return float(1.0 - h / math.log(t))


@torch.no_grad()
def diagnose(fp_model: nn.Module, q_model: nn.Module, wins: torch.Tensor,
             names: Optional[Iterable[str]] = None, batch_size: int = 8, keep_tokens: bool = True) -> Dict[str, dict]:
    """Score the linears ``names`` (default: every linear of ``q_model`` whose weight differs
    from ``fp_model``'s) over token windows ``wins [W, T]``; returns ``{name: stats}``."""
    if wins.numel() == 0:
        raise SpearError("diagnose: empty calibration set")
    fp_mods, q_mods = dict(fp_model.named_modules()), dict(q_model.named_modules())
    if names is None:
        names = [n for n, m in q_mods.items()
                 if isinstance(m, nn.Linear) and type(m.weight).__name__ == "QuantizedWeight"]
    names = list(names)
    if not names:
        raise SpearError("diagnose: no quantized linear to score")
    w_q = {}
    for n in names:
        if n not in fp_mods or n not in q_mods:
            raise SpearError(f"diagnose: module {n!r} missing from the FP or quantized model")
        if tuple(fp_mods[n].weight.shape) != tuple(q_mods[n].weight.shape):
            raise SpearError(f"diagnose: {n}: FP weight {tuple(fp_mods[n].weight.shape)} vs quantized "
                             f"{tuple(q_mods[n].weight.shape)}")
        w_q[n] = dense_weight(q_mods[n].weight)
    stats = {n: _Moments() for n in names}

    def hook(name):
        def fn(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            y = out.reshape(-1, out.shape[-1]).float()
            q = x @ w_q[name].to(x.device).T
            if mod.bias is not None:
                q = q + mod.bias.float()
            stats[name].add(y, q)
        return fn

    forward_windows(fp_model, wins, [fp_mods[n].register_forward_hook(hook(n)) for n in names], batch_size)
    out = {}
    for n, s in stats.items():
        err, rel = torch.cat(s.err), torch.cat(s.rel)
        cka = s.cka()
        unev = entropy_unevenness(err)
        damage = max(0.0, 1.0 - cka)
        r = {
            "cka": cka, "damage": damage, "unevenness": unev,
            "local_score": damage * (1.0 + unev * math.log(err.numel())),
            "score": damage * (1.0 + unev * math.log(err.numel())),  # what placement ranks by (here: local)
            "rel_err_mean": float(rel.mean()), "rel_err_cv": float(rel.std() / rel.mean().clamp(min=1e-12)),
            "rel_err_p50": float(rel.quantile(0.5)), "rel_err_p99": float(rel.quantile(0.99)),
        }
        if keep_tokens:
            r["_rel_tokens"] = rel
        out[n] = r
    return out


def _final_hidden(model: nn.Module, x: torch.Tensor):
    """``(h [B*T, d], logits [B, T, V])``: the input of the output embedding (lm_head) and the
    logits; for a model without ``get_output_embeddings`` its output serves as both."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        out = model(x)
        out = getattr(out, "logits", out)
        return out.reshape(-1, out.shape[-1]).float(), out
    box = []
    handle = head.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        logits = model(x).logits
    finally:
        handle.remove()
    return box[0].reshape(-1, box[0].shape[-1]).float(), logits


class _Swapped:
    """Context: the linear ``mod`` computes with ``weight`` (a plain tensor) instead of its own."""

    def __init__(self, mod: nn.Module, weight: torch.Tensor):
        self.mod, self.weight = mod, weight

    def __enter__(self):
        self.orig = self.mod._parameters["weight"]
        self.mod._parameters["weight"] = nn.Parameter(self.weight, requires_grad=False)

    def __exit__(self, *exc):
        self.mod._parameters["weight"] = self.orig


@torch.no_grad()
def model_level(fp_model: nn.Module, q_model: nn.Module, wins: torch.Tensor, names: Iterable[str],
                batch_size: int = 8, variants: Iterable[str] = ("restore", "solo"), topk: int = 64,
                progress: bool = False) -> Dict[str, dict]:
    """Model-level CKA/entropy scores of the linears ``names`` over token windows ``wins [W, T]``
    (see the module docstring): one forward per module and variant. ``q_model`` must hold plain
    (dequantized) weights, e.g. :func:`spear_compile.ec.train.densify_` of the quantized model.
    Returns ``{name: stats}``; ``stats["_all"]`` (a separate key of the result) holds the
    fully quantized model's ``damage`` and ``kl``."""
    from tqdm.auto import tqdm
    from .train import kl_per_token

    if wins.numel() == 0:
        raise SpearError("model_level: empty calibration set")
    names, variants = list(names), tuple(variants)
    if not names:
        raise SpearError("model_level: no module to score")
    if not set(variants) <= {"restore", "solo"} or not variants:
        raise SpearError(f"model_level: variants must be among ('restore', 'solo'), got {variants}")
    fp_mods, q_mods = dict(fp_model.named_modules()), dict(q_model.named_modules())
    for n in names:
        if n not in fp_mods or n not in q_mods:
            raise SpearError(f"model_level: module {n!r} missing from the FP or quantized model")
        if isinstance(q_mods[n].weight, QuantizedWeight):
            raise SpearError("model_level: pass the quantized model with dense (dequantized) weights")
    device = next(fp_model.parameters()).device
    batches = [wins[i:i + batch_size].to(device) for i in range(0, wins.shape[0], batch_size)]
    ref_h, ref_t = [], []
    for x in batches:
        h, logits = _final_hidden(fp_model, x)
        logp = torch.log_softmax(logits.float(), -1)
        v, ix = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        ref_h.append(h)
        ref_t.append((v, ix))
    t_all = sum(h.shape[0] for h in ref_h)

    def measure(model, base, keep_kl=False):
        """CKA to FP, mean KL to FP, per-token distance to ``base`` hidden states (and, with
        ``keep_kl``, the per-token KL; the hidden states then go to ``q_h``)."""
        mom, kl, dist = _Moments(keep=False), [], []
        for i, x in enumerate(batches):
            h, logits = _final_hidden(model, x)
            if keep_kl:
                q_h.append(h)
            mom.add(ref_h[i], h)
            kl.append(kl_per_token(logits, *ref_t[i]).reshape(-1).float().cpu())
            dist.append((h - base[i]).norm(dim=-1).float().cpu())
        kl = torch.cat(kl)
        return mom.cka(), float(kl.double().mean()), torch.cat(dist), (kl if keep_kl else None)

    # the fully quantized model once (its hidden states are the base of the restore variant)
    q_h = []
    cka_q, kl_q, err_q, kl_tok = measure(q_model, ref_h, keep_kl=True)
    damage_q = max(0.0, 1.0 - cka_q)
    rel = err_q / torch.cat([h.norm(dim=-1).float().cpu() for h in ref_h]).clamp(min=1e-12)
    top = kl_tok.sort(descending=True).values
    all_stats = {"damage": damage_q, "kl": kl_q, "tokens": t_all, "unevenness": entropy_unevenness(err_q),
                 "rel_err_mean": float(rel.mean()), "rel_err_cv": float(rel.std() / rel.mean().clamp(min=1e-12)),
                 "rel_err_p99_p50": float(rel.quantile(0.99) / rel.quantile(0.5).clamp(min=1e-12)),
                 "kl_cv": float(kl_tok.std() / kl_tok.mean().clamp(min=1e-12)),
                 "kl_share_top10pct_tokens": float(top[:max(1, t_all // 10)].sum() / top.sum().clamp(min=1e-12)),
                 "kl_unevenness": entropy_unevenness(kl_tok.clamp(min=0))}
    log_t = math.log(t_all) if t_all > 1 else 0.0
    out = {n: {} for n in names}
    jobs = [(v, n) for v in variants for n in names]
    for variant, n in tqdm(jobs, desc="model-level diagnostic", disable=not progress, leave=False):
        if variant == "restore":
            with _Swapped(q_mods[n], dense_weight(fp_mods[n].weight).to(q_mods[n].weight.dtype)):
                cka, kl, dist, _ = measure(q_model, q_h)
            unev = entropy_unevenness(dist)
            gain = damage_q - max(0.0, 1.0 - cka)
            out[n].update(restore_cka=cka, cka_gain=gain, restore_unevenness=unev,
                          model_score=max(gain, 0.0) * (1.0 + unev * log_t), kl_restore=kl, kl_gain=kl_q - kl)
        else:
            w_q = dense_weight(q_mods[n].weight).to(fp_mods[n].weight.dtype)
            with _Swapped(fp_mods[n], w_q):
                cka, kl, dist, _ = measure(fp_model, ref_h)
            unev = entropy_unevenness(dist)
            damage = max(0.0, 1.0 - cka)
            out[n].update(solo_damage=damage, solo_unevenness=unev, solo_score=damage * (1.0 + unev * log_t),
                          kl_solo=kl)
    out["_all"] = all_stats
    return out


def split_name(name: str):
    """``("model.layers.3.mlp.up_proj") -> (3, "up")``; ``(None, name)`` if not a decoder linear."""
    m = re.search(r"layers\.(\d+)\.", name)
    kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
    return (int(m.group(1)) if m else None), kind


def save_report(scores: Dict[str, dict], out_dir, title: str = "") -> Dict[str, str]:
    """Write ``diagnostic.json``, ``diagnostic_heatmap.png`` and ``per_token_error.png`` to
    ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = sorted(scores, key=lambda n: -scores[n]["score"])
    clean = {n: {k: v for k, v in scores[n].items() if not k.startswith("_")} | {"rank": i + 1}
             for i, n in enumerate(ranked)}
    paths = {"json": str(out_dir / "diagnostic.json"), "heatmap": str(out_dir / "diagnostic_heatmap.png"),
             "per_token": str(out_dir / "per_token_error.png")}
    Path(paths["json"]).write_text(json.dumps({"title": title, "ranking": ranked, "modules": clean}, indent=1))

    layers = sorted({split_name(n)[0] for n in scores if split_name(n)[0] is not None}) or [None]
    kinds = [k for k in MODULE_TYPES if any(split_name(n)[1] == k for n in scores)]
    kinds = kinds or sorted({split_name(n)[1] for n in scores})
    panels = [k for k in ("score",) + SCORES if all(k in s for s in scores.values())]
    panels = [k for k in panels if k == "score" or any(scores[n][k] != scores[n]["score"] for n in scores)]
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (1.6 + 0.9 * len(kinds)), rows * (1 + 0.45 * len(layers))),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, panels):
        grid = torch.full((len(layers), len(kinds)), float("nan"))
        for n, s in scores.items():
            layer, kind = split_name(n)
            if layer in layers and kind in kinds:
                grid[layers.index(layer), kinds.index(kind)] = s[key]
        im = ax.imshow(grid.numpy(), cmap="magma", aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        same = [k for k in SCORES if k != key and all(scores[n].get(k) == scores[n][key] for n in scores)]
        label = f"placement score ({same[0]})" if key == "score" and same else key
        ax.set_title(f"{label} {title}".strip(), fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(paths["heatmap"], dpi=110)
    plt.close(fig)

    shown = [n for n in ranked[:3] + ranked[-2:] if "_rel_tokens" in scores[n]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in dict.fromkeys(shown):
        rel = scores[n]["_rel_tokens"].sort().values
        ax.plot(rel.numpy(), torch.linspace(0, 1, rel.numel()).numpy(), label=f"{n} (cv {scores[n]['rel_err_cv']:.2f})")
    ax.set_xlabel("per-token relative output error ||Wx − W_q x|| / ||Wx||")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"per-token error, top-3 and bottom-2 modules {title}".strip(), fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths["per_token"], dpi=110)
    plt.close(fig)
    return paths
