"""The EC's x-side prologue of the dequantize + cuBLAS path (``lowering.prefill.ec_prologue`` /
``ec_prologue_in_place``): ``v = g(u) ⊙ u``, ``u = x Aᵀ`` in fp32, from one pass over x (``ec_prologue_kernel``,
optionally also the copy ``[x | v]``), or a split-K x pass (``ec_xpass_kernel``, ``ec_xpass_blocks_kernel``: several
ECs of one x, each from its own A) and a gate launch (``ec_gate_kernel``, ``ec_gate_blocks_kernel``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


@triton.jit
def _project(x, a_ptr, r, offs_r, offs_k, k_mask, K, u, INTERPRET: tl.constexpr):
    """``u + x Aᵀ`` over one K block (``A``: ``[r, K]`` row-major, rows past r read as zeros)."""
    at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=(offs_r < r)[None, :] & k_mask[:, None],
                 other=0.0)
    return dot(x, at, u, INTERPRET)


@triton.jit
def _gated(u, gw_ptr, gb_ptr, r, offs_r, PRECISION: tl.constexpr):
    """``u ⊙ 2σ(u Wgᵀ + bg)`` (fp32 u; ``Wg``: ``[r, r]`` row-major) with the logits' dot at ``PRECISION``."""
    r_mask = offs_r < r
    gwt = tl.load(gw_ptr + offs_r[None, :] * r + offs_r[:, None],
                  mask=r_mask[None, :] & r_mask[:, None], other=0.0).to(tl.float32)  # gwt[i, j] = Wg[j, i]
    gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    return u * (2.0 * tl.sigmoid(tl.dot(u, gwt, input_precision=PRECISION) + gb[None, :]))


@triton.jit
def _gate_store(u, gw_ptr, gb_ptr, out_ptr, r, col, offs_m, m_mask, offs_r, stride_om, GATED: tl.constexpr):
    """``v = u ⊙ 2σ(u Wgᵀ + bg)`` (``GATED``; else v = u) into columns ``col .. col + r`` of ``out``. The gate's
    logits by tf32 tensor cores (10 mantissa bits; the eager EC computes them in bf16, 7)."""
    if GATED:
        u = _gated(u, gw_ptr, gb_ptr, r, offs_r, "tf32")
    tl.store(out_ptr + offs_m[:, None] * stride_om + col + offs_r[None, :], u.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (offs_r < r)[None, :])


@triton.jit
def _store_v(out_ptr, v, offs_m, m_mask, offs_r, RP, stride_om, col0,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PAD: tl.constexpr):
    """v into columns ``col0 .. col0 + RP`` of ``out`` (zeros past R: v is zero there; ``BLOCK_PAD`` more zero
    columns past ``BLOCK_R`` when RP > BLOCK_R)."""
    rows = out_ptr + offs_m[:, None] * stride_om + col0
    tl.store(rows + offs_r[None, :], v.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_r < RP)[None, :])
    if BLOCK_PAD > 0:
        offs_p = BLOCK_R + tl.arange(0, BLOCK_PAD)
        tl.store(rows + offs_p[None, :], tl.zeros((BLOCK_M, BLOCK_PAD), dtype=out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_p < RP)[None, :])


