"""Kernel configs the dispatch picks from, and the limits the kernels and their workspaces share.

A config is a frozen dataclass whose ``name`` is its identity (the tuner and its on-disk cache key configs by
name). ``DecodeConfig``: the split-K GEMVs (M <= 16) with the EC's synchronisation mode ``EcMode``;
``PrefillConfig``: the Triton W4 GEMM; ``DequantCublasConfig``: dequantize + cuBLAS with the EC's structure
``EcStructure``; ``GroupedConfig``: sibling linears of one x in one launch (or per member).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_DECODE_M = 16
MAX_EC_RANK = 256
MIN_BLOCK_N = 4
MAX_GROUP = 4  # members of one grouped launch (w4_gemv_grouped_kernel's pointer sets)
M_BUCKETS = (1, 4, 16, 64, 256, 1024)
XPASS_CONFIG = (64, 128, 2, 4, 2)  # ec_xpass_kernel: BLOCK_M (M >= 1024), BLOCK_K, stages, warps, programs per SM
COPY_X_MAX_BLOCK_R = 32  # the prologue copies x inside its projection loop only up to this BLOCK_R (``ec_prologue``)
SLOT_TILES = 32  # EC "slots": default cap on the u tiles (a finishing program loads tiles x r slot words; with up to
#                 32 of BLOCK_KU = 256 each, K <= 8192 takes one sub-block a tile; 64 slots raised registers 128 -> 255)
MAX_IN_PLACE_BLOCKS = 4  # ECs one ``ec_prologue_in_place`` takes (its kernels' A / gate pointer arguments)
MAX_IN_PLACE_SPLITS = 16  # its K splits: the gate launch reads every split's partial, unrolled


class EcMode(enum.IntEnum):
    """How a decode launch synchronises its EC (the kernels' ``EC_MODE``; ``DecodeConfig.ec`` names one).

    * ``spin`` one launch: u tiles, a spin on their counter, the last finisher resets the workspace;
    * ``epoch`` one launch: the last u tile publishes the gated u as epoch-tagged words (no counter to reset);
    * ``pdl`` / ``2k``: ``ec_u_kernel`` first, then the W kernel, under programmatic dependent launch (it streams
      its weights while u is computed and waits only in its epilogue) / in plain stream order;
    * ``slots`` one launch, M = 1 int32-word GEMV (FMA) only (elsewhere it runs as ``epoch``): each u tile stores
      its own tagged partial, the finishing programs sum the slots and gate (no atomics, no counter);
    * ``ecterm``: slots' u tiles, then one EC program per N tile publishing its term as tagged words, which the
      W finisher adds (any split).
    """
    SPIN = 0
    EPOCH = 1
    TWO_KERNELS = 2
    SLOTS = 3
    EC_TERM = 6

    @classmethod
    def of(cls, name: str) -> "EcMode":
        return _EC_MODE_NAMES[name]

    @staticmethod
    def names() -> tuple:
        return EC_MODES


_EC_MODE_NAMES = {"spin": EcMode.SPIN, "epoch": EcMode.EPOCH, "pdl": EcMode.TWO_KERNELS, "2k": EcMode.TWO_KERNELS,
                  "slots": EcMode.SLOTS, "ecterm": EcMode.EC_TERM}
EC_MODES = tuple(_EC_MODE_NAMES)


class Nibbles(enum.IntEnum):
    """How the M = 1 FMA GEMV turns packed nibbles into floats (the kernels' ``LEAN``)."""
    SUBTRACT = 0  # q - zero per nibble
    SHIFT_AND_OR = 1  # 128 + q by shift + and + or (no subtraction)
    LOP3 = 2  # 128 + q by a shift and one lop3 (inline asm; the interpreter runs SHIFT_AND_OR)
    PAIR = 3  # one shift per nibble pair + one lop3 each (256 + q even, 16 + q odd: 4 shifts a word)


_NIBBLE_SUFFIX = {0: "", 1: ",lean", 2: ",lop3", 3: ",pair"}


def _load_suffix(cfg) -> str:
    return ((f",st={cfg.stages}" if cfg.stages else "") + _NIBBLE_SUFFIX[int(cfg.lean)]
            + (",rt" if cfg.rt else "") + (",xw" if cfg.xw else "") + (",tma" if cfg.tma else "")
            + (f",r{cfg.maxnreg}" if cfg.maxnreg else ""))


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    kernel: str = "gemv"  # "gemv" (w4_gemv, int32 words) or "v3" (w4_decode, bytes)
    tc: bool = False  # gemv: tensor cores on bf16 (OFFSET + q) straight from the bits (M <= 16)
    dynamic_ids: bool = False  # EC "spin": tile ids from an atomic counter instead of the program id
    seg: bool = False  # gemv M = 1, grouped scales: K blocks of several whole groups (3-D word tiles)
    ec: str = "spin"  # the EC's synchronisation, a name of ``EcMode`` (EC_MODES)
    ec_b: str = "auto"  # modes epoch/pdl/2k: the tile's B rows at program start ("early"), in the finishing
    #                     program ("late"), or "auto" (early when split_k == 1, where every program finishes)
    stages: int = 0  # gemv M = 1 FMA: K loop pipelined by Triton this deep (words by cp.async); 0 = register prefetch
    lean: int = 0  # gemv M = 1 FMA: the nibble scheme, a ``Nibbles`` value
    rt: bool = False  # gemv M = 1 seg: rows-inner word tile [groups, words, rows] (_w_tile_seg_t: x unpacked per 4 rows)
    xw: bool = False  # gemv M = 1 FMA with stages: x read as int32 pairs (cp.async-pipelined, no per-plane shuffle)
    tma: bool = False  # gemv M = 1 FMA with stages, not seg: word tiles by TMA (device-made descriptor) not cp.async
    maxnreg: int = 0  # register cap per thread for ptxas (0: none)
    u_tiles: int = 0  # EC "slots": the most u tiles (each covers cdiv(K, u_tiles) rounded up to BLOCK_KU); 0 = SLOT_TILES

    @property
    def name(self):
        v = ("" if self.kernel == "gemv" else f",{self.kernel}") + (",tc" if self.tc else "") + \
            (",dyn" if self.dynamic_ids else "") + (",seg" if self.seg else "") + \
            ("" if self.ec == "spin" else f",ec={self.ec}") + ("" if self.ec_b == "auto" else f",b={self.ec_b}") + \
            (f",ut={self.u_tiles}" if self.u_tiles else "") + _load_suffix(self)
        return f"decode[BN={self.block_n},BK={self.block_k},splitK={self.split_k},warps={self.num_warps}{v}]"


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # yᵀ = W xᵀ: the dequantized W tile is the tensor-core A operand

    @property
    def name(self):
        return (f"prefill[BM={self.block_m},BN={self.block_n},BK={self.block_k},"
                f"warps={self.num_warps},stages={self.num_stages}{',swap' if self.swap else ''}]")


class EcStructure(str, enum.Enum):
    """How the EC joins a dequantize + cuBLAS linear (``DequantCublasConfig.ec``)."""
    AFTER = "after"  # y = x Wᵀ (+ bias), then y += v Bᵀ (re-reads and re-writes y)
    C_IN = "c_in"  # y = v Bᵀ (+ bias) first, then y += x Wᵀ: the EC term is the GEMM's C input (beta = 1)
    KCAT = "kcat"  # one GEMM [x | v] [W | B]ᵀ over K + r (r rounded up to ``pad``, default 8)
    FOLD = "fold"  # static EC only (no gate, u not given): W + B A dequantized, one plain GEMM (else kcat)


EC_STRUCTURES = tuple(s.value for s in EcStructure)


@dataclass(frozen=True)
class DequantCublasConfig:
    """Dequantize W (``w4_dequant_words_kernel``) then cuBLAS; ``ec`` is how the EC joins (``EcStructure``;
    ignored without one). ``v = g(u) ⊙ u`` comes from ``ec_prologue_kernel`` (one pass over x, or the given u).
    ``overlap``: the prologue runs on a side stream, concurrently with the dequantize (two memory-bound launches
    share the machine instead of queueing, tails included); CUDA only, fork and join inside the call (CUDA-graph
    capture makes them branches). ``split``: the prologue as a split-K pass over x with many programs plus a gate
    launch (``ec_prologue``)."""
    ec: str = "after"
    pad: int = 0
    overlap: bool = False
    split: bool = False

    @property
    def name(self):
        if self.ec == "after" and not self.pad and not self.overlap and not self.split:
            return "dequant+cublas"
        return (f"dequant+cublas[ec={self.ec}{f',pad={self.pad}' if self.pad else ''}"
                f"{',overlap' if self.overlap else ''}{',split' if self.split else ''}]")


@dataclass(frozen=True)
class GluonW4Config:
    """The Gluon Hopper W4 GEMM (``gluon_w4``, large M): one ``block_m x block_n`` tile a CTA; ``block_k`` divides
    the scale group; ``num_stages``: depth of the x / weight-word TMA ring; ``variant``: ``dq2`` (packed 16-bit
    dequantize, inline PTX), ``f32`` (fp32 dequantize, then cast), ``ws`` (the warp-specialized kernel, dq2 math) or
    ``swap`` (yᵀ tiles, W dequantized in registers as the wgmma A operand: ``block_n`` weight rows x ``block_m``
    tokens); ``split_k``: K splits of the swap kernel (1 elsewhere; named only when > 1)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    variant: str = "dq2"
    split_k: int = 1

    @property
    def name(self):
        return (f"gluon[BM={self.block_m},BN={self.block_n},BK={self.block_k},warps={self.num_warps},"
                f"stages={self.num_stages}{f',splitK={self.split_k}' if self.split_k != 1 else ''},{self.variant}]")


@dataclass(frozen=True)
class CInConfig:
    """An EC linear as the C input of an EC-free W4 kernel (``lowering.c_in``; ``EcStructure.C_IN`` generalised):
    ``v = g(u) ⊙ u`` (``ec_prologue``, ``split`` as ``DequantCublasConfig.split``), ``y = v Bᵀ (+ bias)`` by
    cuBLAS, then ``base`` adds ``x Wᵀ`` into y in its epilogue, rounding once. ``base``: the batched kernel, the
    Gluon swap kernel or dequantize + cuBLAS (``c_in.accumulates``), whichever of them won the EC-free key."""
    base: object
    split: bool = False

    @property
    def name(self):
        return f"c_in[{self.base.name}{',split' if self.split else ''}]"


@dataclass(frozen=True)
class GroupedConfig:
    """One launch of ``w4_gemv_grouped_kernel`` for every member, or (``per_member``) one launch per
    member with its own tuned config, into column slices of the grouped output, or (``concat``) the members'
    adjacent weights (``compile.siblings.pack_siblings``) as one linear of ``N_1 + ... + N_g`` outputs, run by the
    single-linear dispatch with its own tuned config."""
    block_n: int = 0
    block_k: int = 0
    split_k: int = 1
    num_warps: int = 4
    tc: bool = False
    per_member: bool = False
    concat: bool = False  # members whose weights are adjacent row blocks of one buffer: one GEMM over all of them
    seg: bool = False  # as DecodeConfig.seg
    stages: int = 0  # as DecodeConfig.stages
    lean: int = 0  # as DecodeConfig.lean
    rt: bool = False  # as DecodeConfig.rt
    xw: bool = False  # as DecodeConfig.xw
    tma: bool = False  # as DecodeConfig.tma
    maxnreg: int = 0  # as DecodeConfig.maxnreg

    @property
    def name(self):
        if self.per_member:
            return "grouped[per-member launches]"
        if self.concat:
            return "grouped[one linear over adjacent members]"
        return (f"grouped[BN={self.block_n},BK={self.block_k},splitK={self.split_k},warps={self.num_warps}"
                f"{',tc' if self.tc else ''}{',seg' if self.seg else ''}{_load_suffix(self)}]")


def m_bucket(m: int) -> str:
    for hi in M_BUCKETS:
        if m <= hi:
            return str(hi)
    return f">{M_BUCKETS[-1]}"


def valid_block_k(bk: int, k: int, group_size: int) -> bool:
    return bk <= group_size and group_size % bk == 0 if group_size < k else True


# ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions that cost about 2 µs a call from Python; a
# batched W4 launch made eleven of them (a third of its host time before the kernel call): plain arithmetic here.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def block_r(r: int) -> int:
    """The kernels' rank block: a power of two >= 16 holding r."""
    return max(16, next_pow2(r))
