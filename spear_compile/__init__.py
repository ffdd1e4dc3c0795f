"""spear_compile: gated low-rank error compensators for low-bit LLMs, compiled into fused kernels.

    spear_compile.quantize(model, "w4-pc-rtn")            # weight-only quantization (RTN / GPTQ)
    model, manifest = spear_compile.calibrate(model, ...)  # diagnostic placement + EC training
    fast = spear_compile.optimize(model, quant=..., ec=DIR, mode="reduce-overhead")
    torch.compile(model, backend="spear")                  # the same compiler path
    spear_compile.inspect(model)                           # what the pass matched, which kernel

Packages: ``quant`` (weights), ``ec`` (compensators), ``compile`` (backend, passes), ``lowering`` (host-side
kernel choice and launch), ``kernels`` (Triton only), ``serving`` (engine and server), ``distributed`` (tensor
parallelism); ``docs/architecture.md`` walks one call through them.
"""
import sys as _sys

from .quiet import install_import_filters

install_import_filters()  # before torchao is imported below: drops its optional-library load lines

from .compile import backend  # noqa: E402,F401  (registers the "spear" torch.compile backend)
from .compile import unwrap as _unwrap  # noqa: E402
from .compile.api import optimize  # noqa: E402
from .compile.dumps import debug  # noqa: E402
from .compile.inspection import inspect  # noqa: E402
from .distributed import parallelize  # noqa: E402  (tensor parallelism)
from .ec import io as _ec_io  # noqa: E402
from .ec.module import CompensatedLinear  # noqa: E402
from .ec.pipeline import calibrate  # noqa: E402
from .errors import SpearError  # noqa: E402
from .quant import io as _quant_io  # noqa: E402
from .quant.api import quantize  # noqa: E402
from .quant.config import QuantConfig  # noqa: E402
from .quant.memory import model_bytes  # noqa: E402
from .quant.weight import QuantizedWeight  # noqa: E402

try:  # registers the "spear" quantization method with transformers (save_pretrained / from_pretrained)
    from .quant import hf_quantizer  # noqa: F401
except ImportError:  # transformers is optional for the kernels and the compiler
    pass

# Module paths from before the package split, still importable (``spear_compile.ec_io`` is ``spear_compile.ec.io``):
for _old, _module in (("ec_io", _ec_io), ("serialization", _quant_io), ("unwrap", _unwrap)):
    _sys.modules[f"{__name__}.{_old}"] = _module
    globals()[_old] = _module
del _old, _module

__all__ = ["QuantConfig", "CompensatedLinear", "SpearError", "model_bytes", "QuantizedWeight", "quantize",
           "calibrate", "optimize", "inspect", "debug",
           "parallelize"]
