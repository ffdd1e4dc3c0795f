"""EC pieces shared by the decode kernels: the u = A x partial tile, the tile's B/gate operands, the
gate + ``u Bᵀ`` epilogue, and a small fp32 ``a @ bᵀ`` (tensor cores when the tile has >= 16 rows) for the "spin"
mode; for the "epoch" / "pdl" modes the u tile that publishes the gated u once as epoch-tagged words, the u kernel
(``ec_u_kernel``), the finishing program's tag check and the ``gu Bᵀ`` add."""
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
