"""spear_compile: gated low-rank error compensators for low-bit LLMs, compiled into fused kernels."""
from .config import QuantConfig
from .ec import CompensatedLinear
from .errors import SpearError
from .memory import model_bytes
from .qtensor import QuantizedWeight
from .quantize import quantize

__all__ = ["QuantConfig", "CompensatedLinear", "SpearError", "model_bytes", "QuantizedWeight", "quantize"]
