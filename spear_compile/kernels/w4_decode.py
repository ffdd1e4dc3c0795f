"""Decode kernel (M <= 16, memory-bound): split-K GEMV on the 4-bit container, EC fused in the same launch.

One 1-D launch of ``NUM_U_TILES + n_tiles * SPLIT_K`` programs. Each program takes a *dynamic*
tile id from an atomic counter (as CUB's decoupled look-back does), so every tile id below
``NUM_U_TILES`` belongs to a program that already runs: no deadlock is possible, and the
interpreter's sequential order works too.

* u tiles (ids < NUM_U_TILES): ``u[m, :] += A[:, kchunk] x[m, kchunk]`` into an fp32 workspace
  (relaxed atomics), then one release increment of the arrival counter.
* W tiles: stream ``BLOCK_N`` rows of packed weights over this split's K range; with
  ``SPLIT_K > 1`` add the partial into an fp32 accumulator and count arrivals per N tile; the
  last split to arrive does the epilogue: read (then zero) the accumulator, wait (spin) on the
  u-arrival counter — only here, at the very end — apply the gate and ``u Bᵀ``, add bias, store.
* The last program of the launch resets the counters and the u workspace, so the next call and
  every CUDA-graph replay start clean without a memset launch.

With ``U_READY`` the kernel reads a precomputed ``u`` instead (two-launch fallback, and the hook
for tensor parallelism: u partial sums all-reduced across GPUs before this launch). That is ``EC_MODE`` 0
("spin"); modes 1 ("epoch", static tile ids) and 2 (after ``ec_u_kernel``) work as in ``w4_gemv_kernel``.
Weights: ``q`` uint8 ``[N, K/2]`` (low nibble = even k), ``w = (q - zero) * scale`` per group.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ec_tiles import (_ec_apply, _ec_epilogue, _ec_operands, _gu_check_epoch, _gu_value, _gu_words, _load_b,
                       _u_tile, _wait_for_u)
from .tl_helpers import dot


@triton.jit
def w4_decode_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    a_ptr, b_ptr, gw_ptr, gb_ptr, u_ptr,
    acc_ptr, arrive_ptr, sync_ptr, gu_ptr, phase_ptr,
    M, N, K, R, group_size, n_groups, stride_xm, stride_ym, NUM_U_TILES, NUM_PROGRAMS, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EC: tl.constexpr, GATED: tl.constexpr, U_READY: tl.constexpr,
    INTERPRET: tl.constexpr = False, EC_MODE: tl.constexpr = 0, B_EARLY: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    """``EC_MODE``/``B_EARLY``/``GDC`` as ``w4_gemv_kernel`` (mode 1 "epoch" uses static ids, u tiles first)."""
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    MAGIC_I: tl.constexpr = 0x4B000000
    MAGIC_F: tl.constexpr = 8388608.0
    IN_KERNEL_U: tl.constexpr = HAS_EC and not U_READY and EC_MODE != 2
    SPIN: tl.constexpr = IN_KERNEL_U and EC_MODE == 0
    if SPIN:
        tile = tl.atomic_add(sync_ptr, 1)  # dynamic tile id: u tiles are handed out first
    else:
        tile = tl.program_id(0)

    if tile < NUM_U_TILES:
        _u_tile(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, phase_ptr, tile, NUM_U_TILES, M, K, R,
                stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, GATED, USE_DOT, INTERPRET, EC_MODE)
    else:
        t = tile - NUM_U_TILES
        pid_n = t // SPLIT_K
        pid_k = t % SPLIT_K
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, BLOCK_K // 2)
        m_mask = offs_m < M
        n_mask = offs_n < N
        if HAS_EC:
            if EC_MODE != 0:
                if B_EARLY:
                    bt = _load_b(b_ptr, offs_n, N, R, BLOCK_R)
        n_kb = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(n_kb, SPLIT_K)
        kb_lo = pid_k * per_split
        kb_hi = tl.minimum(kb_lo + per_split, n_kb)
        q_rows = q_ptr + offs_n[:, None] * (K // 2)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb_lo, kb_hi):
            k0 = kb * BLOCK_K
            j = k0 // 2 + offs_j
            j_mask = j < K // 2
            q = tl.load(q_rows + j[None, :], mask=n_mask[:, None] & j_mask[None, :], other=0)
            g = k0 // group_size
            s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32) + MAGIC_F
            # Nibble -> float without I2F (quarter rate on Hopper): bits 0x4B00000q are the float 2^23 + q.
            q32 = q.to(tl.int32)
            w_lo = ((q32 & 0xF) | MAGIC_I).to(tl.float32, bitcast=True) - zc[:, None]  # q - zero, exact
            w_hi = ((q32 >> 4) | MAGIC_I).to(tl.float32, bitcast=True) - zc[:, None]
            xm = m_mask[:, None] & j_mask[None, :]
            x_even = tl.load(x_rows + 2 * j[None, :], mask=xm, other=0.0)
            x_odd = tl.load(x_rows + 2 * j[None, :] + 1, mask=xm, other=0.0)
            if USE_DOT:  # (q - zero) is exact in bf16/fp16; the scale is applied to the fp32 partial
                part = dot(x_even, tl.trans(w_lo.to(x_even.dtype)),
                           tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET)
                part = dot(x_odd, tl.trans(w_hi.to(x_odd.dtype)), part, INTERPRET)
                acc += part * s[None, :]
            else:
                part = tl.sum(w_lo * x_even.to(tl.float32) + w_hi * x_odd.to(tl.float32), axis=1)
                acc += (part * s)[None, :]

        if HAS_EC:
            if EC_MODE == 2:
                if GDC:  # the u kernel has long finished by now (normally): returns at once
                    tl.extra.cuda.gdc_wait()
        out_mask = m_mask[:, None] & n_mask[None, :]
        acc_ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(acc_ptrs, acc, mask=out_mask, sem="relaxed")
            tl.debug_barrier()
            arrived = tl.atomic_add(arrive_ptr + pid_n, 1)
        else:
            arrived = SPLIT_K - 1
        if arrived == SPLIT_K - 1:
            if HAS_EC:
                if EC_MODE != 0:  # the words, B and the partial sum issued together: one round trip
                    words, wmask = _gu_words(gu_ptr, offs_m, M, R, BLOCK_R)
                    if EC_MODE == 1:  # the epoch this tile expects (only its own finisher writes its phase)
                        e_exp = tl.load(phase_ptr + 1 + pid_n) + 1
                    if not B_EARLY:
                        bt = _load_b(b_ptr, offs_n, N, R, BLOCK_R)
            if SPLIT_K > 1:
                acc = tl.load(acc_ptrs, mask=out_mask, other=0.0, volatile=True)  # coherent (L2) read
                tl.store(acc_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=out_mask)
                tl.store(arrive_ptr + pid_n, 0)
            if HAS_EC:
                if EC_MODE == 0:
                    if IN_KERNEL_U:
                        acc = _wait_for_u(acc, sync_ptr, NUM_U_TILES)
                    bt, gw, gb = _ec_operands(b_ptr, gw_ptr, gb_ptr, offs_n, N, R, GATED, BLOCK_R)
                    acc = _ec_epilogue(acc, u_ptr, bt, gw, gb, offs_m, M, R, GATED, BLOCK_R, USE_DOT)
                else:
                    if EC_MODE == 1:
                        gu = _gu_check_epoch(words, wmask, e_exp, gu_ptr, offs_m, M, R, BLOCK_R)
                        tl.store(phase_ptr + 1 + pid_n, e_exp)
                    else:  # after the u kernel: the words are final
                        gu = tl.where(wmask, _gu_value(words), 0.0)
                    acc = _ec_apply(acc, gu, bt, USE_DOT, INTERPRET)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=out_mask)

    if SPIN:
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + 2, 1)
        if done == NUM_PROGRAMS - 1:  # last program of the launch: leave the workspace clean
            offs_m = tl.arange(0, BLOCK_M)
            offs_r = tl.arange(0, BLOCK_R)
            tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :], tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
            tl.store(sync_ptr + 1, 0)
            tl.store(sync_ptr + 2, 0)
            tl.store(sync_ptr, 0)
