"""spear_compile: gated low-rank error compensators for low-bit LLMs, compiled into fused kernels.

    spear_compile.quantize(model, "w4-pc-rtn")            # weight-only quantization (RTN / GPTQ)
    model, manifest = spear_compile.calibrate(model, ...)  # diagnostic placement + EC training
    fast = spear_compile.optimize(model, quant=..., ec=DIR, mode="reduce-overhead")
    torch.compile(model, backend="spear")                  # the same compiler path
    spear_compile.inspect(model)                           # what the pass matched, which kernel
"""
from .quiet import install_import_filters

install_import_filters()  # before torchao is imported below: drops its optional-library load lines

from . import backend  # noqa: E402,F401  (registers the "spear" torch.compile backend)
from .calibrate import calibrate
from .config import QuantConfig
from .debug import debug
from .ec import CompensatedLinear
from .errors import SpearError
from .inspection import inspect
from .memory import model_bytes
from .optimize import optimize
from .qtensor import QuantizedWeight
from .quantize import quantize

try:  # registers the "spear" quantization method with transformers (save_pretrained / from_pretrained)
    from . import hf_quantizer  # noqa: F401
except ImportError:  # transformers is optional for the kernels and the compiler
    pass


__all__ = ["QuantConfig", "CompensatedLinear", "SpearError", "model_bytes", "QuantizedWeight", "quantize",
           "calibrate", "optimize", "inspect", "debug"]
