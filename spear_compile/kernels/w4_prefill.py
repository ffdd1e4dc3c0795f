"""Prefill kernel (large M, compute-bound): a tensor-core W4A16 GEMM with the EC in its epilogue. (The pieces
of the dequantize + cuBLAS path: ``w4_dequantize`` and ``ec_prologue``.)

Per K block: load the packed ``[BLOCK_N, BLOCK_K/2]`` bytes, unpack the nibbles with
``tl.join`` + reshape (low nibble = even k), dequantize ``(q - zero) * scale`` in fp32 registers,
cast to the activation dtype and ``tl.dot`` with the x tile. ``BLOCK_K`` divides the group, so one
(scale, zero) column per K block. Epilogue: ``+ (u ⊙ 2σ(u Wgᵀ + bg)) Bᵀ`` with ``u = x Aᵀ``
precomputed by the launcher (a small matmul; the separable step for tensor parallelism) and bias.
``SWAP``: the same GEMM as ``yᵀ = W xᵀ`` (dequantized W as the A operand, which Hopper's wgmma can read
from registers; x as B), transposed back before the epilogue.

"""
from __future__ import annotations

import triton
import triton.language as tl

from .tl_helpers import dot


@triton.jit
def w4_prefill_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    u_ptr, b_ptr, gw_ptr, gb_ptr,
    M, N, K, R, group_size, n_groups, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EC: tl.constexpr, GATED: tl.constexpr,
    PER_CHANNEL: tl.constexpr = False, INTERPRET: tl.constexpr = False, SWAP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    q_rows = q_ptr + offs_n[:, None] * (K // 2)
    if SWAP:  # accumulate yᵀ = W xᵀ: the dequantized tile is the A operand (registers), x the B operand
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        j = k0 // 2 + offs_j
        q = tl.load(q_rows + j[None, :], mask=n_mask[:, None] & (j < K // 2)[None, :], other=0)
        q = tl.reshape(tl.join(q & 0xF, q >> 4), (BLOCK_N, BLOCK_K))
        g = k0 // group_size
        zc = tl.load(z_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32) + 8388608.0
        # Nibble -> float without I2F: bits 0x4B00000q are the float 2^23 + q; minus (2^23 + zero) is exact.
        w = (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zc[:, None]
        if PER_CHANNEL:  # (q - zero) is exact in bf16/fp16: scale once, after the loop
            wq = w.to(x.dtype)
        else:
            s = tl.load(s_ptr + offs_n * n_groups + g, mask=n_mask, other=0.0).to(tl.float32)
            wq = (w * s[:, None]).to(x.dtype)
        if SWAP:
            acc = dot(wq, tl.trans(x), acc, INTERPRET)
        else:
            acc = dot(x, tl.trans(wq), acc, INTERPRET)
    if SWAP:
        acc = tl.trans(acc)
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    if HAS_EC:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        if GATED:
            gw = tl.load(gw_ptr + offs_r[:, None] * R + offs_r[None, :],
                         mask=r_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            gb = tl.load(gb_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
            u = u * (2.0 * tl.sigmoid(tl.dot(u, tl.trans(gw), input_precision="ieee") + gb[None, :]))
        bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc = dot(u.to(bt.dtype), tl.trans(bt), acc, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
