"""EC pieces shared by the decode kernels: the u = A x partial tile, the tile's B/gate operands, the
gate + ``u Bᵀ`` epilogue, and a small fp32 ``a @ bᵀ`` (tensor cores when the tile has >= 16 rows) for the "spin"
mode; for the "epoch" / "pdl" modes the u tile that publishes the gated u once as epoch-tagged words, the u kernel
(``ec_u_kernel``), the finishing program's tag check and the ``gu Bᵀ`` add; for the "slots" family (M = 1) the u tile
that stores its own tagged partial, the finishing program's slot sum + gate, and the per-N-tile EC program of
"ecsplit" / "ecterm" (bench/results/decode_ec_slots.md)."""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


@triton.jit
def _matmul_nt(a, b, USE_DOT: tl.constexpr):
    """``a [BM, R] @ b[BN, R]ᵀ`` in fp32: tensor cores when BM >= 16, broadcast-sum otherwise."""
    if USE_DOT:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _u_partial_tile(x_ptr, a_ptr, u_ptr, tile, M, K, R, stride_xm,
                    BLOCK_M: tl.constexpr, BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """``u[m, r] += sum_{k in chunk} x[m, k] A[r, k]`` (fp32 atomics into the workspace)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tile * BLOCK_KU + tl.arange(0, BLOCK_KU)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                mask=(offs_r[:, None] < R) & k_mask[None, :], other=0.0)
    if USE_DOT:
        part = dot(x, tl.trans(a), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), INTERPRET)
    else:
        part = tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    tl.atomic_add(u_ptr + offs_m[:, None] * R + offs_r[None, :], part,
                  mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), sem="relaxed")


@triton.jit
def _ec_operands(b_ptr, gw_ptr, gb_ptr, offs_n, N, R, GATED: tl.constexpr, BLOCK_R: tl.constexpr):
    """This tile's ``B`` rows and the gate, loaded at program start so their latency hides under the stream."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                 mask=(offs_n[:, None] < N) & r_mask[None, :], other=0.0).to(tl.float32)
    if GATED:
        gw = tl.load(gw_ptr + offs_r[:, None] * R + offs_r[None, :],
                     mask=r_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    else:
        gw = bt
        gb = offs_r
    return bt, gw, gb


@triton.jit
def _ec_epilogue(acc, u_ptr, bt, gw, gb, offs_m, M, R,
                 GATED: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr):
    """``acc + (u ⊙ 2σ(u Wgᵀ + bg)) Bᵀ`` for this tile; u is fp32 ``[M, R]`` (coherent loads)."""
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r < R)[None, :], other=0.0, volatile=True).to(tl.float32)
    if GATED:
        u = u * (2.0 * tl.sigmoid(_matmul_nt(u, gw, USE_DOT) + gb[None, :]))
    return acc + _matmul_nt(u, bt, USE_DOT)


@triton.jit
def _wait_for_u(acc, sync_ptr, NUM_U_TILES):
    """Spin until every u tile has arrived (``sync_ptr[1]``). The cap turns a bug into an error, not a hang:
    past it u is incomplete and the tile is poisoned with NaN, loud, never a wrong number."""
    MAX_SPINS: tl.constexpr = 1 << 20
    seen = tl.atomic_add(sync_ptr + 1, 0)
    spins = 0
    while (seen < NUM_U_TILES) & (spins < MAX_SPINS):
        seen = tl.atomic_add(sync_ptr + 1, 0)
        spins += 1
    tl.debug_barrier()
    return tl.where(seen >= NUM_U_TILES, acc, float("nan"))


