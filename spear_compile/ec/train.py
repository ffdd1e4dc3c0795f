"""Joint training of ECs against the FP model's output distribution, many fits at once.

Base weights stay frozen; only the EC parameters train. The loss is the token-mean
``KL(p_FP ‖ p_quant+EC)`` over the FP model's top-k tokens plus a rest-of-vocabulary bucket, with
the FP top-k computed once and cached (fp16 log-probs + int16 ids: small enough to calibrate on
the whole calibration file), or, with the FP model passed to :func:`train_stacked`, the
full-vocabulary KL with the FP model run beside each step (no cache). Adam (no weight decay),
linear warm-up then cosine decay; batches drawn from a seeded generator per fit.

Several fits (placements, gates, seeds, learning rates) of one quantized model train *together*:
every linear that any fit compensates becomes a :class:`StackedEC` holding one EC per fit, the
batch is the fits' batches stacked (fit-major), and each fit's EC sees only its own chunk. Fits
share no parameter and Adam is element-wise, so the summed loss trains each fit exactly as if it
ran alone (up to floating-point reduction order), at the cost of one larger step instead of
F launch-bound small ones.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SpearError
from ..modules import replace_submodule
from ..quant.weight import QuantizedWeight


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


def kl_per_token(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_FP ‖ p_model) ``[..., T]`` over the teacher's top-k tokens plus one bucket for
    the rest of the vocabulary (exact KL of the coarse-grained distributions; the full KL when k = V)."""
    log_q = F.log_softmax(logits.float(), -1)
    lq = log_q.gather(-1, top_idx.long())
    lp = top_logp.float()
    p = lp.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=1e-6)
    q_rest = (1 - lq.exp().sum(-1)).clamp(min=1e-6)
    return (p * (lp - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def kl_to_teacher(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Token-mean of :func:`kl_per_token`."""
    return kl_per_token(logits, top_logp, top_idx).mean()


def kl_full_per_token(logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_FP ‖ p_model) ``[..., T]`` over the whole vocabulary, from the teacher's
    log-probabilities ``[..., T, V]``."""
    lp = teacher_logp.float()
    return (lp.exp() * (lp - F.log_softmax(logits.float(), -1))).sum(-1)


def online_kl(logits: torch.Tensor, teacher_logp: torch.Tensor, topks: Sequence[int]) -> torch.Tensor:
    """Per-fit token-mean KL ``[F]`` for a fit-major stacked batch (``logits``/``teacher_logp``
    ``[F·b, T, V]``): fit ``f`` gets the full-vocabulary KL (``topks[f]`` 0) or the top-k
    coarse-grained one of :func:`kl_per_token` with the top ``topks[f]`` FP tokens."""
    nf = len(topks)
    lg, lp = logits.reshape(nf, -1, *logits.shape[1:]), teacher_logp.reshape(nf, -1, *teacher_logp.shape[1:])
    out = []
    for f, k in enumerate(topks):
        if not k or k >= lp.shape[-1]:
            out.append(kl_full_per_token(lg[f], lp[f]).mean())
        else:
            top = lp[f].topk(int(k), dim=-1)
            out.append(kl_per_token(lg[f], top.values, top.indices).mean())
    return torch.stack(out)


@torch.no_grad()
def mean_kl_full(model: nn.Module, wins: torch.Tensor, fp_model: nn.Module, batch_size: int = 8,
                 n_fits: int = 1):
    """Full-vocabulary KL(p_FP ‖ p_model), token mean over windows ``wins [W, T]``, the FP model run
    alongside (no cache). ``n_fits > 1``: a stacked model, one KL per fit (as :func:`mean_kl`)."""
    device = next(model.parameters()).device
    total = torch.zeros(n_fits, dtype=torch.float64)
    for i in range(0, wins.shape[0], batch_size):
        x = wins[i:i + batch_size].to(device)
        lp = F.log_softmax(fp_model(x).logits.float(), -1)
        kl = kl_full_per_token(model(x.repeat(n_fits, 1)).logits, lp.repeat(n_fits, 1, 1))
        total += kl.reshape(n_fits, -1).mean(1).double().cpu() * x.shape[0]
    out = (total / wins.shape[0]).tolist()
    return out[0] if n_fits == 1 else out


@torch.no_grad()
def mean_kl(model: nn.Module, wins: torch.Tensor, teacher, batch_size: int = 8, n_fits: int = 1):
    """``kl_to_teacher`` averaged over all windows (e.g. held-out calibration windows). With
    ``n_fits > 1`` the model is a stacked one (:func:`stack_ecs_`): every batch is repeated once per
    fit and a list of ``n_fits`` KLs is returned."""
    device = next(model.parameters()).device
    total = torch.zeros(n_fits, dtype=torch.float64)
    for i in range(0, wins.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        x = wins[sl].to(device)
        logits = model(x.repeat(n_fits, 1)).logits
        kl = kl_per_token(logits, teacher[0][sl].repeat(n_fits, 1, 1), teacher[1][sl].repeat(n_fits, 1, 1))
        total += kl.reshape(n_fits, -1).mean(1).double().cpu() * x.shape[0]
    out = (total / wins.shape[0]).tolist()
    return out[0] if n_fits == 1 else out


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05) -> float:
    w = max(1, int(steps * warmup))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


class StackedEC(nn.Module):
    """One frozen linear plus ``F`` independent ECs, one per fit, at ranks ``ranks[f]`` (0: none)
    with gate ``gates[f]`` (``"sigmoid"`` or ``"none"``). The
    input's leading (batch) dimension holds ``F`` equal chunks, fit-major; chunk ``f`` gets EC ``f``.
    Per fit the same function as :class:`~spear_compile.ec.module.CompensatedLinear`:
    ``W x + b + B (g(A x) ⊙ A x)``.

    Ranks are padded to the largest with zeros, and zeros they stay: a padded coordinate has
    ``A`` row = 0 and ``B`` column = 0 (and zero gate weights to and from it), so every gradient
    reaching it is exactly 0 and Adam never moves it (no masks needed in the forward). A static
    fit's gate parameters, where gated fits share the module, get their gradient masked to 0
    (``g ≡ 1`` exactly).

    With ``stats`` set to ``{}``, every forward adds per-fit gate statistics to it (``gate_stats``).
    """

    GATE_KINDS = ("none", "sigmoid")

    def __init__(self, linear: nn.Linear, ranks: Sequence[int], gates: Sequence[str]):
        super().__init__()
        if len(ranks) != len(gates) or not ranks:
            raise SpearError(f"StackedEC: {len(ranks)} ranks vs {len(gates)} gates")
        if any(g not in self.GATE_KINDS for g in gates):
            raise SpearError(f"StackedEC: gates must be among {self.GATE_KINDS}, got {list(gates)}")
        k, n = linear.in_features, linear.out_features
        if any(r < 0 or r > min(n, k) for r in ranks):
            raise SpearError(f"StackedEC: ranks {list(ranks)} must be in [0, min(N={n}, K={k})]")
        self.linear, self.in_features, self.out_features = linear, k, n
        nf, r = len(ranks), max(1, max(ranks))
        dev = linear.weight.device
        z = lambda *s: nn.Parameter(torch.zeros(*s, device=dev, dtype=torch.float32))  # noqa: E731
        self.A, self.B, self.Wg, self.bg = z(nf, r, k), z(nf, n, r), z(nf, r, r), z(nf, r)
        self.ranks, self.gates = list(ranks), list(gates)
        used = [g for g, rk in zip(gates, ranks) if rk]
        self.any_gate = any(g != "none" for g in used)
        self.stats = None
        if self.any_gate and "none" in used:  # static fits beside gated ones: keep their gate at g ≡ 1
            on = torch.tensor([float(g != "none") for g in gates], device=dev)
            self.Wg.register_hook(lambda g, on=on: g * on[:, None, None])
            self.bg.register_hook(lambda g, on=on: g * on[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        nf = self.A.shape[0]
        xs = x.reshape(nf, -1, x.shape[-1]).to(self.A.dtype)
        u = torch.bmm(xs, self.A.transpose(1, 2))
        v = u
        if self.any_gate:
            # the EC gate (``ec.module.gated``) batched over fits
            g = 2.0 * torch.sigmoid(torch.baddbmm(self.bg[:, None, :], u, self.Wg.transpose(1, 2)))
            v = u * g
            if self.stats is not None:
                self._record(u, v, g)
        out = torch.baddbmm(y.reshape(nf, -1, y.shape[-1]).to(self.A.dtype), v, self.B.transpose(1, 2))
        return out.reshape(y.shape).to(y.dtype)

    @torch.no_grad()
    def _record(self, u, v, g):
        """Per fit: sums of |g − 1| over (token, real coordinate), and of the per-token modulation
        ``ρ_t = ||B (g ⊙ u)|| / ||B u||`` of the correction (and of ρ²) over tokens."""
        rk = torch.tensor(self.ranks, device=g.device)
        cm = (torch.arange(g.shape[-1], device=g.device)[None, :] < rk[:, None]).to(g.dtype)  # [F, r]
        dev = ((g - 1).abs() * cm[:, None, :]).sum((1, 2))
        cs = torch.bmm(u, self.B.transpose(1, 2)).norm(dim=-1)
        cg = torch.bmm(v, self.B.transpose(1, 2)).norm(dim=-1)
        rho = cg / cs.clamp(min=1e-30)
        ok = (cs > 0).to(g.dtype)
        new = dict(abs_dev=dev, coords=rk.to(g.dtype) * g.shape[1], rho=(rho * ok).sum(1),
                   rho2=(rho.square() * ok).sum(1), tokens=ok.sum(1))
        for key, val in new.items():
            self.stats[key] = self.stats.get(key, 0) + val.double().cpu()

    def gate_params(self) -> List[nn.Parameter]:
        return [self.Wg, self.bg] if self.any_gate else []

    def ec_state(self, f: int) -> Dict[str, torch.Tensor]:
        """Fit ``f``'s EC as ``CompensatedLinear`` parameters (``{}`` at rank 0)."""
        r = self.ranks[f]
        if r == 0:
            return {}
        out = {"ec_A": self.A[f, :r].detach().clone(), "ec_B": self.B[f, :, :r].detach().clone()}
        if self.gates[f] == "sigmoid":
            out.update(ec_gate_w=self.Wg[f, :r, :r].detach().clone(), ec_gate_b=self.bg[f, :r].detach().clone())
        return out

    @torch.no_grad()
    def set_ec(self, f: int, a: torch.Tensor, b: torch.Tensor, gate_w: Optional[torch.Tensor] = None) -> None:
        """Initialise fit ``f``'s ``A [r, K]`` and ``B [N, r]``; the gate stays at g ≡ 1 unless
        ``gate_w [r, r]`` is given (a gated fit's initial ``W_g``)."""
        r = self.ranks[f]
        self.A[f, :r].copy_(a[:r])
        self.B[f, :, :r].copy_(b[:, :r])
        if gate_w is not None and self.gates[f] != "none":
            self.Wg[f, :r, :r].copy_(gate_w[:r, :r])


def gate_stats(ecs: Sequence[StackedEC], n_fits: int) -> List[Optional[dict]]:
    """Per fit, over the ``StackedEC`` modules' recorded forwards (``stats``): ``gate_abs_dev`` =
    mean |g − 1| over tokens and real coordinates; ``rho_mean`` / ``rho_cv`` = mean and coefficient
    of variation over tokens (and modules) of the per-token modulation of the correction
    ``||B (g ⊙ u)|| / ||B u||`` (1 and 0 for a static EC). ``None`` for fits with no gate."""
    out = []
    for f in range(n_fits):
        acc = {}
        for m in ecs:
            if m.stats and m.gates[f] != "none" and m.ranks[f]:
                for key, val in m.stats.items():
                    acc[key] = acc.get(key, 0.0) + float(val[f])
        if not acc or acc["tokens"] == 0:
            out.append(None)
            continue
        mean = acc["rho"] / acc["tokens"]
        var = max(0.0, acc["rho2"] / acc["tokens"] - mean * mean)
        out.append(dict(gate_abs_dev=acc["abs_dev"] / max(1.0, acc["coords"]), rho_mean=mean,
                        rho_cv=math.sqrt(var) / max(mean, 1e-30)))
    return out


def stack_ecs_(model: nn.Module, ranks: Sequence[Dict[str, int]], gates: Sequence[str]) -> Dict[str, StackedEC]:
    """Replace, in place, every linear of ``model`` that some fit compensates (``ranks[f]``:
    ``{module name: rank}``) by a :class:`StackedEC`; returns ``{name: StackedEC}``."""
    names = [n for n, m in model.named_modules() if any(n in r for r in ranks)]
    out = {}
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise SpearError(f"stack_ecs_: {name!r} is a {type(lin).__name__}, not an nn.Linear")
        out[name] = StackedEC(lin, [r.get(name, 0) for r in ranks], gates)
        replace_submodule(model, name, out[name])
    missing = sorted({n for r in ranks for n in r} - set(out))
    if missing:
        raise SpearError(f"stack_ecs_: no module named {missing[0]!r}")
    return out


def train_stacked(model: nn.Module, wins: torch.Tensor, teacher, seeds: Sequence[int], steps: int = 600,
                  lr=1e-3, batch_size: int = 8, gate_lr_mult=1.0, progress: bool = True,
                  fp_model: Optional[nn.Module] = None, topks: Optional[Sequence[int]] = None) -> List[List[float]]:
    """Train the ``StackedEC`` modules of ``model`` (fp32) in place, ``F = len(seeds)`` fits at once;
    ``lr`` and ``gate_lr_mult`` are scalars or one value per fit. Returns each fit's loss per step.

    ``wins [W, T]`` token windows and ``teacher`` their cached ``(top_logp, top_idx)`` from
    ``teacher_topk``. Fit ``f`` draws its batches from a generator seeded with ``seeds[f]``.
    With ``fp_model`` the teacher is not cached but run on every batch (``teacher`` may be
    ``None``) and fit ``f``'s loss is the full-vocabulary KL (``topks[f]`` 0 or ``None``) or the
    top-``topks[f]`` one (:func:`online_kl`). With the cached teacher, ``topks[f]`` (if given) keeps
    the first ``topks[f]`` of the cached top-k (``teacher_topk`` sorts them; 0/``None``: all).
    """
    ecs = [m for m in model.modules() if isinstance(m, StackedEC)]
    if not ecs:
        raise SpearError("train_ecs: the model has no EC to train")
    nf = len(seeds)
    if any(m.A.shape[0] != nf for m in ecs):
        raise SpearError(f"train_ecs: ECs stacked for {ecs[0].A.shape[0]} fits, {nf} seeds given")
    if fp_model is None:
        if teacher is None:
            raise SpearError("train_ecs: give the cached teacher or the FP model")
        top_logp, top_idx = teacher
        if wins.numel() == 0 or wins.shape[:2] != top_logp.shape[:2]:
            raise SpearError(f"train_ecs: windows {tuple(wins.shape)} and teacher cache {tuple(top_logp.shape)} "
                             "do not match")
        cache_ks = None
        if topks is not None and any(k and k != top_logp.shape[-1] for k in topks):
            cache_ks = [int(k or top_logp.shape[-1]) for k in topks]
            if len(cache_ks) != nf or any(k < 1 or k > top_logp.shape[-1] for k in cache_ks):
                raise SpearError(f"train_ecs: topks {list(topks)} must be {nf} values in [1, {top_logp.shape[-1]}] "
                                 "with a cached teacher")
    else:
        if wins.numel() == 0:
            raise SpearError("train_ecs: empty calibration set")
        topks = [int(k or 0) for k in (topks if topks is not None else [0] * nf)]
        if len(topks) != nf or any(k < 0 for k in topks):
            raise SpearError(f"train_ecs: topks {topks} must be {nf} values >= 0")
    if steps < 0 or batch_size < 1:
        raise SpearError(f"train_ecs: steps={steps} must be >= 0 and batch_size={batch_size} >= 1")
    device = ecs[0].A.device
    per_fit = lambda v: torch.tensor(  # noqa: E731
        [float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * nf)], device=device, dtype=torch.float32)
    lrs, glr = per_fit(lr), per_fit(gate_lr_mult) * per_fit(lr)
    if lrs.numel() != nf or glr.numel() != nf:
        raise SpearError(f"train_ecs: lr / gate_lr_mult need one value or {nf}")
    for p in model.parameters():
        p.requires_grad_(False)
    params, lr_full = [], []  # every trained tensor and its per-element learning rate (per fit)
    for m in ecs:
        for p, plr in [(m.A, lrs), (m.B, lrs)] + [(p, glr) for p in m.gate_params()]:
            params.append(p)
            lr_full.append(plr.view(-1, *([1] * (p.ndim - 1))).expand_as(p).contiguous())
    for p in params:
        p.requires_grad_(True)
    m1s, m2s = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.99, 1e-8
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    wins_d = wins.to(device)
    bs = min(batch_size, wins.shape[0])
    was_training = model.training
    model.train()
    losses = torch.zeros(steps, nf, device=device)
    bar = tqdm(range(steps), desc=f"train ECs ({nf} fit{'s' * (nf > 1)})", disable=not progress, leave=False)
    for step in bar:
        idx = torch.cat([torch.randint(0, wins.shape[0], (bs,), generator=g) for g in gens])
        x = wins_d[idx.to(device)]
        if fp_model is None:
            t_idx = idx.to(top_logp.device)
            logits = model(x).logits
            if cache_ks is None:
                loss = kl_per_token(logits, top_logp[t_idx], top_idx[t_idx]).reshape(nf, -1).mean(1)
            else:  # fit f: the first (largest) cache_ks[f] of the cached top-k
                lg, tl, ti = (t.reshape(nf, -1, *t.shape[1:]) for t in (logits, top_logp[t_idx], top_idx[t_idx]))
                loss = torch.stack([kl_per_token(lg[f], tl[f][..., :k], ti[f][..., :k]).mean()
                                    for f, k in enumerate(cache_ks)])
        else:
            with torch.no_grad():
                t_logp = F.log_softmax(fp_model(x).logits.float(), -1)
            loss = online_kl(model(x).logits, t_logp, topks)
            del t_logp
        for p in params:
            p.grad = None
        loss.sum().backward()
        t = step + 1
        with torch.no_grad():  # Adam (AdamW without decay), multi-tensor ops: one launch per op, not per tensor
            grads = [p.grad for p in params]
            torch._foreach_mul_(m1s, b1)
            torch._foreach_add_(m1s, grads, alpha=1 - b1)
            torch._foreach_mul_(m2s, b2)
            torch._foreach_addcmul_(m2s, grads, grads, value=1 - b2)
            denom = torch._foreach_mul(m2s, 1.0 / (1 - b2 ** t))
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            upd = torch._foreach_mul(m1s, lr_full)
            torch._foreach_div_(upd, denom)
            torch._foreach_add_(params, upd, alpha=-lr_at(step, steps, 1.0) / (1 - b1 ** t))
        losses[step] = loss.detach()
        if progress and step % 10 == 0:
            bar.set_postfix(kl=f"{loss.detach().mean().item():.4f}")
    model.train(was_training)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return losses.T.cpu().tolist()
