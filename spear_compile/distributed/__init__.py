"""Tensor parallelism for quantized models with ECs (issue 19): ``parallelize(model, mesh)`` after
``quantize`` + ECs and before ``optimize``; sharded checkpoints; the row-parallel layers' all-reduces.
See ``docs/tensor_parallel.md``."""
from .checkpoint import load_sharded, save_sharded
from .layers import RowParallelCompensatedLinear, RowParallelLinear
from .parallelize import TPLayout, describe, parallelize, plan_layout, tp_state

__all__ = ["parallelize", "plan_layout", "tp_state", "describe", "TPLayout", "save_sharded", "load_sharded",
           "RowParallelLinear", "RowParallelCompensatedLinear"]
