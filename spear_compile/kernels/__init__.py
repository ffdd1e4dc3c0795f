"""Triton kernels only (``@triton.jit``), one file per kernel family; host code lives in ``lowering``."""
