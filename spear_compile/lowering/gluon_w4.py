"""Host side of the Gluon Hopper W4A16 GEMM (``kernels/w4_gluon.py``): candidates, applicability, launch (the config
is ``configs.GluonW4Config``).

Large M (the tuner offers it at 64 < M <= 1024, EC-free keys): one CTA per ``block_m x block_n`` output tile, x and
the int32 weight words by TMA, the dequantize of K tile i + 1 overlapping the asynchronous wgmma of tile i. Needs an
sm_90 GPU and the Gluon API of Triton 3.6 (``w4_gluon.AVAILABLE``); nothing here touches the GPU at import.

``variant="swap"`` (``SWAP_CONFIGS``; tuner candidates unless ``SPEAR_GLUON_SWAP=0``): yᵀ tiles of ``block_n`` weight
rows x ``block_m`` tokens with W dequantized in registers as the wgmma A operand, grid (N tiles, M tiles, split-K);
split-K partials go to fp32 slots of the per-stream workspace (``Workspace.for_batched``, shared with the batched
kernel: both leave its counters at 0).
"""
from __future__ import annotations

import functools
from typing import List

import torch

from ..errors import SpearError
from .configs import GluonW4Config, block_r
from .precompile import launcher

WHERE = "spear_compile.lowering.gluon_w4"
GROUP_M = 8
VARIANTS = ("dq2", "f32", "ws", "swap")  # dq2: packed bf16x2/f16x2 dequantize (inline PTX); f32: fp32 dequantize,
# then cast; ws: the warp-specialized kernel (``w4_gluon_ws_kernel``: load / dequantize / MMA partitions, dq2 math);
# swap: ``w4_gluon_swap_kernel`` (yᵀ tiles, W dequantized in registers as the wgmma A operand, optional split-K)
H100_SMS = 132


# (config, relative speed of a full wave): bigger accumulators amortize the dequantize over more MMA work
_TILES = (
    (GluonW4Config(128, 256, 64, 8, 4), 1.00),
    (GluonW4Config(128, 128, 64, 8, 3), 0.90),  # 110 KB of shared memory: two CTAs an SM
    (GluonW4Config(128, 128, 64, 8, 4), 0.90),
    (GluonW4Config(128, 128, 64, 4, 4), 0.85),
    (GluonW4Config(64, 128, 64, 4, 4), 0.70),
    (GluonW4Config(64, 64, 64, 4, 6), 0.50),
)


def _stage_bytes(cfg: GluonW4Config) -> int:
    """One stage of the TMA ring: a bf16/fp16 x tile and its int4 weight words."""
    return cfg.block_m * cfg.block_k * 2 + cfg.block_n * cfg.block_k // 2


def _acc_regs(cfg: GluonW4Config) -> int:
    """fp32 accumulator registers a thread of the MMA warps."""
    return cfg.block_m * cfg.block_n // (cfg.num_warps * 32)


def smem_bytes(cfg: GluonW4Config) -> int:
    """Shared memory of one CTA: the x + word TMA ring and the 3-deep dequantized W ring."""
    return cfg.num_stages * _stage_bytes(cfg) + 3 * cfg.block_n * cfg.block_k * 2 + 64


# warp-specialized tiles worth trying on an H100 (``variant="ws"``). Not offered to the tuner (``gluon_candidates``)
# until a GPU run has measured them: ``bench/gluon_w4.py`` checks and times them beside the tiles above.
WS_CONFIGS = (
    GluonW4Config(128, 128, 64, 4, 4, "ws"),  # 1 MMA warpgroup (128 accumulator registers) + dequantize wg + load warp
    GluonW4Config(128, 128, 64, 8, 4, "ws"),  # 2 MMA warpgroups (64 each) + dequantize wg + load warp: 16 warps
    GluonW4Config(128, 256, 64, 8, 4, "ws"),  # 2 MMA warpgroups (128 each) + dequantize wg issuing the TMA: 12 warps
    GluonW4Config(128, 256, 64, 8, 5, "ws"),
)
WS_W_STAGES = 3  # depth of the ws kernel's dequantized W ring
WS_DQ_REGS = 128  # registers of its dequantize warpgroup (setmaxnreg); the load warp gets 24
WS_MAX_SMEM = 227 * 1024  # sm_90's opt-in shared memory a block


