"""Joint training of all ECs against the FP model's output distribution.

Base weights stay frozen; only ``ec_*`` parameters train. The loss is the token-mean
``KL(p_FP ‖ p_quant+EC)`` over the FP model's top-k tokens plus a rest-of-vocabulary bucket, with
the FP top-k computed once and cached (fp16 log-probs + int16 ids: small enough to calibrate on
the whole calibration file). AdamW, linear warm-up then cosine decay; batches drawn from a seeded generator.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ec import CompensatedLinear
from .errors import SpearError
from .qtensor import QuantizedWeight


@torch.no_grad()
def cast_model_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter to ``dtype`` in place; a ``QuantizedWeight`` keeps its codes
    and gets its scale/zero cast (exact when widening, e.g. bf16 -> fp32)."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, QuantizedWeight):
                qw = QuantizedWeight(p.qdata, p.scale.to(dtype), p.zero.to(dtype), p.bits, p.group_size,
                                     p.symmetric, p.shape)
                setattr(mod, name, nn.Parameter(qw, requires_grad=False))
            elif p.dtype.is_floating_point and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def compensated(model: nn.Module) -> List[CompensatedLinear]:
    return [m for m in model.modules() if isinstance(m, CompensatedLinear)]


@torch.no_grad()
def densify_(model: nn.Module) -> nn.Module:
    """Replace every ``QuantizedWeight`` by its dequantized dense weight (same values as the
    reference ``spear::qlinear``: dequantized in float32, cast to the scale dtype). Training runs
    on this copy: no unpacking per step."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, QuantizedWeight):
                setattr(mod, name, nn.Parameter(p.dequantize(torch.float32).to(p.dtype), requires_grad=False))
    return model


@torch.no_grad()
def teacher_topk(fp_model: nn.Module, wins: torch.Tensor, k: int = 64, batch_size: int = 8):
    """The FP model's top-``k`` log-probabilities (fp16) and token ids (int16) ``[W, T, k]`` for
    token windows ``wins [W, T]``, on the model's device: a compact cache of its output."""
    if wins.numel() == 0:
        raise SpearError("teacher_topk: empty calibration set")
    device = next(fp_model.parameters()).device
    vals, idxs = [], []
    for i in range(0, wins.shape[0], batch_size):
        logp = F.log_softmax(fp_model(wins[i:i + batch_size].to(device)).logits.float(), -1)
        v, ix = logp.topk(min(k, logp.shape[-1]), dim=-1)
        vals.append(v.to(torch.float16))
        idxs.append(ix.to(torch.int16))
    return torch.cat(vals), torch.cat(idxs)


def kl_to_teacher(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Token-mean KL(p_FP ‖ p_model) over the teacher's top-k tokens plus one bucket for the rest
    of the vocabulary (exact KL of the coarse-grained distributions; the full KL when k = V)."""
    log_q = F.log_softmax(logits.float(), -1)
    lq = log_q.gather(-1, top_idx.long())
    lp = top_logp.float()
    p = lp.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=1e-6)
    q_rest = (1 - lq.exp().sum(-1)).clamp(min=1e-6)
    kl = (p * (lp - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


@torch.no_grad()
def mean_kl(model: nn.Module, wins: torch.Tensor, teacher, batch_size: int = 8) -> float:
    """``kl_to_teacher`` averaged over all windows (e.g. held-out calibration windows)."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, wins.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        total += kl_to_teacher(model(wins[sl].to(device)).logits, teacher[0][sl], teacher[1][sl]).item() * wins[sl].shape[0]
    return total / wins.shape[0]


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(steps * warmup))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train_ecs(model: nn.Module, wins: torch.Tensor, teacher, steps: int = 300,
              lr: float = 1e-3, batch_size: int = 8, gate_lr_mult: float = 1.0, weight_decay: float = 0.0,
              seed: int = 0, progress: bool = True) -> List[float]:
    """Train the ECs of ``model`` (fp32 recommended) in place; returns the loss per step.

    ``wins [W, T]`` token windows and ``teacher`` their cached ``(top_logp, top_idx)`` from
    ``teacher_topk``.
    """
    ecs = compensated(model)
    if not ecs:
        raise SpearError("train_ecs: the model has no CompensatedLinear to train")
    top_logp, top_idx = teacher
    if wins.numel() == 0 or wins.shape[:2] != top_logp.shape[:2]:
        raise SpearError(f"train_ecs: windows {tuple(wins.shape)} and teacher cache {tuple(top_logp.shape)} do not match")
    if steps < 0 or batch_size < 1:
        raise SpearError(f"train_ecs: steps={steps} must be >= 0 and batch_size={batch_size} >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    main = [p for m in ecs for p in (m.ec_A, m.ec_B)]
    gates = [p for m in ecs for p in (m.ec_gate_w, m.ec_gate_b) if p is not None]
    for p in main + gates:
        p.requires_grad_(True)
    groups = [{"params": main, "lr_mult": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_mult": gate_lr_mult})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train ECs", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, wins.shape[0], (min(batch_size, wins.shape[0]),), generator=gen)
        x = wins[idx].to(device)
        t_idx = idx.to(top_logp.device)
        loss = kl_to_teacher(model(x).logits, top_logp[t_idx], top_idx[t_idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr) * g["lr_mult"]
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    model.train(was_training)
    for p in main + gates:
        p.requires_grad_(False)
    return losses
