"""Phase-aware dispatch for ``spear::fused_linear`` on the 4-bit container: which kernel runs one linear call.

``launch`` flattens x to ``[M, K]`` and picks, by M bucket (1, 2-4, 5-16: decode; 17-64, 65-256, 257-1024, >1024:
prefill), a config (``configs``) from the candidates (``candidates``) the tuner (``tuner``, ``runtime.TUNER``) timed
for this key, and runs it:

* ``DecodeConfig``: split-K GEMV with the EC in the same launch or after a u kernel (``decode``);
* ``PrefillConfig``: the Triton W4 GEMM, EC in the epilogue (``prefill``);
* ``DequantCublasConfig``: dequantize + cuBLAS, the EC joined as the tuner picks per key (``prefill``);
* ``GluonW4Config``: the Gluon Hopper GEMM, EC-free keys at 64 < M <= 1024 on sm_90 (``gluon_w4``;
  ``SPEAR_GLUON_KERNEL=0``: not a candidate); its swapped-operand variant at 2 <= M <= 1024, EC keys too (the EC in
  its epilogue; ``SPEAR_GLUON_SWAP=0``: not a candidate);
* ``CInConfig`` (EC keys, M >= 2): the EC term first (prologue + a cuBLAS ``v Bᵀ``), then one of the EC-free key's
  fastest configs adds ``x Wᵀ`` into it (``c_in``).

The config is timed on the first CUDA call of each key and cached in-process and on disk (``tune_cache``); during
CUDA-graph capture, under the interpreter, or with ``SPEAR_AUTOTUNE=0`` the heuristic default is used. ``choose``
names what ``launch`` would run. CUDA-graph safe once warmed up (run each shape once before capture, on the stream
that captures: that tunes and allocates its workspaces): no host sync, no ``.item()``; the decode workspaces
(``workspace``, one per device and stream) are reset by the kernels themselves; only the output (and prefill's small
``u``) is allocated. Sibling linears of one x: ``grouped``.

Tensor parallelism hook: ``project_u`` is the separable u partial-sum step; a caller that all-reduces u across GPUs
passes the reduced ``u=`` to ``launch``, and the kernels skip their own.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import options
from ..errors import SpearError
from . import batched, c_in, gluon_w4
from .candidates import (decode_candidates, decode_ec_candidates, default_config, num_sms,  # noqa: F401
                         prefill_candidates)
from .configs import (MAX_DECODE_M, MAX_EC_RANK, CInConfig, DecodeConfig, DequantCublasConfig,  # noqa: F401
                      GluonW4Config, GroupedConfig, PrefillConfig)
from .decode import project_u, run_decode  # noqa: F401  (project_u: the tensor-parallel hook, public here)
from .prefill import contiguous_ec, run_dequant_cublas, run_prefill
from .runtime import TUNER
from .tuner import linear_key

MAX_GLUON_M = 1024  # the Gluon GEMM is a tuning candidate for EC-free keys at 64 < M <= this


def runner(cfg):
    """The runner of a config's kind: ``runner(cfg)(cfg, x2, qdata, ..., u, y)``."""
    if isinstance(cfg, batched.BatchedConfig):
        return batched.run_single
    if isinstance(cfg, DecodeConfig):
        return run_decode
    if isinstance(cfg, PrefillConfig):
        return run_prefill
    if isinstance(cfg, GluonW4Config):
        return gluon_w4.run_single
    if isinstance(cfg, CInConfig):
        return c_in.run_c_in
    return run_dequant_cublas


def clear_tuning():
    """Forget this process's tuned configs, their timings and loaded cache files (the files on disk stay)."""
    TUNER.clear()


