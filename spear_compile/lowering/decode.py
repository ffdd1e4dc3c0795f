"""Decode runners (M <= 16): the int32-word GEMV (``w4_gemv_kernel``) and the byte kernel (``w4_decode_kernel``),
each with the EC in the same launch or after ``ec_u_kernel`` (``EcMode``), on the current stream's workspace."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from .. import options
from ..errors import SpearError
from ..kernels.ec_tiles import ec_u_kernel
from ..kernels.w4_decode import w4_decode_kernel
from ..kernels.w4_gemv import w4_gemv_kernel
from .configs import SLOT_TILES, EcMode, Nibbles, block_r, cdiv, next_pow2, valid_block_k
from .precompile import launcher, pdl_ok
from .runtime import WORKSPACES

SLOT_SPINS = 1 << 20  # EC "slots": re-reads of stale slot words before a tile is poisoned


def groups_per_block(cfg, m, k, group_size) -> int:
    """Groups per K block for a ``seg`` config that applies here (M = 1, grouped scales, the block a power-of-two
    multiple of the group), else 0 (the regular paths)."""
    if not getattr(cfg, "seg", False) or m != 1 or cfg.tc or group_size >= k or group_size % 16:
        return 0
    gpb = cfg.block_k // group_size
    return gpb if gpb >= 2 and gpb * group_size == cfg.block_k and gpb & (gpb - 1) == 0 else 0


def _stages(cfg, m) -> int:
    """Software-pipelining depth of a gemv config where it applies (M = 1, FMA path), else 0."""
    return cfg.stages if m == 1 and not cfg.tc else 0


def load_kwargs(cfg, x2):
    """The load-path launch arguments of both GEMV kernels: ``STAGES``, ``LEAN`` (the nibble scheme; the lop3 asm needs
    the GPU: plain ops under the interpreter, 2 -> 1, 3 -> 4; + 8 for the rows-inner seg tile ``rt``, which only
    ``_w_tile_seg`` reads, so the entry kernels pass it through unchanged), ``XW`` (x as int32 pairs: needs a 4-byte
    aligned x row), ``KW_DIV`` (largest power of two <= 16 dividing K / 8: the row starts' alignment in words, for 16-byte loads), ``TMA``, and ``maxnreg``."""
    m, k = x2.shape
    fma = m == 1 and not cfg.tc
    kw = k // 8
    div = 1
    while div < 16 and kw % (2 * div) == 0:
        div *= 2
    tma = bool(cfg.tma and fma and cfg.stages and not cfg.seg and div >= 4)
    if tma:
        _ensure_allocator()
    lean = int(cfg.lean) if fma else 0
    if lean and options.interpret():  # the lop3 asm needs the GPU: plain shifts, and pairs by the kernels' scheme 4
        lean = {Nibbles.SHIFT_AND_OR: 1, Nibbles.LOP3: 1, Nibbles.PAIR: 4}[lean]
    if fma and getattr(cfg, "rt", False) and cfg.seg:  # read only by _w_tile_seg (GPB > 0); the other bodies use LEAN % 8
        lean += 8
    return dict(STAGES=_stages(cfg, m), LEAN=lean,
                XW=bool(cfg.xw and fma and cfg.stages and x2.data_ptr() % 4 == 0), KW_DIV=div, TMA=tma,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not options.interpret() else {}))


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-made TMA descriptors live in Triton's per-launch global scratch: give Triton an allocator (the
    torch caching allocator; inside CUDA-graph capture it draws from the graph's pool) unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def project_u(x2: torch.Tensor, ec_A: torch.Tensor) -> torch.Tensor:
    """The separable EC step ``u = x Aᵀ`` (a tensor-parallel caller all-reduces this and passes ``u=``)."""
    return F.linear(x2, ec_A)


@dataclass(frozen=True)
class _DecodeSetup:
    """What both decode launchers need besides the config: workspaces and the EC's u-tile geometry."""
    acc: torch.Tensor
    arrive: torch.Tensor
    sync: torch.Tensor
    u_buf: torch.Tensor
    u: Optional[torch.Tensor]
    r: int
    block_r: int
    block_ku: int
    num_u_tiles: int  # u tiles inside the W launch
    mode: EcMode = EcMode.SPIN  # the W kernel's EC_MODE
    u_kernel_tiles: int = 0  # > 0: ec_u_kernel runs first with this many programs (modes pdl/2k)
    gu: Optional[torch.Tensor] = None  # the tagged g(u)⊙u words (modes epoch/pdl/2k; else the sync buffer)
    phase: Optional[torch.Tensor] = None  # epoch, then one phase per N tile (mode epoch); the ep scratch (pdl/2k);
    #                                       else the sync buffer (the kernels' unused pointer)
    b_early: bool = True
    gdc: bool = False
    u_sub: int = 1  # mode slots: BLOCK_KU sub-blocks per u tile
    block_u: int = 1  # mode slots: power of two >= the u tiles


