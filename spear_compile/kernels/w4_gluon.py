"""Hopper (sm_90) W4A16 GEMM in Gluon for large M: the int4 dequantize overlaps the asynchronous wgmma.

``y[M, N] = x[M, K] @ Wᵀ (+ bias)``, ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]``, q read as int32 words
``[N, K/8]`` (nibble i of word j is k = 8j + i). One CTA per ``BLOCK_M x BLOCK_N`` output tile, 1 or 2 warpgroups.

Pipeline per K tile i (``BLOCK_K`` = 64, inside one scale group):

* TMA: the x tile ``[BLOCK_M, BLOCK_K]`` and the word tile ``[BLOCK_N, BLOCK_K/8]`` (int32) of tile t land in stage
  t % NUM_STAGES of a shared ring, one mbarrier (expect-tx) per stage; x rows past M read as zeros. The stage of tile
  i - 2 is refilled with tile i + NUM_STAGES - 2 right after iteration i's barrier. Weight words never pass through
  registers in flight, so the ``fence.proxy.async`` below never waits on a global load.
* Dequantize (the warps, while MMA i - 1 runs on the tensor cores): the words are read from shared memory and
  ``DQ2`` (default) turns each into 4 packed bf16x2/f16x2 pairs in 13-17 instructions (``_dq2_asm``: magic-exponent
  ``lop3``, ``prmt``, packed ``sub`` of magic + zero, packed ``mul`` by the group scale), stored as int32 pairs
  through a reinterpreted view of the same NVMMA-swizzled buffer; ``DQ2=False`` is the fp32 path
  (``(q | 0x4B000000)`` as fp32 is 2^23 + q, minus 2^23 + zero, times scale, cast). The bf16/fp16 tile goes K-major
  into a 3-deep W ring (the wgmma B operand through ``.permute``). Grouped (scale, zero) rows are loaded two tiles
  ahead, after the fence.
* ``fence_async_shared`` + CTA barrier, then ``warpgroup_mma(x_stage, w_buf.T, acc, is_async=True)`` and
  ``warpgroup_mma_wait(1)``: MMA i stays in flight across the dequantize of tile i + 1; only MMA i - 1 must have
  retired. The barrier of iteration i proves every warpgroup retired MMA i - 2, so the W buffer (3-deep ring: with
  2 warpgroups a 2-deep one would race) and the stage of tile i - 2 may be rewritten from there on.
* Epilogue: per-channel scale (``q - zero`` is exact in bf16/fp16, so the loop skips it), bias, cast, masked store.

Also here: the warp-specialized ``w4_gluon_ws_kernel`` and the swapped-operand ``w4_gluon_swap_kernel`` (yᵀ tiles, W
dequantized in registers straight into the wgmma A operand, optional split-K); see their block comments.

Only definitions run at import; ``AVAILABLE`` is False where Gluon or its Hopper names are missing (the kernel is
written against Triton 3.6's Gluon API).
"""
from __future__ import annotations

try:  # Gluon's Hopper API (Triton 3.6 names); any other Triton may lack or rename them
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    # the TMA load: ``async_copy_global_to_shared`` in Triton 3.6, ``async_load`` (same arguments) from 3.7 on
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # Triton 3.6 names the kernel uses that later Gluon renamed (``thread_barrier``, ``_reinterpret``)
    AVAILABLE = all(hasattr(gl, n) for n in ("NVMMASharedLayout", "inline_asm_elementwise", "thread_barrier")) \
        and hasattr(gl.shared_memory_descriptor, "_reinterpret")
except Exception:  # noqa: BLE001 - an old or new Triton: the path is simply unavailable
    AVAILABLE = False


def _dq2_asm(ty, magic, scaled):
    """PTX: one int32 word (``$4``) -> 4 packed 16-bit pairs ``$0..$3`` = (k0,k1), (k2,k3), (k4,k5), (k6,k7).
    ``lop3`` puts nibbles i and i + 4 under the magic exponent (bf16 0x4300 = 128 + q, fp16 0x6400 = 1024 + q, both
    with an ulp of 1), ``prmt`` pairs neighbouring k, ``sub`` takes the packed (magic + zero) ``$5`` (exact: zero
    points are integers in [0, 15]), ``mul`` the packed scale ``$6`` (grouped only; one rounding, as in fp32)."""
    lines = [
        "{", ".reg .b32 t0, t1, t2, t3, s1, s2, s3;",
        "shr.u32 s1, $4, 4;", "shr.u32 s2, $4, 8;", "shr.u32 s3, $4, 12;",
        f"lop3.b32 t0, $4, 0x000f000f, {magic}, 0xea;", f"lop3.b32 t1, s1, 0x000f000f, {magic}, 0xea;",
        f"lop3.b32 t2, s2, 0x000f000f, {magic}, 0xea;", f"lop3.b32 t3, s3, 0x000f000f, {magic}, 0xea;",
        "prmt.b32 $0, t0, t1, 0x5410;", "prmt.b32 $1, t2, t3, 0x5410;",
        "prmt.b32 $2, t0, t1, 0x7632;", "prmt.b32 $3, t2, t3, 0x7632;",
    ]
    for r in range(4):
        lines.append(f"sub.{ty} ${r}, ${r}, $5;")
        if scaled:
            lines.append(f"mul.{ty} ${r}, ${r}, $6;")
    return "\n".join(lines + ["}"])


# (PTX packed type, magic exponent bits: 2^7 for bf16, 2^10 for fp16, so a nibble n ORed in reads as magic + n)
_BF16X2 = ("rn.bf16x2", "0x43004300")
_F16X2 = ("rn.f16x2", "0x64006400")