def own_candidates(x2, args, group_size, sms, has_ec=False, gated=False, head=None):
    """The configs whose kernels run ``args``' linear (and its EC, ``has_ec``) in one go, for the tuner; ``head``:
    the decode / prefill kernels' own list when the caller has it."""
    m, k = x2.shape
    n = args[1].shape[0]
    if head is not None:
        cands = head
    else:
        cands = (decode_candidates(k, n, group_size, sms, has_ec, m) if m <= MAX_DECODE_M
                 else prefill_candidates(m, k, group_size, has_ec, gated))
    if args[10] is None:  # the batched tensor-core kernel for 2 <= M <= 512 (not with a given u: the TP hook)
        cands = cands + batched.candidates_for(m, k, [n], group_size, sms, has_ec, args[7].shape[1] if has_ec else 0)
    if not has_ec and MAX_GLUON_M >= m > 64 and options.current().gluon_kernel \
            and gluon_w4.supported(x2, args[1], group_size):
        # the Gluon Hopper GEMM (dequantize under the async wgmma): won 7B M = 128-256 on an H100, lost M >= 1024
        # (bench/results/gluon_w4_h100_s26.md)
        cands = cands + gluon_w4.gluon_candidates(m, k, n, group_size, sms)
    return cands + _swap_candidates(x2, args, group_size, sms, has_ec)


def _swap_candidates(x2, args, group_size, sms, has_ec):
    """The Gluon GEMM's swapped-operand variant (W in registers as the wgmma A operand, split-K) at 2 <= M <= 1024:
    per kernel 0.75-0.91x the Gluon GEMM at M = 128-256 (gluon_w4_swap_h100_s28.md); the tuned layer 0.64-0.97x
    without it at M = 64-512 (s30). EC keys too: the tiles that take the EC in their epilogue (``swap_ec_fits``)."""
    m, k = x2.shape
    if not (MAX_GLUON_M >= m >= 2 and options.current().gluon_swap and gluon_w4.supported(x2, args[1], group_size)):
        return []
    cands = gluon_w4.swap_candidates(m, k, args[1].shape[0], group_size, sms)
    return [c for c in cands if gluon_w4.swap_ec_fits(c, args[7].shape[1])] if has_ec else cands


def config_for(x2, args, k, n, group_size, has_ec, gated):
    """The config ``launch`` runs for ``args`` (``x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w,
    gate_b, u, y``): the tuner's pick for the key, or the default where it cannot time (CPU, capture, off)."""
    m = x2.shape[0]
    key = linear_key(m, k, n, group_size, x2.dtype, has_ec, gated, args[7].shape[1] if has_ec else 0)
    if key in TUNER.picks:
        return TUNER.picks[key]
    sms = num_sms(x2.device)
    if not TUNER.can_tune(x2):
        return default_config(m, k, n, group_size, sms, has_ec)
    if has_ec:  # the EC rides on the EC-free key's fastest configs (that key tuned first, outside this one's timing)
        free_args = (*args[:6], None, None, None, None, None, torch.empty_like(args[-1]))
        config_for(x2, free_args, k, n, group_size, False, False)
        free_key = linear_key(m, k, n, group_size, x2.dtype, False, False)
        head = None   # (above M = 16: the prefill kernels' EC list)
        if m <= MAX_DECODE_M:   # the GEMV's EC modes over the EC-free key's fastest GEMV configs
            head = decode_ec_candidates(TUNER.ranked(free_key, decode_candidates(k, n, group_size, sms, False, m)),
                                        k, n, sms)
        cands = own_candidates(x2, args, group_size, sms, True, gated, head)
        if m >= 2:   # the EC as the C input of the EC-free key's fastest kernels (lowering.c_in)
            cands = cands + c_in.candidates(TUNER.ranked(free_key, own_candidates(x2, free_args, group_size, sms)))
    else:
        cands = own_candidates(x2, args, group_size, sms)
    y = args[-1]
    return TUNER.pick(key, x2.device, cands, lambda cfg: runner(cfg)(cfg, *args),
                      lambda: run_dequant_cublas(None, *args[:-1], torch.empty_like(y)), y)