def _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles=0, split=1, slots_ok=False) -> _DecodeSetup:
    """``slots_ok``: the launch is the M = 1 FMA GEMV, where mode "slots" exists (elsewhere it runs as "epoch")."""
    ws = WORKSPACES.get(x2.device)
    acc, arrive = ws.for_n(n)
    has_ec = ec_B is not None
    r = ec_B.shape[1] if has_ec else 0
    br = block_r(r)
    block_ku = max(32, 8192 // br)
    tiles = cdiv(x2.shape[1], block_ku) if has_ec and u is None else 0
    if cfg.ec not in EcMode.names() or cfg.ec_b not in ("auto", "early", "late"):
        raise SpearError(f"spear_compile.lowering: unknown EC mode in {cfg.name}; modes: {EcMode.names()}")
    mode = EcMode.of(cfg.ec) if tiles else EcMode.SPIN
    if mode >= EcMode.SLOTS and not slots_ok:
        mode = EcMode.EPOCH
    gu = phase = ws.sync
    u_buf = ws.u if u is None else u.contiguous()
    u_sub = block_u = 1
    if mode >= EcMode.SLOTS:
        k = x2.shape[1]
        cap = cfg.u_tiles or SLOT_TILES
        u_sub = cdiv(cdiv(k, cap), block_ku)
        if u_sub > 1 and block_ku > 128:  # several sub-blocks a tile: a runtime loop over half-size ones (two of
            u_sub, block_ku = 2 * u_sub, block_ku // 2  # 256 held the u tile at 160-167 registers, sm_90 AOT)
        tiles = cdiv(k, u_sub * block_ku)
        block_u = next_pow2(tiles)
        state = ws.for_slots(n, n_tiles, tiles, r, mode == EcMode.EC_TERM)
        phase, gu = state[:2]
        if mode == EcMode.EC_TERM:
            u_buf = state[2]  # the kernel's u pointer carries the EC term words in this mode
    elif mode == EcMode.EPOCH:
        phase, gu = ws.for_epoch(n, n_tiles)
    elif mode == EcMode.TWO_KERNELS:
        phase, gu = ws.ep, ws.gu
    # "auto": early when split_k == 1, except in mode slots, whose finishing program loads slots and gate anyway (B
    # beside them is free there; held from program start with the gate it took the seg tiles from 127 to 167 registers)
    b_early = cfg.ec_b == "early" or (cfg.ec_b == "auto" and split == 1 and mode < EcMode.SLOTS)
    two = mode == EcMode.TWO_KERNELS
    return _DecodeSetup(acc, arrive, ws.sync, u_buf, u, r, br, block_ku, 0 if two else tiles, mode,
                        tiles if two else 0, gu, phase, b_early, two and cfg.ec == "pdl" and pdl_ok(x2.device),
                        u_sub, block_u)


def _launch_u_kernel(d, x2, ec_A, gate_w, gate_b):
    """Modes pdl/2k: ``g(u) ⊙ u`` by ``ec_u_kernel`` into the workspace words the W kernel reads."""
    m, k = x2.shape
    gated = gate_w is not None
    launcher(ec_u_kernel, (d.u_kernel_tiles,))(
        x2, ec_A, d.u_buf, d.sync, gate_w if gated else x2, gate_b if gated else x2, d.gu, d.phase,
        m, k, d.r, x2.stride(0), d.u_kernel_tiles,
        BLOCK_M=1 if m == 1 else 16, BLOCK_KU=d.block_ku, BLOCK_R=d.block_r, GATED=gated, GDC=d.gdc,
        INTERPRET=options.interpret(), num_warps=4,
    )


def _pdl_kwargs(d):
    return {"launch_pdl": True} if d.gdc else {}


def gemv_ok(k, qdata) -> bool:
    """The int32-word kernel needs K % 8 == 0 and 4-byte aligned rows."""
    return k % 8 == 0 and qdata.data_ptr() % 4 == 0 and qdata.is_contiguous()


def run_decode(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """``y = x Wᵀ (+ bias) (+ EC)`` for M <= 16 as ``cfg`` (a ``DecodeConfig``) says."""
    m, k = x2.shape
    if cfg.kernel == "gemv" and gemv_ok(k, qdata) and (m == 1 or cfg.tc):
        return _run_gemv(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    if not valid_block_k(cfg.block_k, k, group_size) or cfg.block_k % 16:
        raise SpearError(f"spear_compile.lowering: {cfg.name} cannot run the byte kernel here "
                         f"(M={m}, K={k}, group {group_size}): its BLOCK_K must be a multiple of 16 within one group")
    n = qdata.shape[0]
    n_tiles = cdiv(n, cfg.block_n)
    d = _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles, cfg.split_k)
    has_ec = ec_B is not None
    n_prog = d.num_u_tiles + n_tiles * cfg.split_k
    dummy = x2  # never read; same dtype as the real operands so every constexpr branch type-checks
    if d.u_kernel_tiles:
        _launch_u_kernel(d, x2, ec_A, gate_w, gate_b)
    launcher(w4_decode_kernel, (n_prog,))(
        x2, qdata, scale, zero, bias if bias is not None else dummy, y,
        ec_A if ec_A is not None else dummy, ec_B if has_ec else dummy,
        gate_w if gate_w is not None else dummy, gate_b if gate_w is not None else dummy, d.u_buf,
        d.acc, d.arrive, d.sync, d.gu, d.phase,
        m, n, k, d.r, group_size, k // group_size, x2.stride(0), y.stride(0), d.num_u_tiles, n_prog, cfg.split_k,
        BLOCK_M=1 if m == 1 else 16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_KU=d.block_ku,
        BLOCK_R=d.block_r, HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None,
        U_READY=d.u is not None, INTERPRET=options.interpret(), EC_MODE=int(d.mode), B_EARLY=d.b_early, GDC=d.gdc,
        num_warps=cfg.num_warps, **_pdl_kwargs(d),
    )
    return y


def _run_gemv(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    m, k = x2.shape
    n = qdata.shape[0]
    n_tiles = cdiv(n, cfg.block_n)
    n_kb = cdiv(k, cfg.block_k)
    split = min(cfg.split_k, n_kb)
    d = _decode_setup(cfg, x2, n, ec_A, ec_B, u, n_tiles, split, slots_ok=m == 1 and not cfg.tc)
    has_ec = ec_B is not None
    dummy = x2  # never read; same dtype as the real operands so every constexpr branch type-checks
    if d.u_kernel_tiles:
        _launch_u_kernel(d, x2, ec_A, gate_w, gate_b)
    launcher(w4_gemv_kernel, (d.num_u_tiles + n_tiles * (split + (d.mode == EcMode.EC_TERM)),))(
        x2, qdata.view(torch.int32), scale, zero, bias if bias is not None else dummy, y,
        ec_A if ec_A is not None else dummy, ec_B if has_ec else dummy,
        gate_w if gate_w is not None else dummy, gate_b if gate_w is not None else dummy, d.u_buf,
        d.acc, d.arrive, d.sync, d.gu, d.phase,
        m, n, k, d.r, group_size, k // group_size, x2.stride(0), y.stride(0), d.num_u_tiles, n_tiles, split,
        BLOCK_M=16 if cfg.tc else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SPLIT=split > 1,
        PER_CHANNEL=group_size == k, WIDE=group_size < k and cfg.block_k > group_size, TC=cfg.tc,
        X_BF16=x2.dtype == torch.bfloat16, BLOCK_KU=d.block_ku, BLOCK_R=d.block_r,
        HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None, U_READY=d.u is not None,
        DYNAMIC_IDS=cfg.dynamic_ids, INTERPRET=options.interpret(), GPB=groups_per_block(cfg, m, k, group_size),
        EC_MODE=int(d.mode), B_EARLY=d.b_early, GDC=d.gdc, **load_kwargs(cfg, x2), U_SUB=d.u_sub, BLOCK_U=d.block_u,
        MAX_SPINS=SLOT_SPINS, num_warps=cfg.num_warps, **_pdl_kwargs(d),
    )
    return y