@triton.jit
def _load_x(x_ptr, out_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_om, X_IN_OUT: tl.constexpr):
    """An x tile, from x or (``X_IN_OUT``) from columns ``0 .. K`` of ``out`` (``[x | 0]`` written by x's producer)."""
    if X_IN_OUT:
        return tl.load(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :],
                       mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def ec_prologue_kernel(
    x_ptr, a_ptr, u_ptr, gw_ptr, gb_ptr, out_ptr,
    M, K, R, RP, stride_xm, stride_um, stride_om, col0,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    COPY_X: tl.constexpr, U_GIVEN: tl.constexpr, GATED: tl.constexpr, LOOP: tl.constexpr,
    INTERPRET: tl.constexpr = False, BLOCK_PAD: tl.constexpr = 0, X_IN_OUT: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    """The x side of the EC on the cuBLAS path, one pass over x: ``u = x Aᵀ`` (fp32; or ``u`` given: the
    tensor-parallel hook), ``v = u ⊙ 2σ(u Wgᵀ + bg)`` (``GATED``; else v = u), written in x's dtype to columns
    ``col0 .. col0 + RP`` of ``out`` (zeros past R). ``COPY_X``: x is also copied to columns ``0 .. K`` of ``out``,
    which makes ``out = [x | v]``, the A operand of the K-concatenated GEMM ``[x | v] [W | B]ᵀ``.
    ``LOOP`` = ``COPY_X or not U_GIVEN`` (the K loop has something to do). ``BLOCK_PAD``: width of the zero store
    for the pad columns past ``BLOCK_R`` (``RP > BLOCK_R``; the gate stays ``BLOCK_R`` wide). ``X_IN_OUT``: x is
    read from columns ``0 .. K`` of ``out`` itself (``x_ptr`` unused: ``ec_prologue`` copied x there first).
    ``GDC``: the next launch (the Gluon swap kernel with the EC in its epilogue) depends on this one
    programmatically: every program lets it start at once, so its K loop runs beside this pass; it waits for v
    (``griddepcontrol.wait``) only in its epilogue."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if U_GIVEN:
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    else:
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if LOOP:
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = _load_x(x_ptr, out_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_om, X_IN_OUT)
            if COPY_X:
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], x,
                         mask=m_mask[:, None] & k_mask[None, :])
            if not U_GIVEN:
                u = _project(x, a_ptr, R, offs_r, offs_k, k_mask, K, u, INTERPRET)
    if GATED:
        u = _gated(u, gw_ptr, gb_ptr, R, offs_r, "ieee")
    _store_v(out_ptr, u, offs_m, m_mask, offs_r, RP, stride_om, col0, BLOCK_M, BLOCK_R, BLOCK_PAD)


@triton.jit
def ec_xpass_kernel(
    x_ptr, a_ptr, part_ptr, out_ptr,
    M, K, R, stride_xm, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    COPY_X: tl.constexpr, PROJECT: tl.constexpr, INTERPRET: tl.constexpr = False, X_IN_OUT: tl.constexpr = False,
):
    """Split-K pass over x (the prologue's x side with many programs: grid ``(M tiles, splits)``): program
    ``(i, s)`` reads rows tile i over its K range ``[s·k_per_split, (s+1)·k_per_split)`` (a multiple of
    ``BLOCK_K``), copies it to ``out`` (``COPY_X``) and writes its fp32 partial ``x Aᵀ`` to ``part[s]``
    (``[splits, M, BLOCK_R]``; ``PROJECT``). ``ec_gate_kernel`` sums the partials. ``X_IN_OUT``: x is columns
    ``0 .. K`` of ``out`` (``x_ptr`` unused)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = _load_x(x_ptr, out_ptr, offs_m, offs_k, m_mask, k_mask, stride_xm, stride_om, X_IN_OUT)
        if COPY_X:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], x,
                     mask=m_mask[:, None] & k_mask[None, :])
        if PROJECT:
            u = _project(x, a_ptr, R, offs_r, offs_k, k_mask, K, u, INTERPRET)
    if PROJECT:
        tl.store(part_ptr + (pid_s * M + offs_m)[:, None] * BLOCK_R + offs_r[None, :], u, mask=m_mask[:, None])


