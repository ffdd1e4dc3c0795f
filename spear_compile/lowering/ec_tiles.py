"""EC pieces shared by the decode kernels: the u = A x partial tile, the tile's B/gate operands, the
gate + ``u Bᵀ`` epilogue, and a small fp32 ``a @ bᵀ`` (tensor cores when the tile has >= 16 rows)."""
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
