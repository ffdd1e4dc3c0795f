"""Inductor passes that lower ``spear::qlinear`` (+ EC) to ``spear::fused_linear``."""
from .fuse_quantized_linear import FuseQuantizedLinearPass, check_operands, ec_patterns  # noqa: F401
from .pass_manager import SpearPassManager  # noqa: F401
from .registry import RECORDS, MatchRecord, clear, records  # noqa: F401