def choose(m: int, k: int, n: int, group_size: int, dtype=torch.bfloat16, ec_rank: int = 0, gated: bool = False) -> str:
    """Human-readable name of the kernel + config ``launch`` would use for this call."""
    group_size = group_size or k
    ec_rank = ec_rank or 0
    key = linear_key(m, k, n, group_size, dtype, ec_rank > 0, gated, ec_rank)
    ec = "" if ec_rank <= 0 else f" + EC r={ec_rank}{' gated' if gated else ' static'}"
    if key in TUNER.picks:
        return f"{TUNER.picks[key].name}{ec} (tuned, bucket M<={key.m_bucket})"
    return f"{default_config(m, k, n, group_size, has_ec=ec_rank > 0).name}{ec} (default; tuned on first CUDA call)"


def rows_and_out(x: torch.Tensor, n: int):
    """``x`` as ``[M, K]`` rows with unit stride, M, and an empty ``[M, n]`` output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.shape[0], torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)


def launch(x, qdata, scale, zero, bias, group_size, ec_A=None, ec_B=None, gate_w=None, gate_b=None,
           u: Optional[torch.Tensor] = None, config=None):
    """Quantized linear (+ bias) (+ gated/static EC) on the 4-bit container; x is ``[..., K]``.

    ``u``: precomputed ``x Aᵀ`` ``[M, r]`` (e.g. all-reduced across GPUs); ``config``: force one.
    """
    check_linear(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u)
    ec_A, ec_B, gate_w, gate_b = contiguous_ec(ec_A, ec_B, gate_w, gate_b)
    k = x.shape[-1]
    n = qdata.shape[0]
    x2, m, y = rows_and_out(x, n)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    if u is not None:
        u = u.reshape(m, -1)
    args = (x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    cfg = config or config_for(x2, args, k, n, group_size, ec_B is not None, gate_w is not None)
    if isinstance(cfg, DecodeConfig) and m > MAX_DECODE_M:
        raise SpearError(f"spear_compile.lowering.dispatch: decode config given for M={m} > {MAX_DECODE_M}")
    runner(cfg)(cfg, *args)
    return y.reshape(*x.shape[:-1], n)


def check_linear(x, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u):
    """Refuses operands the kernels cannot take, naming the operand and its expected shape and dtype."""
    where = "spear_compile.lowering.dispatch.launch"
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise SpearError(f"{where}: activations must be bf16/fp16, got {x.dtype}")
    k = x.shape[-1]
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] * 2 != k:
        raise SpearError(f"{where}: qdata must be uint8 [N, K/2] for K={k}, got {qdata.dtype} {tuple(qdata.shape)}")
    n = qdata.shape[0]
    if group_size <= 0 or k % group_size:
        raise SpearError(f"{where}: group_size={group_size} must divide K={k}")
    if group_size < k and (group_size < 16 or group_size & (group_size - 1)):
        raise SpearError(f"{where}: group_size={group_size} must be a power of two >= 16 (or K for per-channel)")
    groups = k // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (n, groups) or t.dtype != x.dtype:
            raise SpearError(f"{where}: {name} must be {x.dtype} [{n}, {groups}], got {t.dtype} {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise SpearError(f"{where}: bias must be [{n}], got {tuple(bias.shape)}")
    if ec_A is None and u is None:
        if ec_B is not None or gate_w is not None:
            raise SpearError(f"{where}: ec_B/gate_w given without ec_A")
        return
    if ec_B is None or ec_B.dim() != 2 or ec_B.shape[0] != n:
        raise SpearError(f"{where}: ec_B must be [N={n}, r], got {None if ec_B is None else tuple(ec_B.shape)}")
    r = ec_B.shape[1]
    if r > MAX_EC_RANK:
        raise SpearError(f"{where}: EC rank {r} exceeds the kernels' limit {MAX_EC_RANK}")
    if ec_A is not None and tuple(ec_A.shape) != (r, k):
        raise SpearError(f"{where}: ec_A must be [r={r}, K={k}], got {tuple(ec_A.shape)}")
    if u is not None and u.shape[-1] != r:
        raise SpearError(f"{where}: u must be [M, r={r}], got {tuple(u.shape)}")
    if gate_w is not None and (tuple(gate_w.shape) != (r, r) or gate_b is None or tuple(gate_b.shape) != (r,)):
        raise SpearError(f"{where}: gate_w must be [{r}, {r}] with gate_b [{r}]")