# ---------------------------------------------------------------- gated u published once per launch
# "epoch" (one launch) and "pdl" (u kernel + W kernel) modes. The last u tile to arrive reads the summed
# u, applies the gate once, and publishes g(u) ⊙ u as int64 words ``(epoch << 32) | fp32 bits``: a
# finishing W program checks the tags of the words it loads (one load, no counter, no fence: each aligned
# 64-bit word is written by one atomic exchange and read whole), so nothing needs resetting after the
# launch. Epochs: ``ep`` (the launch count of this launch geometry) is bumped by the last u tile; the
# finishing program of N tile n expects ``phase[n] + 1`` and stores it back. Every launch of one geometry
# (N, N tiles) advances ``ep`` and every ``phase[n]`` by one, so they stay equal between launches.
@triton.jit
def _pack_words(v, e):
    """fp32 ``v`` as int64 words tagged with the int32 epoch ``e`` in the high half."""
    bits = v.to(tl.int32, bitcast=True).to(tl.uint32, bitcast=True).to(tl.int64)
    return (e.to(tl.int64) << 32) | bits


@triton.jit
def _u_tile_publish(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, ep_ptr, tile, NUM_U_TILES, M, K, R,
                    stride_xm, BLOCK_M: tl.constexpr, BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr,
                    GATED: tl.constexpr, USE_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """One u tile: its ``x A_chunkᵀ`` partial into the fp32 ``u`` workspace; the last tile to arrive reads u,
    zeroes it and the arrival counter (every other tile has added), gates it and publishes the tagged words."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    msk = (offs_m[:, None] < M) & r_mask[None, :]
    e = tl.load(ep_ptr) + 1  # loaded first, with the gate's operands: off the last tile's serial chain
    if GATED:
        gw = tl.load(gw_ptr + offs_r[:, None] * R + offs_r[None, :], mask=r_mask[:, None] & r_mask[None, :],
                     other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    _u_partial_tile(x_ptr, a_ptr, u_ptr, tile, M, K, R, stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, USE_DOT, INTERPRET)
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr + 1, 1)  # acq_rel, after the CTA barrier: publishes this partial
    if arrived == NUM_U_TILES - 1:
        idx = offs_m[:, None] * R + offs_r[None, :]
        u = tl.load(u_ptr + idx, mask=msk, other=0.0, volatile=True)
        tl.store(u_ptr + idx, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=msk)
        tl.store(sync_ptr + 1, 0)
        tl.store(ep_ptr, e)
        if GATED:
            u = u * (2.0 * tl.sigmoid(_matmul_nt(u, gw, USE_DOT) + gb[None, :]))
        tl.atomic_xchg(gu_ptr + idx, _pack_words(u, e), mask=msk, sem="relaxed")



@triton.jit
def _u_tile(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, ep_ptr, tile, NUM_U_TILES, M, K, R, stride_xm,
            BLOCK_M: tl.constexpr, BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr, GATED: tl.constexpr,
            USE_DOT: tl.constexpr, INTERPRET: tl.constexpr, EC_MODE: tl.constexpr):
    """A u tile of a one-launch EC decode kernel: "epoch" (``EC_MODE`` 1) publishes through
    :func:`_u_tile_publish`; "spin" (0) adds its partial and then counts its arrival (after the CTA barrier)."""
    if EC_MODE == 1:
        _u_tile_publish(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, ep_ptr, tile, NUM_U_TILES, M, K, R,
                        stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, GATED, USE_DOT, INTERPRET)
    else:
        _u_partial_tile(x_ptr, a_ptr, u_ptr, tile, M, K, R, stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, USE_DOT, INTERPRET)
        tl.debug_barrier()
        tl.atomic_add(sync_ptr + 1, 1)  # acq_rel, after the CTA barrier: publishes the u partial

@triton.jit
def ec_u_kernel(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, ep_ptr, M, K, R, stride_xm, NUM_U_TILES,
                BLOCK_M: tl.constexpr, BLOCK_KU: tl.constexpr, BLOCK_R: tl.constexpr, GATED: tl.constexpr,
                GDC: tl.constexpr, INTERPRET: tl.constexpr = False):
    """``g(u) ⊙ u`` for the W kernel launched next (mode "pdl"/"2k"): ``NUM_U_TILES`` programs, one K chunk
    each. With ``GDC`` (the W kernel is launched with programmatic dependent launch) every program lets the
    W kernel start at once: it streams its weights while this runs and waits (``gdc_wait``) only after its
    main loop."""
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    _u_tile_publish(x_ptr, a_ptr, u_ptr, sync_ptr, gw_ptr, gb_ptr, gu_ptr, ep_ptr, tl.program_id(0), NUM_U_TILES,
                    M, K, R, stride_xm, BLOCK_M, BLOCK_KU, BLOCK_R, GATED, USE_DOT, INTERPRET)


@triton.jit
def _load_b(b_ptr, offs_n, N, R, BLOCK_R: tl.constexpr):
    """This tile's ``B`` rows ``[BLOCK_N, BLOCK_R]`` in their own dtype (bf16/fp16: half the registers of fp32
    when loaded at program start, and the tensor cores' operand type at M >= 16)."""
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=(offs_n[:, None] < N) & (offs_r[None, :] < R),
                   other=0.0)