@triton.jit
def ec_gate_kernel(
    part_ptr, u_ptr, gw_ptr, gb_ptr, out_ptr,
    M, R, RP, n_split, stride_um, stride_om, col0,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, U_GIVEN: tl.constexpr, GATED: tl.constexpr,
    BLOCK_PAD: tl.constexpr = 0,
):
    """``u`` = the sum of ``ec_xpass_kernel``'s partials (or the given u), ``v = u ⊙ 2σ(u Wgᵀ + bg)`` (``GATED``)
    written to columns ``col0 .. col0 + RP`` of ``out`` in its dtype (zeros past R)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if U_GIVEN:
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    else:
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, n_split):
            u += tl.load(part_ptr + (s * M + offs_m)[:, None] * BLOCK_R + offs_r[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    if GATED:
        u = _gated(u, gw_ptr, gb_ptr, R, offs_r, "ieee")
    _store_v(out_ptr, u, offs_m, m_mask, offs_r, RP, stride_om, col0, BLOCK_M, BLOCK_R, BLOCK_PAD)


@triton.jit
def ec_xpass_blocks_kernel(
    out_ptr, part_ptr, a0, a1, a2, a3,
    M, K, r0, r1, r2, r3, stride_om, k_per_split, touch,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, N_BLK: tl.constexpr,
    INTERPRET: tl.constexpr = False,
):
    """The x side of ``kcat``'s EC prologue on ``out = [x | 0]`` (written by x's producer), for a stack of
    ``N_BLK`` ≤ 4 ECs of one x, each from its own ``A_b`` (rank ``r_b`` ≤ ``BLOCK_R``): a split-K pass (grid
    ``(M tiles, splits)``) writing fp32 partials ``x A_bᵀ`` to ``part`` (``[splits, M, N_BLK·BLOCK_R]``);
    ``ec_gate_blocks_kernel`` then sums and gates them. ``out`` is declared written by a store masked with the
    runtime ``touch`` (0: nothing is written): traced into a graph, this launch and the gate launch are then two
    writes of one buffer, which Inductor chains in place (as a read followed by another launch's write, its
    lowering gave the reader its own copy: session 8)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    u0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    u1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    u2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    u3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        u0 = _project(x, a0, r0, offs_r, offs_k, k_mask, K, u0, INTERPRET)
        if N_BLK > 1:
            u1 = _project(x, a1, r1, offs_r, offs_k, k_mask, K, u1, INTERPRET)
        if N_BLK > 2:
            u2 = _project(x, a2, r2, offs_r, offs_k, k_mask, K, u2, INTERPRET)
        if N_BLK > 3:
            u3 = _project(x, a3, r3, offs_r, offs_k, k_mask, K, u3, INTERPRET)
    rows = part_ptr + (pid_s * M + offs_m)[:, None] * (N_BLK * BLOCK_R) + offs_r[None, :]
    tl.store(rows, u0, mask=m_mask[:, None])
    if N_BLK > 1:
        tl.store(rows + BLOCK_R, u1, mask=m_mask[:, None])
    if N_BLK > 2:
        tl.store(rows + 2 * BLOCK_R, u2, mask=m_mask[:, None])
    if N_BLK > 3:
        tl.store(rows + 3 * BLOCK_R, u3, mask=m_mask[:, None])
    tl.store(out_ptr + offs_m * stride_om, tl.zeros((BLOCK_M,), dtype=out_ptr.dtype.element_ty),
             mask=offs_m < touch)


@triton.jit
def _partial_sum(part_ptr, b: tl.constexpr, offs_m, m_mask, offs_r, M, N_SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, N_BLK: tl.constexpr):
    """Block ``b``'s u: the sum of every split's partial, the loads unrolled so they are all in flight at once."""
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in tl.static_range(N_SPLIT):
        u += tl.load(part_ptr + (s * M + offs_m)[:, None] * (N_BLK * BLOCK_R) + b * BLOCK_R + offs_r[None, :],
                     mask=m_mask[:, None], other=0.0)
    return u


@triton.jit
def ec_gate_blocks_kernel(
    part_ptr, out_ptr, gw0, gw1, gw2, gw3, gb0, gb1, gb2, gb3,
    M, K, r0, r1, r2, r3, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, N_BLK: tl.constexpr, N_SPLIT: tl.constexpr,
    GATE_MASK: tl.constexpr,
):
    """After ``ec_xpass_blocks_kernel``: per ``BLOCK_M`` rows, each EC's ``u_b`` (its partials summed) becomes
    ``v_b = u_b ⊙ 2σ(u_b W_gbᵀ + b_gb)`` (bit b of ``GATE_MASK``; else v_b = u_b), from its own gate tensors, in
    columns ``K + r_0 + ... + r_(b-1) ..`` of ``out``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    u = _partial_sum(part_ptr, 0, offs_m, m_mask, offs_r, M, N_SPLIT, BLOCK_M, BLOCK_R, N_BLK)
    _gate_store(u, gw0, gb0, out_ptr, r0, K, offs_m, m_mask, offs_r, stride_om, (GATE_MASK & 1) != 0)
    if N_BLK > 1:
        u = _partial_sum(part_ptr, 1, offs_m, m_mask, offs_r, M, N_SPLIT, BLOCK_M, BLOCK_R, N_BLK)
        _gate_store(u, gw1, gb1, out_ptr, r1, K + r0, offs_m, m_mask, offs_r, stride_om, (GATE_MASK & 2) != 0)
    if N_BLK > 2:
        u = _partial_sum(part_ptr, 2, offs_m, m_mask, offs_r, M, N_SPLIT, BLOCK_M, BLOCK_R, N_BLK)
        _gate_store(u, gw2, gb2, out_ptr, r2, K + r0 + r1, offs_m, m_mask, offs_r, stride_om, (GATE_MASK & 4) != 0)
    if N_BLK > 3:
        u = _partial_sum(part_ptr, 3, offs_m, m_mask, offs_r, M, N_SPLIT, BLOCK_M, BLOCK_R, N_BLK)
        _gate_store(u, gw3, gb3, out_ptr, r3, K + r0 + r1 + r2, offs_m, m_mask, offs_r, stride_om,
                    (GATE_MASK & 8) != 0)
