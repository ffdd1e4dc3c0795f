"""spear_compile: gated low-rank error compensators for low-bit LLMs, compiled into fused kernels.

    spear_compile.quantize(model, "w4-pc-rtn")            # weight-only quantization (RTN / GPTQ)
    model, manifest = spear_compile.calibrate(model, ...)  # diagnostic placement + EC training
    fast = spear_compile.optimize(model, quant=..., ec=DIR, mode="reduce-overhead")
    torch.compile(model, backend="spear")                  # the same compiler path
    spear_compile.inspect(model)                           # what the pass matched, which kernel

Packages: ``quant`` (weights), ``ec`` (compensators), ``compile`` (backend, passes), ``lowering`` (host-side
kernel choice and launch), ``kernels`` (Triton only); ``docs/architecture.md`` walks one call through them.
"""
import sys as _sys

from .compile import backend  # noqa: F401  (registers the "spear" torch.compile backend)
from .compile import unwrap as _unwrap
from .compile.api import optimize
from .compile.dumps import debug
from .compile.inspection import inspect
from .distributed import parallelize  # tensor parallelism
from .ec import io as _ec_io
from .ec.module import CompensatedLinear
from .ec.pipeline import calibrate
from .errors import SpearError
from .quant import io as _quant_io
from .quant.api import quantize
from .quant.config import QuantConfig
from .quant.memory import model_bytes
from .quant.weight import QuantizedWeight

# Module paths from before the package split, still importable (``spear_compile.ec_io`` is ``spear_compile.ec.io``):
for _old, _module in (("ec_io", _ec_io), ("serialization", _quant_io), ("unwrap", _unwrap)):
    _sys.modules[f"{__name__}.{_old}"] = _module
    globals()[_old] = _module
del _old, _module

__all__ = ["QuantConfig", "CompensatedLinear", "SpearError", "model_bytes", "QuantizedWeight", "quantize",
           "calibrate", "optimize", "inspect", "debug",
           "parallelize"]