if AVAILABLE:
    _ASM_BF16 = gl.constexpr(_dq2_asm(*_BF16X2, False))
    _ASM_BF16_S = gl.constexpr(_dq2_asm(*_BF16X2, True))
    _ASM_F16 = gl.constexpr(_dq2_asm(*_F16X2, False))
    _ASM_F16_S = gl.constexpr(_dq2_asm(*_F16X2, True))

    @gluon.constexpr_function
    def _mma_warps(BLOCK_M, num_warps):
        """``warps_per_cta`` of the wgmma accumulator: warpgroups stacked along M when BLOCK_M allows, else along N."""
        if num_warps == 4 or BLOCK_M >= 16 * num_warps:
            return [num_warps, 1]
        return [4, num_warps // 4]

    @gluon.constexpr_function
    def _instr_n(BLOCK_M, BLOCK_N, num_warps):
        wn = 1 if (num_warps == 4 or BLOCK_M >= 16 * num_warps) else num_warps // 4
        n = min(256, BLOCK_N // wn)
        while (BLOCK_N // wn) % n:
            n -= 8
        return n

    @gluon.constexpr_function
    def _word_spt(KW):
        return min(KW, 4)

    @gluon.jit
    def _pack2(v, dtype: gl.constexpr):
        """fp32 vector -> int32 holding the value twice as a packed 16-bit pair of ``dtype``."""
        h = v.to(dtype).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return h | (h << 16)

    @gluon.jit
    def _tile_offsets(M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """(off_m, off_n) of this program's output tile: GROUP_M row tiles in a row share each W column tile (L2
        reuse)."""
        pid = gl.program_id(0)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = N // BLOCK_N
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _load_stage(x_desc, q_desc, bar, x_buf, q_buf, off_m, off_n, t, pred):
        """TMA: K tile ``t``'s x tile and weight-word tile into one ring stage, completing ``bar`` by expect-tx (x rows
        past M read as zeros); nothing when ``pred`` is false."""
        mbarrier.expect(bar, x_desc.block_type.nbytes + q_desc.block_type.nbytes, pred=pred)
        _tma_load(x_desc, [off_m, t * x_desc.block_type.shape[1]], bar, x_buf, pred=pred)
        _tma_load(q_desc, [off_n, t * q_desc.block_type.shape[1]], bar, q_buf, pred=pred)

    @gluon.jit
    def _zero_scale(z_ptr, s_ptr, offs_n, n_groups, g):
        """Group ``g``'s zero points and scales of the rows ``offs_n``, in fp32."""
        return (gl.load(z_ptr + offs_n * n_groups + g).to(gl.float32),
                gl.load(s_ptr + offs_n * n_groups + g).to(gl.float32))

    @gluon.jit
    def _dq2_pairs(words, z2, s2, PER_CHANNEL: gl.constexpr, IS_BF16: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_K: gl.constexpr):
        """The words ``[BLOCK_N, BLOCK_K / 8]`` dequantized (``_dq2_asm``: packed ``z2`` = magic + zero, grouped also
        the packed scale ``s2``) as int32 pairs ``[BLOCK_N, BLOCK_K / 2]`` in k order."""
        if PER_CHANNEL:
            if IS_BF16:
                o0, o1, o2, o3 = gl.inline_asm_elementwise(_ASM_BF16, "=r,=r,=r,=r,r,r", [words, z2],
                                                           dtype=(gl.int32,) * 4, is_pure=True, pack=1)
            else:
                o0, o1, o2, o3 = gl.inline_asm_elementwise(_ASM_F16, "=r,=r,=r,=r,r,r", [words, z2],
                                                           dtype=(gl.int32,) * 4, is_pure=True, pack=1)
        else:
            if IS_BF16:
                o0, o1, o2, o3 = gl.inline_asm_elementwise(_ASM_BF16_S, "=r,=r,=r,=r,r,r,r", [words, z2, s2],
                                                           dtype=(gl.int32,) * 4, is_pure=True, pack=1)
            else:
                o0, o1, o2, o3 = gl.inline_asm_elementwise(_ASM_F16_S, "=r,=r,=r,=r,r,r,r", [words, z2, s2],
                                                           dtype=(gl.int32,) * 4, is_pure=True, pack=1)
        # [BLOCK_N, KW, 2, 2]: flat index 2c + b holds o_(2c+b), i.e. the pairs in k order
        return gl.reshape(gl.join(gl.join(o0, o2), gl.join(o1, o3)), [BLOCK_N, BLOCK_K // 2])

    @gluon.jit
    def _store_tile(acc, s_ptr, bias_ptr, y_ptr, M, N, stride_ym, off_m, off_n, PER_CHANNEL: gl.constexpr,
                    HAS_BIAS: gl.constexpr):
        """Epilogue: per-channel scale (``q - zero`` was exact, so the loop left it out), bias, cast, masked store."""
        BLOCK_M: gl.constexpr = acc.type.shape[0]
        BLOCK_N: gl.constexpr = acc.type.shape[1]
        cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc.type.layout))
        rows_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc.type.layout))
        if PER_CHANNEL:
            acc = acc * gl.expand_dims(gl.load(s_ptr + cols).to(gl.float32), 0)
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(bias_ptr + cols).to(gl.float32), 0)
        y_ptrs = y_ptr + gl.expand_dims(rows_m, 1) * stride_ym + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows_m < M, 1) & gl.expand_dims(cols < N, 0)
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def w4_gluon_kernel(
        x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr,
        M, N, K, n_groups, stride_ym,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
        GROUP_M: gl.constexpr, GROUP_TILES: gl.constexpr, PER_CHANNEL: gl.constexpr, HAS_BIAS: gl.constexpr,
        DQ2: gl.constexpr, num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = x_desc.dtype
        KW: gl.constexpr = BLOCK_K // 8  # int32 words a row per K tile
        NBUF: gl.constexpr = 3  # the W ring's depth (the docstring: 3 keeps 2 warpgroups race-free)
        off_m, off_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # ---- layouts
        SPT: gl.constexpr = _word_spt(KW)
        TPK: gl.constexpr = KW // SPT
        TPN: gl.constexpr = 32 // TPK
        L3: gl.constexpr = gl.BlockedLayout([1, SPT, 8], [TPN, TPK, 1], [num_warps, 1, 1], [2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(2, L3)  # the words [BLOCK_N, KW]
        LN: gl.constexpr = gl.SliceLayout(1, LW)  # per-row vectors (scale, zero)
        LI: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L3))  # nibble index
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_mma_warps(BLOCK_M, num_warps),
            instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 16])
        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
        # the same bytes as int32 pairs (the swizzle is defined on 16-byte chunks of 128-byte rows)
        w32_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=w_layout.swizzle_byte_width,
                                                        element_bitwidth=32, rank=2)
        IS_BF16: gl.constexpr = dtype == gl.bfloat16
        MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0

        x_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        q_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N, KW], q_desc.layout)
        w_smem = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, BLOCK_K], w_layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for si in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(si), count=1)
        fence_async_shared()

        n_k = K // BLOCK_K
        # ---- prologue: the x and word tiles 0 .. NUM_STAGES - 1 by TMA
        for si in gl.static_range(NUM_STAGES):
            _load_stage(x_desc, q_desc, bars.index(si), x_smem.index(si), q_smem.index(si), off_m, off_n, si,
                        si < n_k)

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=LN)
        shifts = gl.expand_dims(gl.expand_dims((gl.arange(0, 8, layout=LI) * 4).to(gl.uint32), 0), 1)  # [1, 1, 8]
        if PER_CHANNEL:
            zpc = gl.load(z_ptr + offs_n).to(gl.float32)
            zc = zpc + 8388608.0
            z2pc = gl.expand_dims(_pack2(zpc + MAGIC, dtype), 1)
        else:  # (scale, zero) of tiles i and i + 1 in registers; tile i + 2's loaded during iteration i
            za, sa = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, 0)
            zb, sb = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, gl.minimum(n_k - 1, 1) // GROUP_TILES)

        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        for i in range(n_k):
            cs = i % NUM_STAGES
            mbarrier.wait(bars.index(cs), (i // NUM_STAGES) & 1)
            words = q_smem.index(cs).load(LW)
            # ---- dequantize tile i into W buffer i % 3 (overlaps MMA i - 1 on the tensor cores)
            buf = i % NBUF
            if DQ2:  # packed 16-bit math, 2 values an instruction (see _dq2_asm)
                if PER_CHANNEL:
                    pairs = _dq2_pairs(words, z2pc, z2pc, PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
                else:
                    pairs = _dq2_pairs(words, gl.expand_dims(_pack2(za + MAGIC, dtype), 1),
                                       gl.expand_dims(_pack2(sa, dtype), 1), PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
                w_smem.index(buf)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], w32_layout).store(pairs)
            else:  # fp32 math on [BLOCK_N, KW, 8], k = 8j + nibble
                if PER_CHANNEL:
                    zcur = zc
                else:
                    zcur = za + 8388608.0
                q3 = (gl.expand_dims(words.to(gl.uint32, bitcast=True), 2) >> shifts) & 0xF
                w3 = (q3 | 0x4B000000).to(gl.float32, bitcast=True) - gl.expand_dims(gl.expand_dims(zcur, 1), 2)
                if not PER_CHANNEL:
                    w3 = w3 * gl.expand_dims(gl.expand_dims(sa, 1), 2)
                w_smem.index(buf).store(gl.reshape(w3.to(dtype), [BLOCK_N, BLOCK_K]))
            fence_async_shared()
            gl.thread_barrier()  # all W stores are in; every warp read its words; every warpgroup retired MMA i - 2
            # ---- refill the stage of tile i - 2 with tile i + NUM_STAGES - 2
            t = i + NUM_STAGES - 2
            refill = (i >= 2) & (t < n_k)
            st = t % NUM_STAGES
            _load_stage(x_desc, q_desc, bars.index(st), x_smem.index(st), q_smem.index(st), off_m, off_n, t, refill)
            if not PER_CHANNEL:  # after the fence, so that the fence does not wait for these loads
                za = zb
                sa = sb
                zb, sb = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, gl.minimum(i + 2, n_k - 1) // GROUP_TILES)
            # ---- MMA i, asynchronous; retire MMA i - 1 only
            acc = warpgroup_mma(x_smem.index(cs), w_smem.index(buf).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for si in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(si))

        _store_tile(acc, s_ptr, bias_ptr, y_ptr, M, N, stride_ym, off_m, off_n, PER_CHANNEL, HAS_BIAS)


# ====================================================================================================================
# Warp-specialized variant (``variant="ws"``), Machete-like: three partitions talk through mbarrier rings only.
#
# * load (worker, 1 warp, 24 registers; ``LOAD_PART``): for K tile i, waits ``empty[s]`` (s = i % NUM_STAGES), then
#   TMA-loads the x tile and the word tile into stage s, completing ``ready[s]`` by expect-tx. Without it
#   (``LOAD_PART=False``: 8 MMA warps of 128 accumulator registers need ~154 registers a thread, and 8 + 4 + 1 warps
#   round up to 16, which caps every thread at 128) the dequantize warpgroup issues the loads itself: tiles
#   0 .. NUM_STAGES - 1 up front, then tile i + NUM_STAGES - 2 after publishing W tile i (its stage held tile i - 2,
#   whose MMA retired once MMA i - 1 was issued, so the wait cannot deadlock).
# * dequantize (worker, 4 warps = one warpgroup, ``DQ_REGS`` registers): waits ``ready[s]``, reads the words, turns
#   them into bf16/fp16 pairs (``_dq2_asm``; grouped (scale, zero) rows prefetched two tiles ahead), waits
#   ``w_empty[b]`` (b = i % W_STAGES), stores the tile into W slot b, ``fence_async_shared``, then arrives on
#   ``w_ready[b]`` and on ``empty[s]`` (its share of the stage: the words are no longer needed).
# * MMA (the default partition, ``num_warps`` = 4 or 8 warps): waits ``ready[s]`` (x landed) and ``w_ready[b]``,
#   issues ``warpgroup_mma(x[s], W[b]ᵀ, acc, is_async=True)``, ``warpgroup_mma_wait(1)``: MMA i - 1 retired, so it
#   arrives on ``empty`` and ``w_empty`` of tile i - 1's slots. Epilogue (per-channel scale, bias, cast, masked store)
#   at the end, in the same warps.
#
# mbarrier phases: every barrier starts in phase 0; a consumer of fill u = i // DEPTH waits parity u & 1, a producer
# waiting for the slot to be free waits parity (u & 1) ^ 1 (a fresh barrier counts its "previous" phase, parity 1,
# as complete, so the first DEPTH waits pass). ``empty[s]`` counts 2 arrivals a fill (dequantize + MMA); the others 1.
# No barrier can run a full phase ahead of a waiter: each fill needs the waiter's own release of the previous one.
# An arrive is done by one thread (thread 0 of the partition), so the partition's warps first meet at a barrier.
# ====================================================================================================================
if AVAILABLE:
    @gluon.jit
    def _ws_load_partition(x_desc, q_desc, x_smem, q_smem, ready, empty, off_m, off_n, n_k,
                           NUM_STAGES: gl.constexpr):
        for i in range(n_k):
            s = i % NUM_STAGES
            mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
            _load_stage(x_desc, q_desc, ready.index(s), x_smem.index(s), q_smem.index(s), off_m, off_n, i, True)

    @gluon.jit
    def _ws_dequant_partition(x_desc, q_desc, x_smem, q_smem, w_smem, ready, empty, w_ready, w_empty, s_ptr, z_ptr,
                              off_m, off_n, n_k, n_groups, NUM_STAGES: gl.constexpr, W_STAGES: gl.constexpr,
                              GROUP_TILES: gl.constexpr, PER_CHANNEL: gl.constexpr, LOAD_PART: gl.constexpr,
                              DQ_WARPS: gl.constexpr):
        BLOCK_N: gl.constexpr = w_smem.type.shape[1]
        BLOCK_K: gl.constexpr = w_smem.type.shape[2]
        dtype: gl.constexpr = w_smem.dtype
        KW: gl.constexpr = BLOCK_K // 8
        SPT: gl.constexpr = _word_spt(KW)
        TPK: gl.constexpr = KW // SPT
        TPN: gl.constexpr = 32 // TPK
        L3: gl.constexpr = gl.BlockedLayout([1, SPT, 8], [TPN, TPK, 1], [DQ_WARPS, 1, 1], [2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(2, L3)  # the words [BLOCK_N, KW]
        LN: gl.constexpr = gl.SliceLayout(1, LW)  # per-row vectors (scale, zero)
        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
        w32_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=w_layout.swizzle_byte_width,
                                                        element_bitwidth=32, rank=2)
        IS_BF16: gl.constexpr = dtype == gl.bfloat16
        MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0

        if not LOAD_PART:  # no load partition: this one issues the TMA loads, tiles 0 .. NUM_STAGES - 1 first
            for si in gl.static_range(NUM_STAGES):
                _load_stage(x_desc, q_desc, ready.index(si), x_smem.index(si), q_smem.index(si), off_m, off_n, si,
                            si < n_k)

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=LN)
        if PER_CHANNEL:
            z2pc = gl.expand_dims(_pack2(gl.load(z_ptr + offs_n).to(gl.float32) + MAGIC, dtype), 1)
        else:  # (scale, zero) of tiles i and i + 1 in registers; tile i + 2's loaded during iteration i
            za, sa = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, 0)
            zb, sb = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, gl.minimum(n_k - 1, 1) // GROUP_TILES)
        for i in range(n_k):
            s = i % NUM_STAGES
            mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
            words = q_smem.index(s).load(LW)
            if PER_CHANNEL:
                pairs = _dq2_pairs(words, z2pc, z2pc, PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
            else:
                pairs = _dq2_pairs(words, gl.expand_dims(_pack2(za + MAGIC, dtype), 1),
                                   gl.expand_dims(_pack2(sa, dtype), 1), PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
                za = zb
                sa = sb
                zb, sb = _zero_scale(z_ptr, s_ptr, offs_n, n_groups, gl.minimum(i + 2, n_k - 1) // GROUP_TILES)
            b = i % W_STAGES
            mbarrier.wait(w_empty.index(b), ((i // W_STAGES) & 1) ^ 1)
            w_smem.index(b)._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], w32_layout).store(pairs)
            # W stores -> the MMA's async-proxy reads; word reads -> the next TMA write of stage s
            fence_async_shared()
            gl.thread_barrier()  # every warp of the partition stored its part / read its words (one thread arrives)
            mbarrier.arrive(w_ready.index(b), count=1)
            mbarrier.arrive(empty.index(s), count=1)
            if not LOAD_PART:  # refill the stage of tile i - 2 (MMA i - 2 retired once MMA i - 1 was issued)
                t = i + NUM_STAGES - 2
                refill = (i >= 2) & (t < n_k)
                st = t % NUM_STAGES
                mbarrier.wait(empty.index(st), ((t // NUM_STAGES) & 1) ^ 1, pred=refill)
                _load_stage(x_desc, q_desc, ready.index(st), x_smem.index(st), q_smem.index(st), off_m, off_n, t,
                            refill)

    @gluon.jit
    def _ws_mma_partition(x_smem, w_smem, ready, empty, w_ready, w_empty, s_ptr, bias_ptr, y_ptr, M, N,
                          stride_ym, off_m, off_n, n_k,
                          NUM_STAGES: gl.constexpr, W_STAGES: gl.constexpr, PER_CHANNEL: gl.constexpr,
                          HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = x_smem.type.shape[1]
        BLOCK_N: gl.constexpr = w_smem.type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_mma_warps(BLOCK_M, num_warps),
            instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 16])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        for i in range(n_k):
            s = i % NUM_STAGES
            b = i % W_STAGES
            mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
            mbarrier.wait(w_ready.index(b), (i // W_STAGES) & 1)
            acc = warpgroup_mma(x_smem.index(s), w_smem.index(b).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if num_warps > 4:  # thread 0 arrives for both warpgroups: the other one must have retired MMA i - 1 too
                gl.thread_barrier()
            # MMA i - 1 retired: its x stage and W slot are free
            prev = gl.maximum(i - 1, 0)
            mbarrier.arrive(empty.index(prev % NUM_STAGES), count=1, pred=i > 0)
            mbarrier.arrive(w_empty.index(prev % W_STAGES), count=1, pred=i > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        _store_tile(acc, s_ptr, bias_ptr, y_ptr, M, N, stride_ym, off_m, off_n, PER_CHANNEL, HAS_BIAS)

    @gluon.jit
    def w4_gluon_ws_kernel(
        x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr,
        M, N, K, n_groups, stride_ym,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
        W_STAGES: gl.constexpr, GROUP_M: gl.constexpr, GROUP_TILES: gl.constexpr, PER_CHANNEL: gl.constexpr,
        HAS_BIAS: gl.constexpr, LOAD_PART: gl.constexpr, DQ_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Warp-specialized W4A16 GEMM (see the block comment above): same arguments and contract as
        ``w4_gluon_kernel`` (dq2 dequantize only), plus ``W_STAGES`` (the W ring's depth) and ``DQ_REGS`` (registers
        of the dequantize warpgroup); launch with ``maxnreg`` so that all warps fit the register file."""
        dtype: gl.constexpr = x_desc.dtype
        KW: gl.constexpr = BLOCK_K // 8
        off_m, off_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        n_k = K // BLOCK_K

        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
        x_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        q_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N, KW], q_desc.layout)
        w_smem = gl.allocate_shared_memory(dtype, [W_STAGES, BLOCK_N, BLOCK_K], w_layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        w_empty = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
        for si in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(si), count=1)
            mbarrier.init(empty.index(si), count=2)  # the dequantize partition (words) + the MMA partition (x)
        for bi in gl.static_range(W_STAGES):
            mbarrier.init(w_ready.index(bi), count=1)
            mbarrier.init(w_empty.index(bi), count=1)
        fence_async_shared()

        if LOAD_PART:
            gl.warp_specialize([
                (_ws_mma_partition, (x_smem, w_smem, ready, empty, w_ready, w_empty, s_ptr, bias_ptr, y_ptr, M, N,
                                     stride_ym, off_m, off_n, n_k, NUM_STAGES, W_STAGES, PER_CHANNEL, HAS_BIAS,
                                     num_warps)),
                (_ws_dequant_partition, (x_desc, q_desc, x_smem, q_smem, w_smem, ready, empty, w_ready, w_empty,
                                         s_ptr, z_ptr, off_m, off_n, n_k, n_groups, NUM_STAGES, W_STAGES, GROUP_TILES,
                                         PER_CHANNEL, LOAD_PART, 4)),
                (_ws_load_partition, (x_desc, q_desc, x_smem, q_smem, ready, empty, off_m, off_n, n_k, NUM_STAGES)),
            ], [4, 1], [DQ_REGS, 24])
        else:  # 2 MMA warpgroups of 128 accumulator registers: 12 warps at most, so no separate load warp
            gl.warp_specialize([
                (_ws_mma_partition, (x_smem, w_smem, ready, empty, w_ready, w_empty, s_ptr, bias_ptr, y_ptr, M, N,
                                     stride_ym, off_m, off_n, n_k, NUM_STAGES, W_STAGES, PER_CHANNEL, HAS_BIAS,
                                     num_warps)),
                (_ws_dequant_partition, (x_desc, q_desc, x_smem, q_smem, w_smem, ready, empty, w_ready, w_empty,
                                         s_ptr, z_ptr, off_m, off_n, n_k, n_groups, NUM_STAGES, W_STAGES, GROUP_TILES,
                                         PER_CHANNEL, LOAD_PART, 4)),
            ], [4], [DQ_REGS])


# ====================================================================================================================
# Swapped-operand variant (``variant="swap"``, Machete-like): ``yᵀ[N, M] = W[N, K] xᵀ`` with W the wgmma A operand
# straight from registers, x the B operand from shared memory (``x_tile.permute((1, 0))``: K-major B).
#
# * TMA: the x tile ``[BLOCK_M, BLOCK_K]`` and the word tile ``[BLOCK_N, BLOCK_K/8]`` of K tile t land in stage
#   t % NUM_STAGES (x rows past M read as zeros), one expect-tx mbarrier a stage. Step i (``_swap_step``): issue MMA i,
#   ``warpgroup_mma_wait(1)`` (MMA i - 1 retired), fence + CTA barrier (every warp retired MMA i - 1 and read the
#   words of tiles <= i), refill the stage of tile i - 1 with tile i - 1 + NUM_STAGES, then wait for tile i + 1 and
#   dequantize it (``_swap_tile``) while MMA i runs. The last step's "tile i + 1" is clamped to the last tile (its
#   stage is never refilled, so the wait passes): one redundant dequantize instead of a branch.
# * Dequantize in registers into the wgmma A layout (``DotOperandLayout(0, acc, k_width=2)``): a thread of lane
#   4g + c holds, for its rows, the k pairs (2c, 2c + 1) and (2c + 8, 2c + 9) of every k16 block, i.e. byte c of each
#   int32 word of its rows. The words are read from shared memory in a layout where the 4 lanes of a row group read the
#   same words (a broadcast: ``_swap_word_layout``), viewed as ``[BLOCK_N/16, 2, 8, KW]`` = (row / 16, row bit 3,
#   row % 8, word) and broadcast along a 5th dim C of 4 (lanes c): ``_SW_*`` turns (word, c) into the bf16x2/f16x2
#   pair of nibbles 2c, 2c + 1 (``prmt`` byte c, ``* 0x1001`` puts the high nibble at bit 16, ``lop3`` the magic
#   exponent, ``sub`` magic + zero, ``mul`` the group scale when grouped: 4-5 instructions a word and thread).
#   ``join`` of the two halves and a reshape give ``[BLOCK_N, BLOCK_K]`` with k = 8 word + 2c + h, whose linear
#   layout equals the dot-operand layout up to a register order, so ``convert_layout(assert_trivial=True)`` moves
#   nothing: the W tile never goes back to shared memory.
# * ``warpgroup_mma(a_i, x_i.permute, acc, is_async=True)`` then ``warpgroup_mma_wait(1, deps=(acc, a_i))``: MMA i
#   stays in flight (its A registers kept alive) across the dequantize of tile i + 1. The K loop is unrolled by 2 with
#   two A variables (odd tail after it): with one loop-carried A, the copy at the loop latch redefines the registers of
#   the MMA in flight and ptxas serializes every wgmma (C7515, ``DEPBAR.LE gsb0, 0x0`` after each HGMMA).
# * Split-K (``SPLIT_K`` > 1): program (n tile, m tile, s) takes K tiles [s * K_TILES, (s + 1) * K_TILES); each writes
#   its fp32 (scaled) partial tile to its slot of ``ws``, then (CTA barrier, one acq_rel atomic a program) increments
#   the tile's arrival counter; the last arrival sums the slots in split order, resets the counter to 0, adds the
#   bias and stores y (the protocol of ``w4_batched``).
# * EC (``EC``): after the per-channel scale (and the split-K sum), the tile that stores adds ``B_tile vᵀ``, v being
#   ``g(u) ⊙ u`` of the EC prologue: one more wgmma, B's rows from registers, v's from shared memory (``_swap_ec``).
#   ``GDC``: launched dependent on the prologue (programmatic dependent launch), the K loop runs beside it and only
#   the storing tile waits for v (``griddepcontrol.wait``).
# * Epilogue: per-channel scale per accumulator row (weight row), bias per row, (``ACCUMULATE``: plus the C input y
#   holds, ``lowering.c_in``), cast, the yᵀ tile converted to a layout with 8 consecutive n a thread and stored
#   transposed into y ``[M, N]`` (rows past M masked).
# ====================================================================================================================
def _swap_asm(ty, magic, scaled):
    """PTX: word ``$2``, selector ``$3`` = c | 0x4440 (``prmt``: byte c of the word, zeros above), packed magic + zero
    ``$4`` (and packed scale ``$5``) -> the two 16-bit values ``$0`` (k = 2c) and ``$1`` (k = 2c + 1) of that byte."""
    lines = ["{", ".reg .b32 t, p, z;", "mov.b32 z, 0;", "prmt.b32 t, $2, z, $3;", "mul.lo.u32 t, t, 4097;",
             f"lop3.b32 p, t, 0x000f000f, {magic}, 0xea;", f"sub.{ty} p, p, $4;"]
    if scaled:
        lines.append(f"mul.{ty} p, p, $5;")
    return "\n".join(lines + ["mov.b32 {$0, $1}, p;", "}"])


if AVAILABLE:
    _SW_BF16 = gl.constexpr(_swap_asm(*_BF16X2, False))
    _SW_BF16_S = gl.constexpr(_swap_asm(*_BF16X2, True))
    _SW_F16 = gl.constexpr(_swap_asm(*_F16X2, False))
    _SW_F16_S = gl.constexpr(_swap_asm(*_F16X2, True))

    @gluon.constexpr_function
    def _log2(v):
        return v.bit_length() - 1

    @gluon.constexpr_function
    def _swap_word_layout(BLOCK_N, KW, num_warps):
        """The words ``[BLOCK_N, KW]`` as the dequantize needs them: lanes 4g + c read row g's words (c broadcast),
        row bit 3 and the words in registers, rows / 16 over the warps then registers (the dot operand's rows)."""
        regs = [[8, 0]] + [[0, 1 << b] for b in range(_log2(KW))]
        warps = []
        for b in range(_log2(BLOCK_N // 16)):
            (warps if len(warps) < _log2(num_warps) else regs).append([16 << b, 0])
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=warps, block_bases=[], shape=[BLOCK_N, KW])

    @gluon.jit
    def _swap_rows(off_n, L5: gl.constexpr, BLOCK_N: gl.constexpr):
        """Global weight-row index ``[BLOCK_N/16, 2, 8]`` (n = off_n + 16 r + 8 i + g) in the layout that expands to
        ``L5``'s ``[BLOCK_N/16, 2, 8, 1, 1]``."""
        L3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L5))
        r = gl.arange(0, BLOCK_N // 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        i = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        return off_n + gl.expand_dims(gl.expand_dims(r * 16, 1), 2) + gl.expand_dims(gl.expand_dims(i * 8, 0), 2) \
            + gl.expand_dims(gl.expand_dims(g, 0), 1)

    @gluon.jit
    def _x5(v):
        """``[R, 2, 8]`` row vector -> ``[R, 2, 8, 1, 1]``."""
        return gl.expand_dims(gl.expand_dims(v, 3), 4)

    @gluon.jit
    def _swap_dequant(words, sel, z2, s2, a_layout: gl.constexpr, L5: gl.constexpr, PER_CHANNEL: gl.constexpr,
                      IS_BF16: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """Words ``[BLOCK_N, KW]`` (``_swap_word_layout``) -> the dequantized ``[BLOCK_N, BLOCK_K]`` tile in the wgmma
        A-operand layout ``a_layout``; ``sel`` ``[1, 1, 1, 1, 4]`` the prmt selectors, ``z2`` / ``s2``
        ``[R, 2, 8, 1, 1]`` packed (magic + zero) / scale."""
        KW: gl.constexpr = BLOCK_K // 8
        w4 = gl.convert_layout(gl.reshape(words, [BLOCK_N // 16, 2, 8, KW]), gl.SliceLayout(4, L5),
                               assert_trivial=True)
        w5 = gl.expand_dims(w4, 4)
        if IS_BF16:
            if PER_CHANNEL:
                lo, hi = gl.inline_asm_elementwise(_SW_BF16, "=h,=h,r,r,r", [w5, sel, z2],
                                                   dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
            else:
                lo, hi = gl.inline_asm_elementwise(_SW_BF16_S, "=h,=h,r,r,r,r", [w5, sel, z2, s2],
                                                   dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        else:
            if PER_CHANNEL:
                lo, hi = gl.inline_asm_elementwise(_SW_F16, "=h,=h,r,r,r", [w5, sel, z2],
                                                   dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
            else:
                lo, hi = gl.inline_asm_elementwise(_SW_F16_S, "=h,=h,r,r,r,r", [w5, sel, z2, s2],
                                                   dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        # [R, 2, 8, KW, 4, 2] -> [BLOCK_N, BLOCK_K]: n = 16 r + 8 i + g, k = 8 word + 2 c + h
        w = gl.reshape(gl.join(lo, hi), [BLOCK_N, BLOCK_K])
        return gl.convert_layout(w, a_layout, assert_trivial=True)

    @gluon.jit
    def _swap_store(acc, bias_ptr, y_ptr, M, stride_ym, off_m, off_n, HAS_BIAS: gl.constexpr,
                    ACCUMULATE: gl.constexpr, num_warps: gl.constexpr):
        """The yᵀ tile ``acc [BLOCK_N, BLOCK_M]`` (+ bias per row) (+ the C input y holds, ``ACCUMULATE``), cast,
        stored transposed into y (rows < M)."""
        BLOCK_N: gl.constexpr = acc.type.shape[0]
        BLOCK_M: gl.constexpr = acc.type.shape[1]
        if HAS_BIAS:
            rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc.type.layout))
            acc = acc + gl.expand_dims(gl.load(bias_ptr + rows).to(gl.float32), 1)
        OL: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])  # 8 consecutive n a thread
        n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OL))
        m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OL))
        ptrs = y_ptr + gl.expand_dims(m, 0) * stride_ym + gl.expand_dims(n, 1)
        mask = gl.expand_dims(m < M, 0) & gl.expand_dims(n >= 0, 1)
        if ACCUMULATE:  # C loaded coalesced (16-bit, as stored), moved into the accumulator's layout, added in fp32
            c = gl.load(ptrs, mask=mask, other=0.0)
            acc = acc + gl.convert_layout(c, acc.type.layout).to(gl.float32)
        out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), OL)
        gl.store(ptrs, out, mask=mask)

    @gluon.jit
    def _swap_ec(acc, v_ptr, eb_ptr, M, R, EC_LD, off_m, off_n, BLOCK_R: gl.constexpr, GDC: gl.constexpr,
                 num_warps: gl.constexpr):
        """``acc += B_tile v_tileᵀ``: the EC term as one more wgmma after the K loop. ``v = g(u) ⊙ u`` ``[M, R]``
        (the EC prologue's, x's dtype) is the K-major B operand from shared memory, as x is in the loop; the tile's
        B rows ``[BLOCK_N, R]`` (row stride ``EC_LD``) the A operand from registers, as W is. R is padded with zeros
        to ``BLOCK_R`` (a multiple of the wgmma's K of 16). ``GDC``: launched dependent on the prologue (programmatic
        dependent launch): the K loop ran beside it; wait for its v here."""
        if GDC:
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)
        BLOCK_N: gl.constexpr = acc.type.shape[0]
        BLOCK_M: gl.constexpr = acc.type.shape[1]
        dtype: gl.constexpr = v_ptr.dtype.element_ty
        LB: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte rows of 8 values
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, LB))
        n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LB))
        m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LB))
        r_ok = gl.expand_dims(r < R, 0)
        # v first, through registers into shared memory, then B's rows: only one of them held beside the accumulator
        v = gl.load(v_ptr + gl.expand_dims(m, 1) * R + gl.expand_dims(r, 0), mask=gl.expand_dims(m < M, 1) & r_ok,
                    other=0.0)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_R],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_R], dtype), v)
        fence_async_shared()
        gl.thread_barrier()  # every warp's part of v is in shared memory before either warpgroup's wgmma reads it
        bt = gl.load(eb_ptr + gl.expand_dims(n, 1) * EC_LD + gl.expand_dims(r, 0), mask=r_ok, other=0.0)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        acc = warpgroup_mma(gl.convert_layout(bt, a_layout), v_smem.permute((1, 0)), acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    @gluon.jit
    def _swap_tile(q_smem, bars, zg, sg, z2pc, sel, t, n_k, a_layout: gl.constexpr,
                   LWD: gl.constexpr, L5: gl.constexpr, NUM_STAGES: gl.constexpr, GROUP_TILES: gl.constexpr,
                   PER_CHANNEL: gl.constexpr, IS_BF16: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """Local K tile ``t`` (clamped to the last one, whose stage is never refilled: a redundant dequantize at the
        end instead of a branch) waited for, its words read and dequantized into the A-operand layout; grouped:
        ``zg`` / ``sg`` its group's zero points / scales (fp32 ``[R, 2, 8]``, loaded a step ahead)."""
        t = gl.minimum(t, n_k - 1)
        s = t % NUM_STAGES
        mbarrier.wait(bars.index(s), (t // NUM_STAGES) & 1)
        words = q_smem.index(s).load(LWD)
        if PER_CHANNEL:
            a = _swap_dequant(words, sel, z2pc, z2pc, a_layout, L5, PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
        else:
            dtype: gl.constexpr = gl.bfloat16 if IS_BF16 else gl.float16
            MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
            a = _swap_dequant(words, sel, _x5(_pack2(zg + MAGIC, dtype)), _x5(_pack2(sg, dtype)), a_layout, L5,
                              PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
        return a

    @gluon.jit
    def _swap_step(acc, a, zg, sg, x_desc, q_desc, x_smem, q_smem, bars, z_ptr, s_ptr, rows3, z2pc, sel, off_m, off_n,
                   t0, i, n_k, n_groups, a_layout: gl.constexpr, LWD: gl.constexpr, L5: gl.constexpr,
                   NUM_STAGES: gl.constexpr, GROUP_TILES: gl.constexpr, PER_CHANNEL: gl.constexpr,
                   IS_BF16: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """MMA i (A = ``a``, tile i dequantized), retire MMA i - 1, refill its stage with tile i - 1 + NUM_STAGES,
        dequantize tile i + 1 (overlapping MMA i) with ``zg`` / ``sg`` (grouped: its zero points / scales); returns
        (acc, A of tile i + 1, zero points and scales of tile i + 2, loaded here)."""
        if PER_CHANNEL:
            zn = zg
            sn = sg
        else:  # tile i + 2's group rows: in flight across this step (L2 latency off the dequantize's path)
            zn, sn = _zero_scale(z_ptr, s_ptr, rows3, n_groups, (t0 + gl.minimum(i + 2, n_k - 1)) // GROUP_TILES)
        acc = warpgroup_mma(a, x_smem.index(i % NUM_STAGES).permute((1, 0)), acc, is_async=True)
        acc, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a))
        # every warp retired MMA i - 1 and read tile i's words: the stage of tile i - 1 is free
        fence_async_shared()
        gl.thread_barrier()
        t = i - 1 + NUM_STAGES
        st = t % NUM_STAGES
        _load_stage(x_desc, q_desc, bars.index(st), x_smem.index(st), q_smem.index(st), off_m, off_n, t0 + t,
                    (i >= 1) & (t < n_k))
        a_next = _swap_tile(q_smem, bars, zg, sg, z2pc, sel, i + 1, n_k, a_layout, LWD, L5, NUM_STAGES, GROUP_TILES,
                            PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
        return acc, a_next, zn, sn

    @gluon.jit
    def w4_gluon_swap_kernel(
        x_desc, q_desc, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, v_ptr, eb_ptr,
        M, N, K, n_groups, stride_ym, K_TILES, R, EC_LD,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
        SPLIT_K: gl.constexpr, GROUP_TILES: gl.constexpr, PER_CHANNEL: gl.constexpr, HAS_BIAS: gl.constexpr,
        ACCUMULATE: gl.constexpr, EC: gl.constexpr, BLOCK_R: gl.constexpr, GDC: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """``yᵀ`` tiles with W dequantized in registers as the wgmma A operand (see the block comment above). Grid
        (N / BLOCK_N, cdiv(M, BLOCK_M), SPLIT_K); ``K_TILES``: K tiles a split; ``ws`` fp32 slots
        ``[tiles, SPLIT_K, BLOCK_N, BLOCK_M]`` and ``cnt`` int32 arrival counters ``[tiles]`` (zero, left zero) are
        read only when ``SPLIT_K`` > 1. ``EC``: the tile that stores adds ``B v_ᵀ`` (``_swap_ec``; ``v`` ``[M, R]``,
        ``eb`` = B ``[N, R]`` with row stride ``EC_LD``)."""
        dtype: gl.constexpr = x_desc.dtype
        KW: gl.constexpr = BLOCK_K // 8
        IS_BF16: gl.constexpr = dtype == gl.bfloat16
        MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        off_n = pid_n * BLOCK_N
        off_m = pid_m * BLOCK_M
        if SPLIT_K > 1:
            t0 = gl.program_id(2) * K_TILES
            n_k = gl.maximum(gl.minimum(K // BLOCK_K - t0, K_TILES), 0)
        else:
            t0 = 0
            n_k = K // BLOCK_K

        # ---- layouts
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, min(BLOCK_M, 256), 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        LWD: gl.constexpr = _swap_word_layout(BLOCK_N, KW, num_warps)
        # [BLOCK_N / 16, 2, 8, KW, 4]: registers (row bit 3, words), lanes (c, then row % 8), warps (rows / 16)
        L5: gl.constexpr = gl.BlockedLayout([1, 2, 1, KW, 1], [1, 1, 8, 1, 4], [num_warps, 1, 1, 1, 1],
                                            [4, 1, 3, 2, 0])
        LC: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L5))))
        c4 = gl.arange(0, 4, layout=LC) | 0x4440
        sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(c4, 0), 0), 0), 0)

        x_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        q_smem = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N, KW], q_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for si in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(si), count=1)
        fence_async_shared()
        for si in gl.static_range(NUM_STAGES):
            _load_stage(x_desc, q_desc, bars.index(si), x_smem.index(si), q_smem.index(si), off_m, off_n, t0 + si,
                        si < n_k)

        rows3 = _swap_rows(off_n, L5, BLOCK_N)
        if PER_CHANNEL:
            z2 = _x5(_pack2(gl.load(z_ptr + rows3).to(gl.float32) + MAGIC, dtype))
            zg = rows3.to(gl.float32)  # unused
            sg = zg
            z0 = zg
            s0 = sg
        else:  # (zero, scale) rows of tile 0 now, of tile 1 for the first step
            z2 = rows3  # unused
            z0, s0 = _zero_scale(z_ptr, s_ptr, rows3, n_groups, t0 // GROUP_TILES)
            zg, sg = _zero_scale(z_ptr, s_ptr, rows3, n_groups, (t0 + gl.minimum(n_k - 1, 1)) // GROUP_TILES)
        a0 = _swap_tile(q_smem, bars, z0, s0, z2, sel, 0, n_k, a_layout, LWD, L5, NUM_STAGES, GROUP_TILES,
                        PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
        # two A register sets: MMA i reads set i % 2 while tile i + 1 is dequantized into the other one (unrolled by
        # 2 so that no register copy redefines the operand of an MMA in flight); n_k >= 1 (host)
        for j in range(n_k // 2):
            acc, a1, zg, sg = _swap_step(acc, a0, zg, sg, x_desc, q_desc, x_smem, q_smem, bars, z_ptr, s_ptr, rows3, z2,
                                         sel, off_m, off_n, t0, 2 * j, n_k, n_groups, a_layout, LWD, L5, NUM_STAGES,
                                         GROUP_TILES, PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
            acc, a0, zg, sg = _swap_step(acc, a1, zg, sg, x_desc, q_desc, x_smem, q_smem, bars, z_ptr, s_ptr, rows3, z2,
                                         sel, off_m, off_n, t0, 2 * j + 1, n_k, n_groups, a_layout, LWD, L5,
                                         NUM_STAGES, GROUP_TILES, PER_CHANNEL, IS_BF16, BLOCK_N, BLOCK_K)
        if n_k % 2 == 1:
            acc = warpgroup_mma(a0, x_smem.index((n_k - 1) % NUM_STAGES).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for si in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(si))

        if PER_CHANNEL:  # q - zero was exact; the scale per weight row
            rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
            acc = acc * gl.expand_dims(gl.load(s_ptr + rows).to(gl.float32), 1)
        if SPLIT_K > 1:
            tile = pid_m * gl.num_programs(0) + pid_n
            offs = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout)), 1) * BLOCK_M \
                + gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout)), 0)
            slots = ws_ptr + tile.to(gl.int64) * (SPLIT_K * BLOCK_N * BLOCK_M)
            gl.store(slots + gl.program_id(2) * (BLOCK_N * BLOCK_M) + offs, acc)
            gl.thread_barrier()  # every thread's slot stores precede the one (acq_rel) arrival below
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:  # the last split: sum the slots in split order (deterministic)
                tot = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
                for sk in range(SPLIT_K):  # a loop, not unrolled: one slot's registers at a time
                    tot += gl.load(slots + sk * (BLOCK_N * BLOCK_M) + offs, volatile=True)  # coherent (L2) reads
                gl.store(cnt_ptr + tile, 0)
                if EC:
                    tot = _swap_ec(tot, v_ptr, eb_ptr, M, R, EC_LD, off_m, off_n, BLOCK_R, GDC, num_warps)
                _swap_store(tot, bias_ptr, y_ptr, M, stride_ym, off_m, off_n, HAS_BIAS, ACCUMULATE, num_warps)
        else:
            if EC:
                acc = _swap_ec(acc, v_ptr, eb_ptr, M, R, EC_LD, off_m, off_n, BLOCK_R, GDC, num_warps)
            _swap_store(acc, bias_ptr, y_ptr, M, stride_ym, off_m, off_n, HAS_BIAS, ACCUMULATE, num_warps)
