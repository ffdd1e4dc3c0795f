"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse input Hessian.

Weight level: :func:`gptq_quantize_weight`. Model level: :func:`gptq_quantize_model` collects
each linear's Hessian ``H = 2/n · XᵀX`` from calibration activations with forward hooks, block by
block (one transformer block at a time, so later blocks see the already-quantized earlier
ones), and stores the codes as ``QuantizedWeight``. Everything is float32 internally; scales
and zeros are rounded to the weight dtype when a group starts, so the stored parameters are
exactly those the codes were chosen for (same convention as ``rtn.rtn``).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import QuantConfig
from ..errors import SpearError
from .weight import QuantizedWeight
from .rtn import check_weight, qparams

MIN_CALIB_TOKENS = 2


# ---- weight level -------------------------------------------------------------------------
def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``."""
    k = H.shape[0]
    diag = torch.arange(k, device=H.device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise SpearError(f"{name}: Hessian [{k}, {k}] is not positive definite even with damp={damp}; "
                         "raise gptq_damp or use more calibration data") from e


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: Optional[int],
                         symmetric: bool, damp: float = 0.01, block: int = 128, name: str = "weight"):
    """GPTQ one weight ``w [N, K]`` given the input Hessian ``H [K, K]``.

    Returns ``(codes uint8 [N, K], scale, zero)`` with scale/zero ``[N, K // group]`` in ``w.dtype``;
    ``group_size=None`` is per-channel. Dead input channels (``H_kk = 0``) are zeroed.
    """
    if w.ndim != 2:
        raise SpearError(f"{name}: expected a 2-D linear weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    gs = k if group_size is None else group_size
    check_weight(w, gs, name)
    if H.shape != (k, k):
        raise SpearError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight shape {tuple(w.shape)} "
                         f"(expected [{k}, {k}])")
    if not torch.isfinite(H).all():
        raise SpearError(f"{name}: Hessian has NaN/inf values")
    if block < 1:
        raise SpearError(f"{name}: gptq block must be >= 1, got {block}")
    out_dtype, qmax = w.dtype, 2**bits - 1
    W = w.detach().float().clone()
    H = H.detach().float().clone().to(W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_hessian_cholesky(H, damp, name)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(n, k // gs, dtype=out_dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a group starts: its params from the error-updated weights
                cur = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :gs]
                s, z = qparams(cur, bits, gs, symmetric)
                scales[:, col // gs], zeros[:, col // gs] = s[:, 0].to(out_dtype), z[:, 0].to(out_dtype)
                scale, zero = scales[:, col // gs].float(), zeros[:, col // gs].float()
            wc = W1[:, i]
            q = (torch.round(wc / scale) + zero).clamp(0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (wc - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, zeros


# ---- model level --------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _stop_forward(module, args, output):
    raise _StopForward()


class _HessianHook:
    """Running ``H = 2/n · Σ x xᵀ`` over every token that reaches a linear (float32)."""

    def __init__(self, k: int, device):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.count = 0

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        t = x.shape[0]
        self.H *= self.count / (self.count + t)
        self.count += t
        x = x * (2.0 / self.count) ** 0.5
        self.H += x.t() @ x


def _group_by_block(linears) -> "OrderedDict[str, List[Tuple[str, nn.Linear]]]":
    """Group linears by their enclosing block (``...layers.<i>``); others form their own group."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for name, mod in linears:
        m = re.match(r"^(.*?\.\d+)\.", name)
        key = m.group(1) if m else name
        groups.setdefault(key, []).append((name, mod))
    return groups


def _check_calib(calib) -> torch.Tensor:
    if calib is None:
        raise SpearError("gptq: calibration tokens are required (calib=None); pass a [num_seqs, seq_len] LongTensor")
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or \
            calib.dtype not in (torch.long, torch.int32, torch.int64):
        desc = (f"{type(calib).__name__} {tuple(calib.shape)} {calib.dtype}" if isinstance(calib, torch.Tensor)
                else type(calib).__name__)
        raise SpearError(f"gptq: calib must be a [num_seqs, seq_len] integer tensor, got {desc}")
    if calib.numel() == 0 or calib.shape[0] < 1:
        raise SpearError(f"gptq: calib is empty (shape {tuple(calib.shape)})")
    if calib.shape[1] < MIN_CALIB_TOKENS:
        raise SpearError(f"gptq: calib sequences of {calib.shape[1]} tokens are too short (need >= {MIN_CALIB_TOKENS})")
    return calib.long()


def check_calib_tokens(model: nn.Module, calib) -> None:
    """``calib`` is a valid ``[num_seqs, seq_len]`` token tensor whose ids fit ``model``'s vocabulary."""
    calib = _check_calib(calib)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and (int(calib.min()) < 0 or int(calib.max()) >= vocab):
        raise SpearError(f"gptq: calib token ids span [{int(calib.min())}, {int(calib.max())}], outside the model's "
                         f"vocabulary [0, {vocab - 1}]")


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, cfg: QuantConfig, calib: Optional[torch.Tensor], linears,
                        progress: bool = True, batch_size: int = 8) -> nn.Module:
    """Quantize ``linears`` (``[(name, nn.Linear)]``) of ``model`` in place with GPTQ.

    For each block: hook its linears, run the model on ``calib`` until the block's last linear
    has run (the rest of the forward is skipped), GPTQ each linear with its Hessian.
    """
    calib = _check_calib(calib)
    device = next(model.parameters()).device
    for name, mod in linears:
        if isinstance(mod.weight, QuantizedWeight):
            raise SpearError(f"{name}: already quantized")
        check_weight(mod.weight, mod.in_features if cfg.group_size is None else cfg.group_size, f"{name}.weight")
    groups = _group_by_block(linears)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(linears), desc=f"gptq {cfg.spec}", disable=not progress, leave=False)
    try:
        _gptq_blocks(model, cfg, calib, groups, device, batch_size, bar)
    finally:
        bar.close()
        model.train(was_training)
    return model


def _gptq_blocks(model, cfg, calib, groups, device, batch_size, bar) -> None:
    for block_linears in groups.values():
        hooks = {name: _HessianHook(mod.in_features, device) for name, mod in block_linears}
        handles = [mod.register_forward_hook(hooks[name]) for name, mod in block_linears]
        last = block_linears[-1][1]
        stop = last.register_forward_hook(_stop_forward)
        try:
            for i in range(0, calib.shape[0], batch_size):
                try:
                    model(calib[i:i + batch_size].to(device))
                except _StopForward:
                    pass
        finally:
            for h in handles + [stop]:
                h.remove()
        for name, mod in block_linears:
            if hooks[name].count == 0:
                raise SpearError(f"gptq: linear {name!r} never ran on the calibration data; cannot collect its Hessian")
            q, s, z = gptq_quantize_weight(mod.weight.data, hooks[name].H, cfg.bits, cfg.group_size, cfg.symmetric,
                                           cfg.gptq_damp, cfg.gptq_block, name=f"{name}.weight")
            gs = mod.in_features if cfg.group_size is None else cfg.group_size
            mod.weight = nn.Parameter(QuantizedWeight.from_codes(q, s, z, cfg.bits, gs, cfg.symmetric),
                                      requires_grad=False)
            hooks[name].H = None
            bar.update(1)
