"""Inductor post-grad passes, one per file on ``base.SpearGraphPass``: lower ``spear::qlinear`` (+ EC) to
``spear::fused_linear``, group sibling linears of one input into ``spear::grouped_linear``
(``grouped_linear_ec`` when all carry an EC), and decompose the plain ones at a static prefill M (without CUDA
graphs) into dequantize + ``aten.mm``. ``compile.pass_manager`` runs them in that order."""
from .base import SpearGraphPass  # noqa: F401
from .decompose_prefill_linears import DecomposePrefillLinearsPass  # noqa: F401
from .fuse_quantized_linear import FuseQuantizedLinearPass, check_operands, ec_patterns  # noqa: F401
from .group_sibling_linears import GroupSiblingLinearsPass  # noqa: F401
