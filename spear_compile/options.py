"""Every environment variable spear_compile reads, read here and nowhere else.

``current()`` parses the environment when it is called (never at import), so a malformed value raises a
``SpearError`` naming the variable and its expected form where the option is used, and a test's
``monkeypatch.setenv`` takes effect on the next call. Parsing is cached per distinct set of values.

========================== ======================================= ==========================================
variable                   meaning                                 default
========================== ======================================= ==========================================
``SPEAR_AUTOTUNE``         ``0``: never time kernel configs; the   ``1``
                           heuristic defaults are used
``SPEAR_TUNE_CACHE``       directory of the tuner's on-disk cache  ``$XDG_CACHE_HOME/spear_compile`` or
                           (and the serving engine's step-cost     ``~/.cache/spear_compile``
                           and mixed-step shape files); ``0`` or
                           empty: off
``SPEAR_TUNE_COMPILE_THREADS`` threads compiling a tuning's         ``min(16, CPUs)``
                           candidate kernels before they are timed
                           (``1``: serially, as each is timed)
``SPEAR_GROUP_LINEARS``    ``0``: no grouped launch of sibling     ``1``
                           linears (q|k|v, gate|up)
``SPEAR_PACK_SIBLINGS``    ``0``: siblings keep separate weight    ``1``
                           buffers (no one-GEMM group at M > 16)
``SPEAR_MERGE_SIBLING_ECS`` ``1``: EC'd siblings packed too, their  ``0``
                           ECs merged into one of rank g·r (one
                           launch at M = 1; slower at M >= 16 on
                           an H100 in session 35, before the
                           kernels read the views in place)
``SPEAR_BATCHED_KERNEL``   ``0``: the batched tensor-core kernel   ``1``
                           (M 2..512) is not a tuner candidate
``SPEAR_GLUON_KERNEL``     ``0``: the Gluon Hopper W4 GEMM (sm_90, ``1``
                           EC-free, M 65..1024) is not a candidate
``SPEAR_GLUON_SWAP``       ``0``: its swapped-operand variant      ``1``
                           (W as the register A operand, split-K;
                           EC-free, M 2..1024) is not a candidate
``SPEAR_DECOMPOSE_PREFILL`` ``0``: keep static-M prefill linears   ``1``
                           as our op (no dequantize + mm in graph)
``SPEAR_EC_MERGE``         ``0``: EC siblings keep a GEMM each     ``1``
``SPEAR_EC_PAD_X``         ``auto`` / ``0`` / ``1``: write         ``auto``
                           ``[x | 0]`` from x's producer when it
                           is pointwise / never / always
``SPEAR_XPASS_IN_PLACE``   the in-place EC x pass's launch         ``64,128,3,4,1``
                           geometry ``BLOCK_M,BLOCK_K,stages,
                           warps,programs_per_SM`` (a bench knob)
``TRITON_INTERPRET``       Triton's own: ``1`` runs kernels in     ``0``
                           its CPU interpreter (read, not set)
``WORLD_SIZE``,            torchrun's: set in each process it      unset (not under torchrun)
``LOCAL_RANK``             starts (tensor-parallel serving reads
                           them to pick its device, never sets)
========================== ======================================= ==========================================
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

from .errors import SpearError


class XPassConfig(NamedTuple):
    """Launch geometry of a split-K pass over x (``lowering.prefill``)."""
    block_m: int
    block_k: int
    stages: int
    warps: int
    programs_per_sm: int


XPASS_IN_PLACE_DEFAULT = XPassConfig(64, 128, 3, 4, 1)  # best total of bench/xpass_sweep.py (sessions 8, 9)

_VARIABLES = ("SPEAR_AUTOTUNE", "SPEAR_TUNE_CACHE", "SPEAR_TUNE_COMPILE_THREADS", "SPEAR_GROUP_LINEARS",
              "SPEAR_GROUP_EC_LINEARS", "SPEAR_PACK_SIBLINGS", "SPEAR_MERGE_SIBLING_ECS", "SPEAR_BATCHED_KERNEL",
              "SPEAR_GLUON_KERNEL", "SPEAR_GLUON_SWAP", "SPEAR_DECOMPOSE_PREFILL", "SPEAR_EC_MERGE", "SPEAR_EC_PAD_X",
              "SPEAR_XPASS_IN_PLACE", "TRITON_INTERPRET", "XDG_CACHE_HOME", "HOME")


@dataclass(frozen=True)
class Options:
    autotune: bool = True
    tune_cache_dir: Optional[str] = None  # None: the on-disk tuning cache is off
    tune_compile_threads: int = 1
    group_linears: bool = True
    group_ec_linears: bool = True  # siblings that all carry an EC grouped too (spear::grouped_linear_ec)
    pack_siblings: bool = True  # sibling weights as one buffer (compile.siblings): one GEMM a group at M > 16
    merge_sibling_ecs: bool = False  # EC'd siblings packed too, ECs merged (compile.siblings._pack_ecs)
    batched_kernel: bool = True
    gluon_kernel: bool = True
    gluon_swap: bool = True  # the tuned layer: 0.64-0.97x its time without it (packed_siblings_h100_s30.md)
    decompose_prefill: bool = True
    ec_merge: bool = True
    ec_pad_x: str = "auto"  # "auto" | "0" | "1"
    xpass_in_place: XPassConfig = XPASS_IN_PLACE_DEFAULT
    interpret: bool = False  # TRITON_INTERPRET=1


def _switch(name: str, value: Optional[str], default: bool) -> bool:
    if value is None or value == "":
        return default
    if value in ("0", "1"):
        return value == "1"
    raise SpearError(f"{name}={value!r}: expected 0 or 1")


def _xpass(value: Optional[str]) -> XPassConfig:
    if not value:
        return XPASS_IN_PLACE_DEFAULT
    try:
        fields = tuple(int(v) for v in value.split(","))
    except ValueError:
        fields = ()
    if len(fields) != 5 or min(fields) < 1:
        raise SpearError(f"SPEAR_XPASS_IN_PLACE={value!r}: expected five positive integers "
                         "BLOCK_M,BLOCK_K,stages,warps,programs_per_SM, e.g. 64,128,3,4,1")
    return XPassConfig(*fields)


def _count(name: str, value: Optional[str], lo: int) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise SpearError(f"{name}={value!r}: expected an integer >= {lo}")
    return n


def _tune_cache_dir(value: Optional[str], xdg: Optional[str]) -> Optional[str]:
    if value is not None:
        return None if value in ("", "0") else value
    return os.path.join(xdg or os.path.join(os.path.expanduser("~"), ".cache"), "spear_compile")


@functools.lru_cache(maxsize=16)
def _parse(values: tuple) -> Options:
    env = dict(zip(_VARIABLES, values))
    pad_x = env["SPEAR_EC_PAD_X"] or "auto"
    if pad_x not in ("auto", "0", "1"):
        raise SpearError(f"SPEAR_EC_PAD_X={pad_x!r}: expected auto, 0 or 1")
    return Options(
        autotune=_switch("SPEAR_AUTOTUNE", env["SPEAR_AUTOTUNE"], True),
        tune_cache_dir=_tune_cache_dir(env["SPEAR_TUNE_CACHE"], env["XDG_CACHE_HOME"]),
        tune_compile_threads=_count("SPEAR_TUNE_COMPILE_THREADS", env["SPEAR_TUNE_COMPILE_THREADS"], 1)
        or min(16, os.cpu_count() or 1),
        group_linears=_switch("SPEAR_GROUP_LINEARS", env["SPEAR_GROUP_LINEARS"], True),
        group_ec_linears=_switch("SPEAR_GROUP_EC_LINEARS", env["SPEAR_GROUP_EC_LINEARS"], True),
        pack_siblings=_switch("SPEAR_PACK_SIBLINGS", env["SPEAR_PACK_SIBLINGS"], True),
        merge_sibling_ecs=_switch("SPEAR_MERGE_SIBLING_ECS", env["SPEAR_MERGE_SIBLING_ECS"], False),
        batched_kernel=_switch("SPEAR_BATCHED_KERNEL", env["SPEAR_BATCHED_KERNEL"], True),
        gluon_kernel=_switch("SPEAR_GLUON_KERNEL", env["SPEAR_GLUON_KERNEL"], True),
        gluon_swap=_switch("SPEAR_GLUON_SWAP", env["SPEAR_GLUON_SWAP"], True),
        decompose_prefill=_switch("SPEAR_DECOMPOSE_PREFILL", env["SPEAR_DECOMPOSE_PREFILL"], True),
        ec_merge=_switch("SPEAR_EC_MERGE", env["SPEAR_EC_MERGE"], True),
        ec_pad_x=pad_x,
        xpass_in_place=_xpass(env["SPEAR_XPASS_IN_PLACE"]),
        interpret=env["TRITON_INTERPRET"] == "1",
    )


def current() -> Options:
    """The options the environment sets now (a ``SpearError`` names a malformed variable)."""
    return _parse(tuple(os.environ.get(name) for name in _VARIABLES))


def interpret() -> bool:
    """Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TorchrunLaunch(NamedTuple):
    world_size: Optional[int]   # None: not launched by torchrun
    local_rank: Optional[int]


def torchrun_launch() -> TorchrunLaunch:
    """torchrun's ``WORLD_SIZE`` / ``LOCAL_RANK`` of this process (parsed apart from ``current()``: a malformed
    value fails tensor-parallel serving only, naming the variable)."""
    return TorchrunLaunch(_count("WORLD_SIZE", os.environ.get("WORLD_SIZE"), 1),
                          _count("LOCAL_RANK", os.environ.get("LOCAL_RANK"), 0))
