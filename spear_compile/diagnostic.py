"""Which linears does quantization damage most? CKA-guided, entropy-aware scores.

For every linear, on calibration tokens, with the FP model's own inputs ``x_t``:
``y_t = W x_t`` (FP) and ``ŷ_t = W_q x_t`` (quantized; the module's own error only).

- ``damage = 1 − CKA(Y, Ŷ)``, linear CKA over the T tokens (features centred);
- per-token error ``e_t = ||y_t − ŷ_t||``, ``p_t = e_t / Σ e``, entropy ``H = −Σ p_t log p_t``;
  ``unevenness = 1 − H / log T`` (0: error spread evenly over tokens, 1: on one token);
- ``score = damage · (1 + unevenness · log T) = damage · (1 + KL(p ‖ uniform))``: damage,
  boosted where the error concentrates on few tokens (what a per-token gate can target).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from .ec_init import dense_weight
from .errors import SpearError
from .perplexity import forward_windows

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

    def __init__(self):
        self.n, self.syy, self.sqq, self.syq, self.sy, self.sq = 0, 0, 0, 0, 0, 0
        self.err, self.rel = [], []

    def add(self, y: torch.Tensor, q: torch.Tensor):
        y, q = y.double(), q.double()
        self.n += y.shape[0]
        self.syy = self.syy + y.T @ y
        self.sqq = self.sqq + q.T @ q
        self.syq = self.syq + y.T @ q
        self.sy = self.sy + y.sum(0)
        self.sq = self.sq + q.sum(0)
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
        names = [n for n, m in q_mods.items() if isinstance(m, nn.Linear) and type(m.weight).__name__ == "QuantizedWeight"]
    names = list(names)
    if not names:
        raise SpearError("diagnose: no quantized linear to score")
    w_q = {}
    for n in names:
        if n not in fp_mods or n not in q_mods:
            raise SpearError(f"diagnose: module {n!r} missing from the FP or quantized model")
        if tuple(fp_mods[n].weight.shape) != tuple(q_mods[n].weight.shape):
            raise SpearError(f"diagnose: {n}: FP weight {tuple(fp_mods[n].weight.shape)} vs quantized {tuple(q_mods[n].weight.shape)}")
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
            "score": damage * (1.0 + unev * math.log(err.numel())),
            "rel_err_mean": float(rel.mean()), "rel_err_cv": float(rel.std() / rel.mean().clamp(min=1e-12)),
            "rel_err_p50": float(rel.quantile(0.5)), "rel_err_p99": float(rel.quantile(0.99)),
        }
        if keep_tokens:
            r["_rel_tokens"] = rel
        out[n] = r
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
    grid = torch.full((len(layers), len(kinds)), float("nan"))
    for n, s in scores.items():
        layer, kind = split_name(n)
        if layer in layers and kind in kinds:
            grid[layers.index(layer), kinds.index(kind)] = s["score"]
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(kinds), 1 + 0.45 * len(layers)))
    im = ax.imshow(grid.numpy(), cmap="magma", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"damage score {title}".strip(), fontsize=9)
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
