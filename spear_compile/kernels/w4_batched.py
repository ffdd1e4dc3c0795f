"""Batched-decode / small-prefill W4 (+EC) kernel (M = 2..512): tensor cores on weights dequantized in registers.

``y[:, C_i : C_i + N_i] = x W_iᵀ (+ b_i) (+ B_i (g(A_i x) ⊙ A_i x))`` for 1..4 sibling members of one x (q|k|v,
gate|up), one launch. The packed weights ``[N, K/2]`` uint8 are read as ``[N, K/8]`` int32 words (nibble i of word j
is k = 8j + i; 16-byte loads: ``K8`` is an argument, so its divisibility by 16 is known to Triton).

Per K block of ``BLOCK_K``: the words tile ``[BLOCK_N, BLOCK_K/8]`` becomes ``OFFSET + q`` as bf16/fp16 straight
from the bits (``(w >> 4i) & 0x000F000F | MAGIC``: nibbles i and i + 4 of every word, two values per mask-or, no
int-to-float conversion; bf16 ``0x43..`` is 128 + q, fp16 ``0x64..`` is 1024 + q, both exact), the 8 planes joined
back into k order in registers (the joins only add register dimensions), and one ``tl.dot`` against the x tile
``[BLOCK_M, BLOCK_K]``. Tensor cores sum ``Σ (OFFSET + q) x`` exactly in fp32; ``(OFFSET + zero) · Σx`` comes off per
row: once after the loop (per-channel, then the scale) or per block with that block's group scale (``BLOCK_K``
divides the group). Σx: per-channel, each thread sums its runs of 8 adjacent k inside the loop and the rows are
reduced once after it; per group, a row reduction per block; or (``XSUM_MMA``) a dot of x with a tile of ones in the
accumulator's own layout. The unpack is one ``lop3`` per nibble pair (inline PTX) and, with ``EVEN_K`` (K a multiple
of BLOCK_K), the loads' masks are loop-invariant: offline sm_90 SASS of the K loop (``bench/sass_loop.py``) went
from 21.4 to 15.8 instructions a weight word for the ``PERM`` tile at M = 16. ``ZSUB``: the
tile holds ``q - zero`` instead (``OFFSET + zero`` taken off each magic word pair by one packed fma: exact, zeros
being integer codes), so no Σx term at all: it saves the loop a third of its instructions at BLOCK_M 128, where Σx
is the per-row work every N tile repeats (``bench/results/sass_loop_s22.md``). ``SWAP``: the dot as ``yᵀ = W xᵀ`` (W the A operand, which Hopper's wgmma reads from registers;
the N tile as the MMA's M dimension, so BLOCK_M can stay 16), transposed back before the epilogue.

EC (``HAS_EC``, r <= BLOCK_R): every program also accumulates ``u = x Aᵀ`` over its own K range from the x tile it
already holds (A is tiny and L2-resident; no cross-program dependency, no spin), and the program that finishes the
tile gates u (``u ⊙ 2σ(u W_gᵀ + b_g)``, fp32) and adds ``g(u) ⊙ u Bᵀ`` on tensor cores in its epilogue. B and
``W_g`` are read with row stride ``EC_LD``: r for a member's own EC, g·r for a member's view of a merged EC
(``compile.siblings``: one block-diagonal B and ``W_g`` for the group), so no copy is made per call. With
``EC_PRE`` the K loop is W4-only: ``ec_gu_kernel`` (one launch before, one program per M tile and member) computes
``g(u) ⊙ u`` once, and the epilogue reads it (on Hopper the W4 launch depends on it programmatically, ``GDC``: the K
loop runs beside ``ec_gu_kernel`` and only the epilogue waits for it).

Split-K (``SPLIT_K > 1``, when the N x M tiles alone are too few for the SMs): each program stores its fp32 partial
(and its u partial) to its own slot of a workspace (plain stores: no atomics on tensor-core accumulator layouts,
whose replicated lanes an atomic add would sum twice), then one acq_rel increment of the tile's arrival counter;
the last arrival sums the slots, runs the epilogue and resets the counter (nothing else to clean).

``ACCUMULATE``: y already holds a C input (``lowering.c_in``: the EC term computed first); the epilogue adds it in
fp32 before the one rounding.

Program order: M tiles fastest, so the programs that read one weight tile run together (one DRAM read, L2 hits).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot, half_bits as _half


@triton.jit
def _magic(t, X_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """``(t & 0x000F000F) | MAGIC``: the low nibble of each 16-bit half as ``OFFSET + q`` bits (bf16 ``0x4300`` = 128,
    fp16 ``0x6400`` = 1024). One ``lop3`` on the GPU: left to itself ptxas emits an and plus an or, since a SASS LOP3
    takes one immediate (offline sm_90 SASS, ``bench/sass_loop.py``)."""
    if INTERPRET:
        if X_BF16:
            return (t & 0x000F000F) | 0x43004300
        else:
            return (t & 0x000F000F) | 0x64006400
    else:
        if X_BF16:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r", [t],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xEA;", "=r,r", [t],
                                             dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _neg_zero_pair(zc, X_BF16: tl.constexpr):
    """``-(OFFSET + zero)`` (fp32 ``zc``, one per weight row) as two packed bf16/fp16 halves of an int32, for
    ``_minus_zero``."""
    X_DT: tl.constexpr = tl.bfloat16 if X_BF16 else tl.float16
    h = (-zc).to(X_DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _minus_zero(t, zpair, X_BF16: tl.constexpr):
    """``t - (OFFSET + zero)`` on both packed halves of ``OFFSET + q`` (one ``fma.rn.{bf16,f16}x2`` per word pair,
    sm_80+): ``q - zero``, a small integer, exact. ``zpair``: ``_neg_zero_pair`` broadcast to ``t``'s shape."""
    if X_BF16:
        return tl.inline_asm_elementwise("{ .reg .b32 one; mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, $1, one, $2; }",
                                         "=r,r,r", [t, zpair], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("{ .reg .b32 one; mov.b32 one, 0x3C003C00; fma.rn.f16x2 $0, $1, one, $2; }",
                                         "=r,r,r", [t, zpair], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _w_plane(words, i: tl.constexpr, X_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """Nibble ``i`` of every int32 word as ``OFFSET + q`` in the activation dtype (same shape and layout as words)."""
    X_DT: tl.constexpr = tl.bfloat16 if X_BF16 else tl.float16
    t = _magic(words >> (4 * (i % 4)), X_BF16, INTERPRET)  # nibbles i % 4 (low half) and i % 4 + 4 (high half)
    return _half(t, i >= 4, X_DT)


@triton.jit
def _mma_order(t, ROWS: tl.constexpr):
    """``t [ROWS, 128]`` with its k (column) order permuted so that, for the joined nibble tile of 16 words a row, the
    k bits the MMA operand keeps per thread are the ones the unpack keeps per thread: k = 8j + i (word j = 8 j3 + 4 j2
    + 2 j1 + j0, nibble i = 4 i2 + 2 i1 + i0) goes to position i2 + 2 j2 + 4 j3 + 8 i1 + 16 i0 + 32 j0 + 64 j1. The
    same permutation on x and W leaves x Wᵀ unchanged; on sm_90 (Triton 3.6, BLOCK_K 128, wgmma with W from registers)
    it removes the shared-memory layout conversion of the W tile (17 -> 2 barriers, 34 -> 22 SASS instructions a
    word, offline AOT count; adjacent k pairs are nibbles i and i + 4, i.e. one int32 of the unpack)."""
    return tl.reshape(tl.permute(tl.reshape(t, (ROWS, 2, 2, 2, 2, 2, 2, 2)), (0, 3, 4, 7, 6, 1, 2, 5)), (ROWS, 128))


@triton.jit
def _w_offset_tile(words, zpair, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_BF16: tl.constexpr,
                   INTERPRET: tl.constexpr, ZSUB: tl.constexpr = False):
    """``[BLOCK_N, BLOCK_K]`` of ``OFFSET + q`` in the activation dtype, k in natural order, from int32 words;
    ``ZSUB`` (not under the interpreter): ``q - zero`` (``zpair`` ``[BLOCK_N, 1]``, ``_neg_zero_pair``)."""
    X_DT: tl.constexpr = tl.bfloat16 if X_BF16 else tl.float16
    t0 = _magic(words, X_BF16, INTERPRET)  # nibble 0 (low half), nibble 4 (high half)
    t1 = _magic(words >> 4, X_BF16, INTERPRET)
    t2 = _magic(words >> 8, X_BF16, INTERPRET)
    t3 = _magic(words >> 12, X_BF16, INTERPRET)
    if ZSUB:
        if not INTERPRET:
            t0 = _minus_zero(t0, zpair, X_BF16)
            t1 = _minus_zero(t1, zpair, X_BF16)
            t2 = _minus_zero(t2, zpair, X_BF16)
            t3 = _minus_zero(t3, zpair, X_BF16)
    # nested joins: flat index 4a + 2b + c for join(join(join(P0, P4), join(P2, P6)), join(join(P1, P5), join(P3, P7)))
    even = tl.join(tl.join(_half(t0, False, X_DT), _half(t0, True, X_DT)),
                   tl.join(_half(t2, False, X_DT), _half(t2, True, X_DT)))
    odd = tl.join(tl.join(_half(t1, False, X_DT), _half(t1, True, X_DT)),
                  tl.join(_half(t3, False, X_DT), _half(t3, True, X_DT)))
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))


@triton.jit
def _a_tile(a_ptr, offs_r, R, K, kk, k_ok):
    """The EC's ``Aᵀ`` rows ``kk`` as a ``[BLOCK_K, BLOCK_R]`` tile (``A [r, K]``; masked past r and K)."""
    return tl.load(a_ptr + offs_r[None, :] * K + kk[:, None], mask=(offs_r < R)[None, :] & k_ok[:, None], other=0.0)


@triton.jit
def _gated(u, gw_ptr, gb_ptr, offs_r, R, EC_LD):
    """``u ⊙ 2σ(u W_gᵀ + b_g)`` in fp32 (the EC gate; ``W_g``'s rows ``EC_LD`` apart)."""
    r_mask = offs_r < R
    gwt = tl.load(gw_ptr + offs_r[None, :] * EC_LD + offs_r[:, None], mask=r_mask[None, :] & r_mask[:, None],
                  other=0.0).to(tl.float32)  # gwt[i, j] = W_g[j, i]
    gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    return u * (2.0 * tl.sigmoid(tl.dot(u, gwt, input_precision="ieee") + gb[None, :]))


# runtime sizes that only bound masks or pick members: one compiled kernel for every M, member width and split
@triton.jit(do_not_specialize=["N0", "N1", "N2", "N3", "P1", "P2", "P3", "M", "R", "EC_LD", "N_TILES_TOTAL",
                               "SPLIT_K"])
def w4_batched_kernel(
    x_ptr, y_ptr, ws_ptr, uws_ptr, cnt_ptr,
    q0, s0, z0, b0, a0, bb0, gw0, gb0,
    q1, s1, z1, b1, a1, bb1, gw1, gb1,
    q2, s2, z2, b2, a2, bb2, gw2, gb2,
    q3, s3, z3, b3, a3, bb3, gw3, gb3,
    N0, N1, N2, N3, P1, P2, P3, C1, C2, C3,
    M, K, K8, R, EC_LD, group_size, n_groups, stride_xm, stride_ym, N_TOTAL, N_TILES_TOTAL, SPLIT_K,
    MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_SPLIT: tl.constexpr, PER_CHANNEL: tl.constexpr, X_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EC: tl.constexpr, GATED: tl.constexpr, SWAP: tl.constexpr,
    INTERPRET: tl.constexpr = False, PLANES: tl.constexpr = False, PERM: tl.constexpr = False,
    EVEN_K: tl.constexpr = False, XSUM_MMA: tl.constexpr = False, EC_PRE: tl.constexpr = False,
    GDC: tl.constexpr = False, ZSUB: tl.constexpr = False, ACCUMULATE: tl.constexpr = False,
):
    """See the module docstring. Member i owns the N-tile programs ``[P_i, P_{i+1})`` (``cdiv(N_i, BLOCK_N) *
    SPLIT_K`` each, times the M tiles), its columns start at ``C_i``. Workspaces (``USE_SPLIT``): ``ws`` fp32
    ``[SPLIT_K, M, N_TOTAL]``, ``uws`` fp32 ``[N_TILES_TOTAL, SPLIT_K, M, BLOCK_R]``, ``cnt`` int32 zeros
    ``[N_TILES_TOTAL * M tiles]``."""
    OFFSET: tl.constexpr = 128.0 if X_BF16 else 1024.0
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % m_tiles
    rest = pid // m_tiles
    zero = pid * 0  # runtime scalars in every branch
    q_ptr, s_ptr, z_ptr, bias_ptr, a_ptr, bt_ptr, gw_ptr, gb_ptr = q0, s0, z0, b0, a0, bb0, gw0, gb0
    n, p0, col, member = zero + N0, zero, zero, zero
    if MEMBERS >= 2:
        if rest >= P1:
            q_ptr, s_ptr, z_ptr, bias_ptr, a_ptr, bt_ptr, gw_ptr, gb_ptr = q1, s1, z1, b1, a1, bb1, gw1, gb1
            n, p0, col, member = zero + N1, zero + P1, zero + C1, zero + 1
    if MEMBERS >= 3:
        if rest >= P2:
            q_ptr, s_ptr, z_ptr, bias_ptr, a_ptr, bt_ptr, gw_ptr, gb_ptr = q2, s2, z2, b2, a2, bb2, gw2, gb2
            n, p0, col, member = zero + N2, zero + P2, zero + C2, zero + 2
    if MEMBERS >= 4:
        if rest >= P3:
            q_ptr, s_ptr, z_ptr, bias_ptr, a_ptr, bt_ptr, gw_ptr, gb_ptr = q3, s3, z3, b3, a3, bb3, gw3, gb3
            n, p0, col, member = zero + N3, zero + P3, zero + C3, zero + 3
    t = rest - p0
    pid_n = t // SPLIT_K
    pid_k = t % SPLIT_K
    tile_n = p0 // SPLIT_K + pid_n  # global N tile (counters, u workspace)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 8)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < n
    n_kb = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_kb, SPLIT_K)
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, n_kb)

    q_rows = q_ptr + offs_n[:, None] * K8
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xtot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xacc = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.float32)  # per-channel: Σx in runs of 8, reduced after the loop
    sx = acc  # XSUM_MMA: Σ_k x per row in the accumulator's layout (a dot of x with a tile of ones)
    if XSUM_MMA:
        if INTERPRET:  # Triton 3.6's interpreter has no bf16 constants (its dots run in fp32 anyway)
            ones = tl.full((BLOCK_N, BLOCK_K), 1.0, tl.float32)
        else:
            ones = tl.full((BLOCK_N, BLOCK_K), 1.0, tl.bfloat16 if X_BF16 else tl.float16)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    tl.static_assert(not (ZSUB and (PLANES or XSUM_MMA)), "ZSUB replaces the Σx term: not with PLANES or XSUM_MMA")
    zrow = tl.zeros((BLOCK_N,), dtype=tl.float32)         # ZSUB: OFFSET + zero per weight row (this K block's group)
    zpair = tl.zeros((BLOCK_N, 1), dtype=tl.int32)        # ZSUB: its negation, two packed halves (_neg_zero_pair)
    if ZSUB:
        if PER_CHANNEL:
            zrow = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) + OFFSET
            zpair = _neg_zero_pair(zrow, X_BF16)[:, None]
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        kw = kb * (BLOCK_K // 8) + offs_j
        if EVEN_K:  # K a multiple of BLOCK_K: the loads' masks are loop-invariant
            k_ok = offs_j < BLOCK_K // 8
            kk_ok = offs_k < BLOCK_K
        else:
            k_ok = kw < K8
            kk_ok = k0 + offs_k < K
        words = tl.load(q_rows + kw[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0)
        kk = k0 + offs_k
        if PLANES:  # nibble plane i against x's plane i (stride-8 columns): no layout change of the weight tile
            if not PER_CHANNEL:
                if SWAP:
                    part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                else:
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.float32)
            xm = m_mask[:, None] & k_ok[None, :]
            for i in tl.static_range(8):
                wi = _w_plane(words, i, X_BF16, INTERPRET)
                xi = tl.load(x_rows + (8 * kw + i)[None, :], mask=xm, other=0.0)
                xs += xi.to(tl.float32)
                if PER_CHANNEL:
                    if SWAP:
                        acc = dot(wi, tl.trans(xi), acc, INTERPRET)
                    else:
                        acc = dot(xi, tl.trans(wi), acc, INTERPRET)
                else:
                    if SWAP:
                        part = dot(wi, tl.trans(xi), part, INTERPRET)
                    else:
                        part = dot(xi, tl.trans(wi), part, INTERPRET)
            xb = tl.sum(xs, axis=1)
        else:
            if ZSUB:
                if not PER_CHANNEL:
                    zrow = tl.load(z_ptr + offs_n * n_groups + k0 // group_size, mask=n_mask,
                                   other=0.0).to(tl.float32) + OFFSET
                    zpair = _neg_zero_pair(zrow, X_BF16)[:, None]
            w = _w_offset_tile(words, zpair, BLOCK_N, BLOCK_K, X_BF16, INTERPRET, ZSUB)
            if ZSUB:
                if INTERPRET:  # no inline PTX: the same exact small integers in fp32 (the dot's operands there)
                    w = w.to(tl.float32) - zrow[:, None]
            if PERM:
                w = _mma_order(w, BLOCK_N)
        if HAS_EC or not PLANES:
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & kk_ok[None, :], other=0.0)
        if not PLANES:
            if not XSUM_MMA:
                if not ZSUB:  # (ZSUB: the weights already hold q - zero, no Σx term)
                    if PER_CHANNEL:
                        # runs of 8 adjacent k (one 16-byte load a thread): no cross-thread reduction inside the loop
                        xacc += tl.sum(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // 8, 8)), axis=2)
                    else:
                        xb = tl.sum(x.to(tl.float32), axis=1)
            xd = x  # the dot's x: in the weight tile's k order
            if PERM:
                xd = _mma_order(x, BLOCK_M)
        if HAS_EC:
            if not EC_PRE:
                u = dot(x, _a_tile(a_ptr, offs_r, R, K, kk, kk_ok), u, INTERPRET)
        if PER_CHANNEL:
            if not PLANES:
                if SWAP:
                    acc = dot(w, tl.trans(xd), acc, INTERPRET)
                    if XSUM_MMA:
                        sx = dot(ones, tl.trans(xd), sx, INTERPRET)
                else:
                    acc = dot(xd, tl.trans(w), acc, INTERPRET)
                    if XSUM_MMA:
                        sx = dot(xd, tl.trans(ones), sx, INTERPRET)
            if PLANES:
                xtot += xb
        else:
            g = k0 // group_size
            s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32) + OFFSET
            if SWAP:
                if not PLANES:
                    part = dot(w, tl.trans(xd), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), INTERPRET)
                if XSUM_MMA:
                    sxb = dot(ones, tl.trans(xd), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), INTERPRET)
                    acc += s[:, None] * (part - zc[:, None] * sxb)
                elif ZSUB:
                    acc += s[:, None] * part
                else:
                    acc += s[:, None] * (part - zc[:, None] * xb[None, :])
            else:
                if not PLANES:
                    part = dot(xd, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET)
                if XSUM_MMA:
                    sxb = dot(xd, tl.trans(ones), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET)
                    acc += s[None, :] * (part - zc[None, :] * sxb)
                elif ZSUB:
                    acc += s[None, :] * part
                else:
                    acc += s[None, :] * (part - zc[None, :] * xb[:, None])
    if PER_CHANNEL:
        if not PLANES:
            if not ZSUB:
                xtot = tl.sum(xacc, axis=1)
        if SWAP:
            s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            zc = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None] + OFFSET
        else:
            s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            zc = tl.load(z_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :] + OFFSET
        if ZSUB:
            acc = s * acc
        elif XSUM_MMA:
            acc = s * (acc - zc * sx)  # in the dot's layout: no cross-thread move
        elif SWAP:
            acc = s * (acc - zc * xtot[None, :])
        else:
            acc = s * (acc - zc * xtot[:, None])
    if SWAP:
        acc = tl.trans(acc)

    out_mask = m_mask[:, None] & n_mask[None, :]
    cols = col + offs_n
    finish = True
    if USE_SPLIT:
        ws_ptrs = ws_ptr + (pid_k * M + offs_m[:, None]) * N_TOTAL + cols[None, :]
        tl.store(ws_ptrs, acc, mask=out_mask)
        u_rows = (tile_n * SPLIT_K * M + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
        if HAS_EC:
            if not EC_PRE:
                tl.store(uws_ptr + u_rows + pid_k * M * BLOCK_R, u, mask=m_mask[:, None])
        tl.debug_barrier()
        ctr = cnt_ptr + tile_n * m_tiles + pid_m
        arrived = tl.atomic_add(ctr, 1)  # acq_rel, after the CTA barrier: publishes this program's slots
        finish = arrived == SPLIT_K - 1
    if finish:
        if USE_SPLIT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                acc += tl.load(ws_ptr + (sk * M + offs_m[:, None]) * N_TOTAL + cols[None, :], mask=out_mask,
                               other=0.0, volatile=True)  # coherent (L2) reads
                if HAS_EC:
                    if not EC_PRE:
                        u += tl.load(uws_ptr + u_rows + sk * M * BLOCK_R, mask=m_mask[:, None], other=0.0,
                                     volatile=True)
            tl.store(ctr, 0)
        if HAS_EC:
            r_mask = offs_r < R
            if EC_PRE:  # g(u) ⊙ u of this member, by ec_gu_kernel: ``uws`` fp32 [MEMBERS, M, BLOCK_R]
                if GDC:  # launched dependent on ec_gu_kernel: its K loop ran beside it; wait for its g(u) ⊙ u now
                    tl.extra.cuda.gdc_wait()
                u = tl.load(uws_ptr + (member * M + offs_m[:, None]) * BLOCK_R + offs_r[None, :],
                            mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            elif GATED:
                u = _gated(u, gw_ptr, gb_ptr, offs_r, R, EC_LD)
            bt = tl.load(bt_ptr + offs_n[None, :] * EC_LD + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None],
                         other=0.0)  # [BLOCK_R, BLOCK_N] = Bᵀ tile
            acc = dot(u.to(bt.dtype), bt, acc, INTERPRET)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :]
        if ACCUMULATE:  # y holds a C input (the EC term, ``lowering.c_in``): added in fp32, rounded once
            acc += tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def ec_gu_kernel(x_ptr, gu_ptr, part_ptr, cnt_ptr, a0, gw0, gb0, a1, gw1, gb1, a2, gw2, gb2, a3, gw3, gb3, M, K, R,
                 EC_LD, stride_xm, K_PER_SPLIT,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GATED: tl.constexpr,
                 SPLIT: tl.constexpr, INTERPRET: tl.constexpr = False, GDC: tl.constexpr = False):
    """``EC_PRE``: ``g(u) ⊙ u`` (``u = x A_iᵀ`` over all of K, fp32; gated as in ``w4_batched_kernel``'s epilogue) of
    member ``i = program_id(1)`` for the rows of M tile ``program_id(0)``, into ``gu`` fp32 ``[MEMBERS, M, BLOCK_R]``.
    Once per launch instead of in every N tile's K loop (which re-reads A and adds an MMA per K block there).

    ``SPLIT`` > 1: program ``program_id(2)`` sums ``K_PER_SPLIT`` of K into its slot of ``part`` fp32
    ``[SPLIT, MEMBERS, M, BLOCK_R]``; the last of the SPLIT to arrive (``cnt`` int32 ``[MEMBERS, M tiles]``, left at
    zero) adds the slots in a fixed order (deterministic), gates and stores. At decode M one M tile and a few members
    are a handful of programs, each reading all of A_i serially: one per SM is latency-bound on K.

    ``GDC`` (``w4_batched_kernel`` launched next with programmatic dependent launch): every program lets it start at
    once, so its W4 K loop streams the weights while this runs; it waits (``gdc_wait``) only in its epilogue."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    member = tl.program_id(1)
    pid_s = tl.program_id(2)
    a_ptr, gw_ptr, gb_ptr = a0, gw0, gb0
    if member == 1:
        a_ptr, gw_ptr, gb_ptr = a1, gw1, gb1
    if member == 2:
        a_ptr, gw_ptr, gb_ptr = a2, gw2, gb2
    if member == 3:
        a_ptr, gw_ptr, gb_ptr = a3, gw3, gb3
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    rows = (member * M + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        u = dot(x, _a_tile(a_ptr, offs_r, R, K, kk, k_ok), u, INTERPRET)
    finish = True
    if SPLIT > 1:
        slot = tl.num_programs(1) * M * BLOCK_R
        tl.store(part_ptr + pid_s * slot + rows, u, mask=m_mask[:, None])
        tl.debug_barrier()
        ctr = cnt_ptr + member * tl.num_programs(0) + pid_m
        finish = tl.atomic_add(ctr, 1) == SPLIT - 1  # acq_rel, after the CTA barrier: publishes this slot
        if finish:  # the slots SUM_SLOTS at a time: their loads in flight together, not one L2 trip per slot
            SUM_SLOTS: tl.constexpr = 8 if SPLIT >= 8 else (4 if SPLIT >= 4 else 2)
            offs_s = tl.arange(0, SUM_SLOTS)
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for first_slot in range(0, SPLIT, SUM_SLOTS):
                sk = first_slot + offs_s
                part = tl.load(part_ptr + sk[:, None, None] * slot + rows[None, :, :],
                               mask=(sk[:, None, None] < SPLIT) & m_mask[None, :, None], other=0.0, volatile=True)
                u += tl.sum(part, axis=0)  # a fixed order: the sum is the same on every run
            tl.store(ctr, 0)
    if finish:
        if GATED:
            u = _gated(u, gw_ptr, gb_ptr, offs_r, R, EC_LD)
        tl.store(gu_ptr + rows, u, mask=m_mask[:, None])