@triton.jit
def _gu_words(gu_ptr, offs_m, M, R, BLOCK_R: tl.constexpr):
    """The tagged ``g(u) ⊙ u`` words (coherent loads) and their mask."""
    offs_r = tl.arange(0, BLOCK_R)
    msk = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    return tl.load(gu_ptr + offs_m[:, None] * R + offs_r[None, :], mask=msk, other=0, volatile=True), msk


@triton.jit
def _gu_value(w):
    return w.to(tl.int32).to(tl.float32, bitcast=True)  # low half (truncation), reinterpreted


@triton.jit
def _stale(w, msk, e):
    return tl.sum(tl.sum(tl.where(msk & ((w >> 32).to(tl.int32) != e), 1, 0), axis=1), axis=0)


@triton.jit
def _gu_check_epoch(w, msk, e, gu_ptr, offs_m, M, R, BLOCK_R: tl.constexpr):
    """Mode "epoch": ``g(u) ⊙ u`` of this launch from words ``w`` already loaded (issued beside the split-K
    partial-sum read), re-read while any carries an epoch other than ``e`` (normally none does: the u tiles run
    first). Past the cap the tile is poisoned with NaN (a bug is loud, never a wrong number or a hang)."""
    MAX_SPINS: tl.constexpr = 1 << 20
    stale = _stale(w, msk, e)
    spins = 0
    while (stale > 0) & (spins < MAX_SPINS):
        w, msk = _gu_words(gu_ptr, offs_m, M, R, BLOCK_R)
        stale = _stale(w, msk, e)
        spins += 1
    return tl.where(stale == 0, _gu_value(w), float("nan"))


