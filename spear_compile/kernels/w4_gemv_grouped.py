"""Grouped decode kernel: 2-4 W4 linears of one x (q|k|v, gate|up) in one launch of the int32-word GEMV, member i
in output columns ``[C_i, C_i + N_i)``; programs ``[P_i, P_(i+1))`` are member i's N tiles x splits. The tile
bodies are ``w4_gemv``'s (``lowering.grouped`` launches it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .w4_gemv import _w_tile, _w_tile_seg


@triton.jit
def w4_gemv_grouped_kernel(
    x_ptr, y_ptr, acc_ptr, arrive_ptr,
    q0, s0, z0, b0, q1, s1, z1, b1, q2, s2, z2, b2, q3, s3, z3, b3,
    N0, N1, N2, N3, P1, P2, P3, C1, C2, C3,
    M, K, group_size, n_groups, stride_xm, N_TOTAL, SPLIT_K,
    MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_SPLIT: tl.constexpr, PER_CHANNEL: tl.constexpr, WIDE: tl.constexpr, TC: tl.constexpr,
    X_BF16: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr = False, GPB: tl.constexpr = 0,
    STAGES: tl.constexpr = 0, LEAN: tl.constexpr = 0, XW: tl.constexpr = False, KW_DIV: tl.constexpr = 1,
    TMA: tl.constexpr = False,
):
    """Horizontal fusion: ``MEMBERS`` (2..4) W4 linears of the same x (same K, group size, dtype) in one
    launch, ``y[:, C_i : C_i + N_i] = x W_iᵀ (+ b_i)`` for a ``y`` of ``N_TOTAL`` columns. Member i owns the
    program ids ``[P_i, P_{i+1})`` (``P_0 = 0``; ``cdiv(N_i, BLOCK_N) * SPLIT_K`` each); a program picks its
    member's pointers by comparing its id with the ``P_i`` and then runs the single-linear W body
    (``_w_tile``). Split-K partials go to the fp32 workspace at the member's column offset, arrival
    counters are indexed by the global N tile, and the last split to arrive stores and resets both."""
    pid = tl.program_id(0)
    zero = pid * 0  # runtime scalars in every branch (an int argument equal to 1 is specialised to a constant)
    q_ptr, s_ptr, z_ptr, b_ptr = q0, s0, z0, b0
    n, p0, col = zero + N0, zero, zero
    if pid >= P1:
        q_ptr, s_ptr, z_ptr, b_ptr = q1, s1, z1, b1
        n, p0, col = zero + N1, zero + P1, zero + C1
    if MEMBERS >= 3:
        if pid >= P2:
            q_ptr, s_ptr, z_ptr, b_ptr = q2, s2, z2, b2
            n, p0, col = zero + N2, zero + P2, zero + C2
    if MEMBERS >= 4:
        if pid >= P3:
            q_ptr, s_ptr, z_ptr, b_ptr = q3, s3, z3, b3
            n, p0, col = zero + N3, zero + P3, zero + C3
    t = pid - p0
    pid_n = t // SPLIT_K
    pid_k = t % SPLIT_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < n
    if GPB > 0:
        acc = _w_tile_seg(x_ptr, q_ptr, s_ptr, z_ptr, offs_n, n_mask, pid_k, K, group_size, n_groups, SPLIT_K,
                          BLOCK_N, BLOCK_K, GPB, STAGES, LEAN, X_BF16, XW, KW_DIV)
    else:
        acc = _w_tile(x_ptr, q_ptr, s_ptr, z_ptr, offs_m, offs_n, m_mask, n_mask, pid_k, K, group_size, n_groups,
                      stride_xm, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, PER_CHANNEL, WIDE, TC, X_BF16, INTERPRET,
                      STAGES, LEAN, XW, KW_DIV, TMA)
    out_mask = m_mask[:, None] & n_mask[None, :]
    cols = col + offs_n
    if USE_SPLIT:
        acc_ptrs = acc_ptr + offs_m[:, None] * N_TOTAL + cols[None, :]
        tl.atomic_add(acc_ptrs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()
        tile_ctr = arrive_ptr + p0 // SPLIT_K + pid_n
        arrived = tl.atomic_add(tile_ctr, 1)
    else:
        arrived = SPLIT_K - 1
    if arrived == SPLIT_K - 1:
        if USE_SPLIT:
            acc = tl.load(acc_ptrs, mask=out_mask, other=0.0, volatile=True)  # coherent (L2) read
            tl.store(acc_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=out_mask)
            tl.store(tile_ctr, 0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * N_TOTAL + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