def ws_layout(cfg: GluonW4Config):
    """(LOAD_PART, total warps, maxnreg) of the ws kernel at ``cfg``: a separate 1-warp load partition unless the
    MMA warps hold more than 64 accumulator registers each with 8 of them (then 8 + 4 + 1 warps would round up to 16,
    capping every thread at 128 registers, below the 2 x 64 x 256 wgmma's ~154; the dequantize warpgroup issues the
    TMA instead). Warps round up to whole warpgroups; maxnreg = the register file over the threads, a multiple of 8."""
    load_part = cfg.num_warps == 4 or _acc_regs(cfg) <= 64
    warps = -(-(cfg.num_warps + 4 + (1 if load_part else 0)) // 4) * 4
    return load_part, warps, min(255, 65536 // (warps * 32)) // 8 * 8


def smem_bytes_ws(cfg: GluonW4Config) -> int:
    """Shared memory of one ws CTA: the x + word TMA ring, the W ring and the 4 mbarrier rings."""
    return (cfg.num_stages * _stage_bytes(cfg) + WS_W_STAGES * cfg.block_n * cfg.block_k * 2
            + 16 * (cfg.num_stages + WS_W_STAGES))


# swapped-operand tiles (``variant="swap"``: ``block_n`` weight rows = the wgmma M, ``block_m`` tokens = the wgmma N,
# so at M <= block_m every weight is dequantized once). Timed in session 28 (per-channel, M = 128 / 256) and through
# the tuned dispatch in session 30 (M = 64-512: the layer 0.64-0.97x its time without them); SPEAR_GLUON_SWAP=0: off.
SWAP_CONFIGS = (
    GluonW4Config(128, 128, 64, 8, 4, "swap"),              # 2 warpgroups x 64 rows, 64 accumulator registers
    GluonW4Config(128, 128, 64, 8, 4, "swap", split_k=2),
    GluonW4Config(128, 128, 64, 4, 4, "swap", split_k=2),   # 1 warpgroup x 2 x 64 rows, 128 accumulator registers
    GluonW4Config(256, 128, 64, 8, 4, "swap"),              # M <= 256 in one tile: 128 accumulator registers
    GluonW4Config(256, 128, 64, 8, 4, "swap", split_k=2),
    GluonW4Config(256, 128, 64, 8, 4, "swap", split_k=4),
    GluonW4Config(256, 64, 64, 4, 3, "swap", split_k=2),   # 1 warpgroup; 3 stages (104 KB): 2 CTAs an SM
    GluonW4Config(256, 64, 64, 4, 3, "swap", split_k=4),
    GluonW4Config(64, 128, 64, 8, 6, "swap", split_k=4),    # small M: a 64-token tile, deep ring
    GluonW4Config(128, 128, 64, 8, 4, "swap", split_k=4),   # M <= 128 at N = 4096: 32 x 4 CTAs
    GluonW4Config(128, 128, 64, 8, 4, "swap", split_k=8),   # M <= 128 at N = 2048: 16 x 8 CTAs
    # 256 weight rows a CTA: half the x tile reads from L2 per weight (every N tile reads all of x), 240-254
    # registers without spills (offline sm_90)
    GluonW4Config(128, 256, 64, 8, 4, "swap"),
    GluonW4Config(128, 256, 64, 8, 4, "swap", split_k=2),
    # small M (batched decode): 16- and 32-token tiles, 77-89 registers and 33-37 KB (offline sm_90), so two or
    # three CTAs an SM keep enough weight words in flight for HBM
    GluonW4Config(16, 128, 64, 8, 6, "swap", split_k=4),
    GluonW4Config(32, 128, 64, 8, 4, "swap", split_k=4),
    GluonW4Config(32, 64, 64, 4, 6, "swap", split_k=4),
    GluonW4Config(16, 64, 64, 4, 6, "swap", split_k=8),     # small N (1B k, v: N = 512): 8 x 8 CTAs
)
SWAP_SPLITS = (1, 2, 4, 8)
SWAP_MAX_SMEM = 227 * 1024
SWAP_MAX_WS = 1 << 31  # fp32 elements of the split-K slots (int32 offsets inside a tile, int64 tile bases)


def smem_bytes_swap(cfg: GluonW4Config) -> int:
    """Shared memory of one swap CTA: the x + word TMA ring and its mbarriers; the epilogue's transposing
    ``convert_layout`` (a ``block_n x block_m`` 16-bit tile) reuses the ring's space once the loop is done."""
    return max(cfg.num_stages * _stage_bytes(cfg) + 8 * cfg.num_stages, cfg.block_n * cfg.block_m * 2) + 64


MAX_SWAP_EC_RANK = 128  # the swap kernel's EC epilogue (``_swap_ec``): B's rows in registers, v in shared memory


SWAP_EC_REGS = 160  # accumulator + B tile + v tile registers a thread up to which the EC epilogue did not spill


def swap_ec_fits(cfg: GluonW4Config, r: int) -> bool:
    """Whether ``cfg``'s swap kernel takes an EC of rank ``r`` in its epilogue without spilling: its fp32
    accumulator, the B tile and the v tile (16-bit pairs) a thread, against ``SWAP_EC_REGS`` (offline sm_90, Triton
    3.6, all 20 swap configs at r = 32 and 96: no spill at <= 160, spills at >= 168; ``bench/NOTES_kernels.md``,
    session 36)."""
    rb = block_r(r)   # the epilogue wgmma's K: the rank padded to a power of two >= 16
    ec_regs = (cfg.block_n + cfg.block_m) * rb // (64 * cfg.num_warps)
    return r <= MAX_SWAP_EC_RANK and _acc_regs(cfg) + ec_regs <= SWAP_EC_REGS


def swap_split(cfg: GluonW4Config, k: int):
    """(splits launched, K tiles a split): ``cfg.split_k`` capped so that every split gets at least one K tile (the
    kernel's pipeline needs one) and the counters see exactly the splits launched."""
    n_k = k // cfg.block_k
    per = -(-n_k // min(cfg.split_k, n_k))
    return -(-n_k // per), per


def swap_workspace(cfg: GluonW4Config, m: int, n: int, k: int):
    """(fp32 slot elements, int32 counters) the swap kernel needs at this shape (split-K only)."""
    split, _ = swap_split(cfg, k)
    tiles = -(-m // cfg.block_m) * (n // cfg.block_n)
    return tiles * split * cfg.block_n * cfg.block_m, tiles


def tiles_shape(cfg: GluonW4Config, k: int, n: int, group_size: int) -> bool:
    """Whether ``cfg``'s tile divides the shape: N by block_n, K by block_k, and a scale group (when not per-channel)
    by block_k (a K tile never spans two groups). Every variant's rule (``_check`` raises where it fails)."""
    return not (n % cfg.block_n or k % cfg.block_k or (group_size < k and group_size % cfg.block_k))


def gluon_candidates(m: int, k: int, n: int, group_size: int, sms: int = H100_SMS) -> List[GluonW4Config]:
    """Up to 4 configs worth timing at this shape on an H100: tiles that divide N, ranked by the expected rate
    of a full wave times the fraction of the last wave the grid fills (small grids favour small tiles; a CTA of
    at most 113 KB of shared memory shares its SM with a second one)."""
    scored = []
    for cfg, speed in _TILES:
        if not tiles_shape(cfg, k, n, group_size):
            continue
        slots = sms * (2 if smem_bytes(cfg) <= 113 * 1024 else 1)
        tiles = -(-m // cfg.block_m) * (n // cfg.block_n)
        fill = tiles / sms if tiles < sms else tiles / (-(-tiles // slots) * slots)
        scored.append((speed * fill, cfg))
    scored.sort(key=lambda t: -t[0])
    return [cfg for _, cfg in scored[:4]]


def swap_tile_fits(cfg: GluonW4Config, m: int) -> bool:
    """Whether ``cfg``'s token tile suits M: no larger than M rounded up to a power of two (at least 16), and at most
    2 token tiles (dequantize passes over the weights) at M <= 128, 4 above (where tiles under 128 tokens are out)."""
    cover = 1 << max(4, (m - 1).bit_length())
    passes = -(-m // cfg.block_m)
    return cfg.block_m <= cover and passes <= (2 if m <= 128 else 4) and (cfg.block_m >= 128 or m <= 128)


def swap_candidates(m: int, k: int, n: int, group_size: int, sms: int = H100_SMS) -> List[GluonW4Config]:
    """Up to 4 ``SWAP_CONFIGS`` worth timing at this shape (offered by ``dispatch`` unless ``SPEAR_GLUON_SWAP=0``):
    token tiles that suit M (``swap_tile_fits``), ranked by a cost fitted to session 28's H100 timings of every config
    on 28 per-channel shapes at M = 128 and 256 (``bench/results/gluon_w4_swap_h100_s28.md``; g128 and other M
    untimed): waves of one CTA an SM (these tiles take the register file) times each CTA's walk along K (BLOCK_N x
    K / splits; the token tile enters only through the CTA count), plus split-K's fp32 slots through L2 (M x N a
    split). A ranking, not a timing model: the measured best config was in this top 4 on 21 of the 28 shapes, and on
    the other 7 the top 4 held one within 2 % of it (the old ranking, by last-wave fill over the square root of the
    token tiles, missed the best by up to 1.71x)."""
    scored = []
    for cfg in SWAP_CONFIGS:
        if not (tiles_shape(cfg, k, n, group_size) and swap_tile_fits(cfg, m)):
            continue
        split, _ = swap_split(cfg, k)
        ctas = (n // cfg.block_n) * -(-m // cfg.block_m) * split
        waves = -(-ctas // sms)
        cost = waves * cfg.block_n * k / split + (64 * m * n / sms if split > 1 else 0.0)
        scored.append((cost, cfg))
    scored.sort(key=lambda t: t[0])
    return [cfg for _, cfg in scored[:4]]


def _available() -> bool:
    try:
        from ..kernels import w4_gluon
    except Exception:  # noqa: BLE001
        return False
    return bool(w4_gluon.AVAILABLE)


def supported(x2: torch.Tensor, qdata: torch.Tensor, group_size: int) -> bool:
    """Whether this path applies: CUDA sm_90, bf16/fp16 x ``[M, K]``, K and N multiples of 128, the group per-channel
    or a multiple of 64 dividing K, and Triton's Gluon (3.6 API) importable."""
    if not (isinstance(x2, torch.Tensor) and isinstance(qdata, torch.Tensor)):
        return False
    if not (x2.is_cuda and qdata.is_cuda) or x2.dim() != 2 or qdata.dim() != 2:
        return False
    if x2.dtype not in (torch.bfloat16, torch.float16) or qdata.dtype != torch.uint8:
        return False
    k, n = x2.shape[1], qdata.shape[0]
    if k % 128 or n % 128 or qdata.shape[1] * 2 != k:
        return False
    if group_size < k and (group_size % 64 or k % group_size):
        return False
    if torch.cuda.get_device_capability(x2.device) != (9, 0):
        return False
    return _available()


def _check_swap(cfg: GluonW4Config):
    """The swap kernel's config rules (shape-free): BK 64; block_n weight rows (64 a warpgroup, 4 warps: 64 or 128,
    8 warps: 128 or 256); block_m tokens (the wgmma N: 16, 32, 64, 128 or 256); at most 128 fp32 accumulator registers a
    thread; split-K 1/2/4/8; 3-6 stages (the stage of tile i - 1 is refilled during step i); the ring in shared
    memory."""
    if cfg.block_k != 64 or cfg.block_m not in (16, 32, 64, 128, 256) or cfg.num_warps not in (4, 8):
        raise SpearError(f"{WHERE}: unsupported swap config {cfg.name} (BK 64, BM 16/32/64/128/256 tokens, 4/8 warps)")
    if cfg.block_n not in ((64, 128) if cfg.num_warps == 4 else (128, 256)):
        raise SpearError(f"{WHERE}: {cfg.name}: the swap kernel's block_n (weight rows) must be 64/128 with 4 warps, "
                         f"128/256 with 8")
    acc_regs = _acc_regs(cfg)
    if acc_regs > 128:
        raise SpearError(f"{WHERE}: {cfg.name}: {acc_regs} fp32 accumulator registers a thread (at most 128)")
    if cfg.split_k not in SWAP_SPLITS:
        raise SpearError(f"{WHERE}: {cfg.name}: split_k must be one of {SWAP_SPLITS}, got {cfg.split_k}")
    if not 3 <= cfg.num_stages <= 6:
        raise SpearError(f"{WHERE}: {cfg.name}: the swap kernel takes 3-6 stages")
    if smem_bytes_swap(cfg) > SWAP_MAX_SMEM:
        raise SpearError(f"{WHERE}: {cfg.name} needs {smem_bytes_swap(cfg)} B of shared memory (at most "
                         f"{SWAP_MAX_SMEM})")


def _check(x2, qdata, scale, zero, bias, group_size, y, cfg):
    _check_shapes(cfg, x2.shape, x2.dtype, qdata.shape, qdata.dtype, scale.shape, scale.dtype, zero.shape, zero.dtype,
                  None if bias is None else (bias.shape, bias.is_floating_point()), y.shape, y.dtype, y.stride(1),
                  group_size)
    if not (x2.is_cuda and qdata.device == x2.device == scale.device == zero.device == y.device
            and (bias is None or bias.device == x2.device)):
        devs = {t.device for t in (x2, qdata, scale, zero, y) + ((bias,) if bias is not None else ())}
        raise SpearError(f"{WHERE}: every operand must be on one CUDA device, got {sorted(map(str, devs))}")


@functools.lru_cache(maxsize=4096)
def _check_shapes(cfg, x_shape, x_dtype, q_shape, q_dtype, s_shape, s_dtype, z_shape, z_dtype, bias, y_shape, y_dtype,
                  y_col_stride, group_size):
    """The config and the operands' shapes and dtypes (remembered: a call's shapes repeat every step)."""
    if cfg.variant not in VARIANTS:
        raise SpearError(f"{WHERE}: variant must be one of {VARIANTS}, got {cfg.variant!r}")
    if cfg.variant == "swap":
        _check_swap(cfg)
    else:
        if cfg.block_k != 64 or cfg.block_m not in (64, 128) or cfg.block_n not in (64, 128, 256) \
                or cfg.num_warps not in (4, 8) or not 2 <= cfg.num_stages <= 8:
            raise SpearError(f"{WHERE}: unsupported config {cfg.name} (BK 64, BM 64/128, BN 64/128/256, 4/8 warps)")
        if cfg.num_warps == 8 and cfg.block_n < 128:
            raise SpearError(f"{WHERE}: 8 warps need block_n >= 128, got {cfg.name}")
        if cfg.split_k != 1:
            raise SpearError(f"{WHERE}: {cfg.name}: split-K is the swap variant's only")
    if cfg.variant == "ws":
        acc_regs = _acc_regs(cfg)
        if acc_regs > 128:
            raise SpearError(f"{WHERE}: {cfg.name}: {acc_regs} fp32 accumulator registers a thread (at most 128; "
                             f"block_m x block_n = {cfg.block_m}x{cfg.block_n} needs 8 warps)")
        if cfg.num_stages > 6:
            raise SpearError(f"{WHERE}: {cfg.name}: the ws kernel takes 2-6 stages")
        if not ws_layout(cfg)[0] and cfg.num_stages < 3:  # the dequantize warps load tile i + stages - 2 after tile i
            raise SpearError(f"{WHERE}: {cfg.name}: without a load warp (8 warps, 128 x 256) the ws kernel needs "
                             f"3-6 stages")
        if smem_bytes_ws(cfg) > WS_MAX_SMEM:
            raise SpearError(f"{WHERE}: {cfg.name} needs {smem_bytes_ws(cfg)} B of shared memory (at most "
                             f"{WS_MAX_SMEM})")
    if len(x_shape) != 2 or x_dtype not in (torch.bfloat16, torch.float16):
        raise SpearError(f"{WHERE}: x must be bf16/fp16 [M, K], got {x_dtype} {tuple(x_shape)}")
    m, k = x_shape
    if q_dtype != torch.uint8 or len(q_shape) != 2 or q_shape[1] * 2 != k:
        raise SpearError(f"{WHERE}: qdata must be uint8 [N, K/2] = [N, {k // 2}], got {q_dtype} {tuple(q_shape)}")
    n = q_shape[0]
    if k % cfg.block_k or n % cfg.block_n:
        raise SpearError(f"{WHERE}: K={k} must be a multiple of block_k={cfg.block_k} and N={n} of "
                         f"block_n={cfg.block_n}")
    if cfg.variant == "swap" and swap_workspace(cfg, m, n, k)[0] > SWAP_MAX_WS:
        raise SpearError(f"{WHERE}: {cfg.name}: the split-K slots at M={m}, N={n} exceed {SWAP_MAX_WS} fp32")
    if not 0 < group_size <= k or k % group_size or (group_size < k and group_size % cfg.block_k):
        raise SpearError(f"{WHERE}: group_size={group_size} must divide K={k} and be K or a multiple of "
                         f"block_k={cfg.block_k}")
    groups = k // group_size
    for name, shape, dtype in (("scale", s_shape, s_dtype), ("zero", z_shape, z_dtype)):
        if tuple(shape) != (n, groups) or dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise SpearError(f"{WHERE}: {name} must be float [N, K/group] = [{n}, {groups}], got {dtype} "
                             f"{tuple(shape)}")
    if bias is not None and (tuple(bias[0]) != (n,) or not bias[1]):
        raise SpearError(f"{WHERE}: bias must be float [N] = [{n}], got shape {tuple(bias[0])}")
    if tuple(y_shape) != (m, n) or y_dtype != x_dtype or y_col_stride != 1:
        raise SpearError(f"{WHERE}: y must be {x_dtype} [M, N] = [{m}, {n}] with unit column stride, got "
                         f"{y_dtype} {tuple(y_shape)} column stride {y_col_stride}")


@functools.lru_cache(maxsize=64)
def _smem_layout(rows: int, cols: int, dtype):
    """The TMA tile's shared layout (built once per tile shape: a Gluon layout object is not cheap to make)."""
    from triton.experimental.gluon import language as gl
    return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)


def run_gluon_w4(x2, qdata, scale, zero, bias, group_size, y, cfg: GluonW4Config, accumulate: bool = False,
                 ec=None, gdc: bool = False):
    """``y = x2 @ ((q - zero) * scale)ᵀ (+ bias)`` with the Gluon kernel; returns ``y``. The swap variant also takes
    ``accumulate``: added to what ``y`` holds (its C input, ``lowering.c_in``), rounded once; ``ec = (v, B)``:
    ``+ v Bᵀ`` in its epilogue (``v = g(u) ⊙ u`` ``[M, r]`` in x's dtype, B ``[N, r]`` with unit column stride);
    ``gdc``: v's producer was just launched with ``gdc=True`` (``prefill.ec_prologue``): this launch depends on it
    programmatically (Hopper), its K loop running beside it."""
    if (accumulate or ec is not None) and cfg.variant != "swap":
        raise SpearError(f"{WHERE}: {cfg.name}: only the swap variant adds into y (accumulate) or takes an EC")
    if ec is not None:
        v, eb = ec
        r = eb.shape[1]
        if r > MAX_SWAP_EC_RANK or tuple(v.shape) != (x2.shape[0], r) or v.dtype != x2.dtype or v.stride(1) != 1 \
                or v.stride(0) != r or eb.shape[0] != qdata.shape[0] or eb.stride(1) != 1:
            raise SpearError(f"{WHERE}: {cfg.name}: the EC epilogue takes v [M, r] contiguous in x's dtype and B "
                             f"[N, r] (r <= {MAX_SWAP_EC_RANK}, unit column stride), got v {tuple(v.shape)} "
                             f"{v.dtype} and B {tuple(eb.shape)}")
    _check(x2, qdata, scale, zero, bias, group_size, y, cfg)
    return _launch(x2, qdata, scale, zero, bias, group_size, y, cfg, accumulate, ec, gdc)


def _launch(x2, qdata, scale, zero, bias, group_size, y, cfg, accumulate=False, ec=None, gdc=False):
    """``run_gluon_w4`` after its checks (``run_single`` checks once, before its EC prologue)."""
    if not _available():
        raise SpearError(f"{WHERE}: Triton's Gluon Hopper API (3.6) is not available in this Triton")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ..kernels.w4_gluon import w4_gluon_kernel, w4_gluon_swap_kernel, w4_gluon_ws_kernel

    m, k = x2.shape
    n = qdata.shape[0]
    if m == 0:
        return y
    # TMA: 16-byte aligned base and row pitch, unit column stride
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous() if x2.stride(1) != 1 else x2.clone()
    q32 = qdata if qdata.is_contiguous() else qdata.contiguous()
    if q32.data_ptr() % 16:
        q32 = q32.clone()
    q32 = q32.view(torch.int32)  # [N, K/8]: nibble i of word j is k = 8j + i (little endian)
    scale = scale.contiguous()
    zero = zero.contiguous()
    gdt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    x_desc = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [bm, bk], _smem_layout(bm, bk, gdt))
    q_desc = TensorDescriptor(q32, [n, k // 8], [k // 8, 1], [bn, bk // 8], _smem_layout(bn, bk // 8, gl.int32))
    per_channel = group_size >= k
    if cfg.variant == "swap":
        split, k_tiles = swap_split(cfg, k)
        if split > 1:
            from .runtime import WORKSPACES
            n_ws, n_cnt = swap_workspace(cfg, m, n, k)
            # the batched kernel's slots / counters (same stream, same protocol: counters left at zero)
            ws, _, cnt = WORKSPACES.get(x2.device).for_batched(n_ws, 1, n_cnt)
        else:
            ws, cnt = y, y  # never touched without split-K
        v, eb = ec if ec is not None else (scale, scale)   # (never read without an EC)
        r = eb.shape[1] if ec is not None else 0
        pdl = gdc and ec is not None
        launcher(w4_gluon_swap_kernel, (n // bn, -(-m // bm), split))(
            x_desc, q_desc, scale, zero, bias if bias is not None else scale, y, ws, cnt, v, eb,
            m, n, k, k // group_size, y.stride(0), k_tiles, r, eb.stride(0) if ec is not None else 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=cfg.num_stages, SPLIT_K=split,
            GROUP_TILES=1 if per_channel else group_size // bk, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
            ACCUMULATE=accumulate, EC=ec is not None, BLOCK_R=block_r(r),
            GDC=pdl, num_warps=cfg.num_warps, **({"launch_pdl": True} if pdl else {}),
        )
        return y
    grid = (-(-m // bm) * (n // bn),)
    if cfg.variant == "ws":
        load_part, _, maxnreg = ws_layout(cfg)
        launcher(w4_gluon_ws_kernel, grid)(
            x_desc, q_desc, scale, zero, bias if bias is not None else scale, y,
            m, n, k, k // group_size, y.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=cfg.num_stages, W_STAGES=WS_W_STAGES, GROUP_M=GROUP_M,
            GROUP_TILES=1 if per_channel else group_size // bk, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
            LOAD_PART=load_part, DQ_REGS=WS_DQ_REGS, num_warps=cfg.num_warps, maxnreg=maxnreg,
        )
        return y
    launcher(w4_gluon_kernel, grid)(
        x_desc, q_desc, scale, zero, bias if bias is not None else scale, y,
        m, n, k, k // group_size, y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=cfg.num_stages, GROUP_M=GROUP_M,
        GROUP_TILES=1 if per_channel else group_size // bk, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        DQ2=cfg.variant == "dq2", num_warps=cfg.num_warps,
    )
    return y


def run_single(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """``dispatch``'s runner signature. An EC (the swap variant only, rank <= ``MAX_SWAP_EC_RANK``): ``v = g(u) ⊙ u``
    by the EC prologue (``u`` given: the tensor-parallel hook), then ``+ v Bᵀ`` in the swap kernel's epilogue."""
    if ec_B is None:
        return run_gluon_w4(x2, qdata, scale, zero, bias, group_size, y, cfg)
    if cfg.variant != "swap" or ec_B.shape[1] > MAX_SWAP_EC_RANK:
        raise SpearError(f"{WHERE}: {cfg.name} has no EC epilogue (the swap variant has one, rank <= "
                         f"{MAX_SWAP_EC_RANK}); an EC linear runs the Triton or cuBLAS paths")
    from .precompile import pdl_ok
    from .prefill import ec_prologue
    if ec_B.shape[0] != qdata.shape[0]:
        raise SpearError(f"{WHERE}: ec_B must be [N={qdata.shape[0]}, r], got {tuple(ec_B.shape)}")
    eb = ec_B if ec_B.stride(1) == 1 else ec_B.contiguous()
    _check(x2, qdata, scale, zero, bias, group_size, y, cfg)   # before the prologue: nothing launched on bad input
    gdc = pdl_ok(x2.device)   # the K loop beside the prologue, only the epilogue waiting for v
    v = ec_prologue(x2, ec_A, u, gate_w, gate_b, ec_B.shape[1], gdc=gdc)   # [M, r] contiguous, x's dtype
    return _launch(x2, qdata, scale, zero, bias, group_size, y, cfg, ec=(v, eb), gdc=gdc)