@triton.jit
def _ec_apply(acc, gu, bt, USE_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + gu Bᵀ``: M >= 16 on the tensor cores (gu rounded to B's dtype, fp32 accumulation into ``acc``'s
    own layout), M = 1 by FMA in fp32."""
    if USE_DOT:
        return dot(gu.to(bt.dtype), tl.trans(bt), acc, INTERPRET)
    else:
        return acc + tl.sum(gu[:, None, :] * bt.to(tl.float32)[None, :, :], axis=2)


# ---------------------------------------------------------------- "slots" (one launch, M = 1): no atomics, no counter
# Each u tile writes its own partial ``x A_chunkᵀ`` (fp32 ``[M, r]``) as tagged words ``(epoch << 32) | fp32 bits``
# into its own slot ``slot[tile, m, r]`` (16 rows a slot); the finishing program of each N tile loads every slot with
# its split-K partial sum, B rows and the gate (one round trip), re-reads only while a tag is stale, sums the slots
# and applies the gate itself. Epochs: state ``phase[0 : NUM_U_TILES]`` (u tiles) then ``phase[NUM_U_TILES + n]``
# (N tiles), one int32 each; every launch of one geometry bumps each by one, so they agree between launches.
SLOT_ROWS = tl.constexpr(16)  # rows of one slot (the workspace's layout: slot t, row m, rank r at (t * 16 + m) * R + r)


@triton.jit
def _u_tile_slot(x_ptr, a_ptr, slot_ptr, phase_ptr, tile, M, K, R, stride_xm,
                 BLOCK_M: tl.constexpr, BLOCK_KU: tl.constexpr, U_SUB: tl.constexpr, BLOCK_R: tl.constexpr,
                 USE_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Mode "slots": u tile ``tile`` covers K ``[tile * U_SUB * BLOCK_KU, +U_SUB * BLOCK_KU)`` in ``U_SUB`` sub-blocks
    and stores its partial into its slot, tagged with its own phase + 1 (one 64-bit exchange per word, its result
    unused: whole words, no counter, no fence)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    e = tl.load(phase_ptr + tile) + 1
    part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k0 = tile * (U_SUB * BLOCK_KU)
    n_sub = tl.minimum(U_SUB, tl.cdiv(K - k0, BLOCK_KU))  # a runtime trip count (the launcher halves BLOCK_KU when
    for s in tl.range(0, n_sub, num_stages=1):            # U_SUB > 1: registers as with one sub-block)
        offs_k = k0 + s * BLOCK_KU + tl.arange(0, BLOCK_KU)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            part = dot(x, tl.trans(a), part, INTERPRET)
        else:
            part += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    msk = (offs_m[:, None] < M) & r_mask[None, :]
    idx = (tile * SLOT_ROWS + offs_m[:, None]) * R + offs_r[None, :]
    tl.atomic_xchg(slot_ptr + idx, _pack_words(part, e), mask=msk, sem="relaxed")  # whole 64-bit words
    tl.store(phase_ptr + tile, e)


@triton.jit
def _slot_words(slot_ptr, offs_m, M, R, NUM_U_TILES, BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr):
    """Every u tile's tagged partial words ``[BLOCK_U, BLOCK_M, BLOCK_R]`` (coherent loads) and their mask."""
    offs_u = tl.arange(0, BLOCK_U)
    offs_r = tl.arange(0, BLOCK_R)
    msk = (offs_u[:, None, None] < NUM_U_TILES) & (offs_m[None, :, None] < M) & (offs_r[None, None, :] < R)
    idx = (offs_u[:, None, None] * SLOT_ROWS + offs_m[None, :, None]) * R + offs_r[None, None, :]
    return tl.load(slot_ptr + idx, mask=msk, other=0, volatile=True), msk


@triton.jit
def _gate_operands(gw_ptr, gb_ptr, R, GATED: tl.constexpr, BLOCK_R: tl.constexpr):
    """The gate ``W_g [r, r]``, ``b_g [r]`` in fp32 (placeholders when ungated)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    if GATED:
        gw = tl.load(gw_ptr + offs_r[:, None] * R + offs_r[None, :], mask=r_mask[:, None] & r_mask[None, :],
                     other=0.0).to(tl.float32)
        gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    else:
        gw = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        gb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    return gw, gb


@triton.jit
def _stale3(w, msk, e):
    return tl.sum(tl.sum(tl.sum(tl.where(msk & ((w >> 32).to(tl.int32) != e), 1, 0), axis=2), axis=1), axis=0)


@triton.jit
def _gu_slots(w, msk, e, slot_ptr, offs_m, M, R, NUM_U_TILES, gw, gb, GATED: tl.constexpr, BLOCK_U: tl.constexpr,
              BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, MAX_SPINS: tl.constexpr):
    """Mode "slots": ``g(u) ⊙ u`` from the slot words ``w`` already loaded: re-read while any tag is not ``e``
    (normally none is: the u tiles start first and are short), sum the slots, gate. Past ``MAX_SPINS`` re-reads the
    tile is poisoned with NaN (a bug is loud, never a wrong number or a hang)."""
    stale = _stale3(w, msk, e)
    spins = 0
    while (stale > 0) & (spins < MAX_SPINS):
        w, msk = _slot_words(slot_ptr, offs_m, M, R, NUM_U_TILES, BLOCK_U, BLOCK_R)
        stale = _stale3(w, msk, e)
        spins += 1
    u = tl.sum(tl.where(msk, _gu_value(w), 0.0), axis=0)  # [BLOCK_M, BLOCK_R]
    if GATED:
        u = u * (2.0 * tl.sigmoid(_matmul_nt(u, gw, USE_DOT) + gb[None, :]))
    return tl.where(stale == 0, u, float("nan"))


@triton.jit
def _ec_split_program(slot_ptr, phase_ptr, gw_ptr, gb_ptr, b_ptr, bias_ptr, y_ptr, acc_ptr, arrive_ptr, pid_n,
                      M, N, R, NUM_U_TILES, SPLIT_K, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                      USE_DOT: tl.constexpr, INTERPRET: tl.constexpr, MAX_SPINS: tl.constexpr,
                      PUBLISH: tl.constexpr, ecw_ptr):
    """``PUBLISH`` (mode "ecterm"): the EC term goes to ``ecw_ptr`` as tagged words ``[M, N]`` (this tile's epoch)
    for the W finisher to add, instead of into the split-K accumulator. Mode "ecsplit": the EC term of N tile ``pid_n`` as one more split-K arrival. Loads the slots, the gate and B
    rows together, waits for the u tiles' tags, adds ``g(u) ⊙ u Bᵀ`` into the split-K accumulator and arrives; the
    last of the ``SPLIT_K + 1`` arrivals (normally a W split: this program runs beside the stream) finishes the tile
    as W4-only does, so no EC work is left on the finishing program's tail."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    words, wmask = _slot_words(slot_ptr, offs_m, M, R, NUM_U_TILES, BLOCK_U, BLOCK_R)
    e_exp = tl.load(phase_ptr + NUM_U_TILES + pid_n) + 1
    gw, gb = _gate_operands(gw_ptr, gb_ptr, R, GATED, BLOCK_R)
    bt = _load_b(b_ptr, offs_n, N, R, BLOCK_R)
    gu = _gu_slots(words, wmask, e_exp, slot_ptr, offs_m, M, R, NUM_U_TILES, gw, gb, GATED, BLOCK_U, BLOCK_R, USE_DOT,
                   MAX_SPINS)
    tl.store(phase_ptr + NUM_U_TILES + pid_n, e_exp)
    ec = _ec_apply(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), gu, bt, USE_DOT, INTERPRET)
    out_mask = m_mask[:, None] & n_mask[None, :]
    acc_ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    if PUBLISH:
        tl.atomic_xchg(ecw_ptr + offs_m[:, None] * N + offs_n[None, :], _pack_words(ec, e_exp), mask=out_mask,
                       sem="relaxed")
        arrived = SPLIT_K - 1  # never finishes the tile
    else:
        tl.atomic_add(acc_ptrs, ec, mask=out_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(arrive_ptr + pid_n, 1)  # acq_rel, after the CTA barrier
    if arrived == SPLIT_K:  # every W split has arrived: finish as W4-only does
        acc = tl.load(acc_ptrs, mask=out_mask, other=0.0, volatile=True)
        tl.store(acc_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=out_mask)
        tl.store(arrive_ptr + pid_n, 0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _ec_term_words(ecw_ptr, offs_m, offs_n, M, N):
    """Mode "ecterm": this tile's published EC term words ``[BLOCK_M, BLOCK_N]`` (coherent loads) and their mask."""
    msk = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return tl.load(ecw_ptr + offs_m[:, None] * N + offs_n[None, :], mask=msk, other=0, volatile=True), msk


@triton.jit
def _ec_term(w, msk, e, ecw_ptr, offs_m, offs_n, M, N, MAX_SPINS: tl.constexpr):
    """Mode "ecterm": the EC term from words ``w`` (loaded beside the partial sum), re-read while a tag is not ``e``;
    NaN past the cap."""
    stale = _stale(w, msk, e)
    spins = 0
    while (stale > 0) & (spins < MAX_SPINS):
        w, msk = _ec_term_words(ecw_ptr, offs_m, offs_n, M, N)
        stale = _stale(w, msk, e)
        spins += 1
    return tl.where(stale == 0, tl.where(msk, _gu_value(w), 0.0), float("nan"))
