"""Activation-aware SVD initialisation of an EC (EoRA / QERA style).

With the input second moment ``Σ = XᵀX / n`` of a linear, the rank-r ``B A`` minimising
``||(W − W_q − B A) X||`` is the truncated SVD of ``E Σ^{1/2}`` (``E = W − W_q``) mapped back
by ``Σ^{-1/2}``: ``E Σ^{1/2} ≈ U_r S_r V_rᵀ``, ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_rᵀ Σ^{-1/2}``.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn as nn

from .module import CompensatedLinear
from ..errors import SpearError
from ..perplexity import forward_windows
from ..quant.weight import QuantizedWeight


def dense_weight(w: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]`` of a plain or quantized weight."""
    return w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else w.detach().float()


@torch.no_grad()
def input_second_moments(model: nn.Module, wins: torch.Tensor, names: Iterable[str],
                         batch_size: int = 8) -> Dict[str, torch.Tensor]:
    """``{name: Σ [K, K] float64}`` of the inputs the named linears see while ``model`` runs
    over token windows ``wins [W, T]``."""
    if wins.numel() == 0:
        raise SpearError("input_second_moments: empty calibration set")
    modules = dict(model.named_modules())
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name in names:
        if name not in modules:
            raise SpearError(f"input_second_moments: {name!r} is not a module of {type(model).__name__}")
        hooks.append(modules[name].register_forward_pre_hook(hook(name)))
    forward_windows(model, wins, hooks, batch_size)
    return {n: (sums[n] / counts[n]).cpu() for n in sums}


def svd_factors(err: torch.Tensor, sigma: torch.Tensor, rank: int, damp: float = 1e-6, spectrum: bool = False):
    """``(A [r, K], B [N, r])`` float32 with ``B A`` the Σ-weighted best rank-r approximation of
    ``err [N, K]``. ``damp`` (relative to mean eigenvalue) keeps ``Σ^{-1/2}`` finite. Rows of A and
    columns of B come in decreasing singular value, so the rank-r' factors (r' < r) are their
    first r' rows / columns. With ``spectrum`` also the singular values of ``err Σ^{1/2}`` (all)."""
    n, k = err.shape
    if sigma.shape != (k, k):
        raise SpearError(f"svd_factors: Σ shape {tuple(sigma.shape)} does not match error shape {tuple(err.shape)}")
    if not 0 <= rank <= min(n, k):
        raise SpearError(f"svd_factors: rank={rank} must be in [0, min(N={n}, K={k})]")
    sigma = sigma.to(err.device, torch.float64)
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    evals = evals.clamp(min=0) + damp * evals.clamp(min=0).mean().clamp(min=1e-12)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs * evals.rsqrt()) @ evecs.T
    u, s, vh = torch.linalg.svd(err.double() @ root, full_matrices=False)
    s_half = s[:rank].sqrt()
    b = u[:, :rank] * s_half
    a = (s_half[:, None] * vh[:rank]) @ inv_root
    return (a.float(), b.float(), s.float()) if spectrum else (a.float(), b.float())


def captured_fraction(s: torch.Tensor) -> torch.Tensor:
    """``c[r]`` (r = 0..len(s)): the share of ``||E Σ^{1/2}||_F²`` that the rank-r truncated SVD
    (singular values ``s``) removes, i.e. how much of a module's output error (on the calibration
    inputs) a rank-r EC initialised by :func:`svd_factors` cancels."""
    e = s.double().square()
    return torch.cat([e.new_zeros(1), e.cumsum(0) / e.sum().clamp(min=1e-300)])


@torch.no_grad()
def svd_init_(module: CompensatedLinear, w_fp: torch.Tensor, sigma: torch.Tensor) -> CompensatedLinear:
    """Set ``module.ec_A``/``ec_B`` from the activation-aware SVD of ``w_fp − W_q``; the gate
    stays at its identity init (``g ≡ 1``)."""
    if not isinstance(module, CompensatedLinear):
        raise SpearError(f"svd_init_: expected a CompensatedLinear, got {type(module).__name__}")
    w_q = dense_weight(module.weight)
    if w_fp.shape != w_q.shape:
        raise SpearError(f"svd_init_: FP weight shape {tuple(w_fp.shape)} != quantized weight shape {tuple(w_q.shape)}")
    a, b = svd_factors(w_fp.float() - w_q, sigma, module.rank)
    module.ec_A.copy_(a.to(module.ec_A))
    module.ec_B.copy_(b.to(module.ec_B))
    return module
