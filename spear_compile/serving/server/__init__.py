"""OpenAI-compatible HTTP server over an ``AsyncEngine`` (FastAPI + uvicorn): ``build_app``; ``spear-compile serve``
runs it (``spear_compile/serving/cli.py``)."""
from .app import build_app
from .chat import FALLBACK_CHAT_TEMPLATE

__all__ = ["build_app", "FALLBACK_CHAT_TEMPLATE"]
