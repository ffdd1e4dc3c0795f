"""Serving: a continuous-batching engine over a paged KV cache, per-phase compiled graphs, an async API.

    from spear_compile.serving import Engine, EngineConfig, SamplingParams
    engine = Engine.from_pretrained(path, quant="w4-pc-rtn", ec=None, config=EngineConfig(device="cuda"))
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""
from .config import EngineConfig
from .request import Request, RequestStatus, SamplingParams, TokenLogprobs

__all__ = ["Engine", "EngineConfig", "AsyncEngine", "RequestOutput", "Request", "RequestStatus", "SamplingParams",
           "TokenLogprobs"]


def __getattr__(name):  # the engine pulls in transformers and the compiler: imported on first use
    if name in ("Engine", "RequestOutput", "EngineStats", "StepRecord"):
        from . import engine
        return getattr(engine, name)
    if name == "AsyncEngine":
        from .async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)
