"""Inductor passes that lower ``spear::qlinear`` (+ EC) to ``spear::fused_linear`` and group sibling
linears of one input into ``spear::grouped_linear``, and decompose the plain ones at a static prefill M
(without CUDA graphs) into dequantize + ``aten.mm``."""
from .decompose_prefill_linears import DecomposePrefillLinearsPass  # noqa: F401
from .fuse_quantized_linear import FuseQuantizedLinearPass, check_operands, ec_patterns  # noqa: F401
from .group_sibling_linears import GroupSiblingLinearsPass  # noqa: F401
from ..pass_manager import SpearPassManager  # noqa: F401
from ..records import GROUPS, RECORDS, GroupRecord, MatchRecord, clear, groups, records  # noqa: F401
