"""Quiet runs: the noise our dependencies print on every import or command, filtered narrowly.

``install_import_filters`` runs when ``spear_compile`` is imported, before torchao is: torchao logs a
"Failed to load ..._C*.so" line for each optional prebuilt kernel library built for another CUDA /
Python (we use none of them), and its Enum registrations make torch log a deprecation line. Only those
exact messages are dropped. ``quiet_warnings`` is for the CLI: Python warnings of the deprecation kind
and transformers' info/warning chatter are silenced while a command runs (errors still print).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is not ours to judge)
            return True
        return not any(f in text for f in self.fragments)


_FILTERS = {
    "torchao": _DropMessages("Failed to load /", "Failed to load "),
    "torch.utils._pytree": _DropMessages("is an Enum subclass and is now natively supported"),
}


def install_import_filters() -> None:
    """Idempotent: one filter per logger."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


def quiet_third_party() -> None:
    """For the CLI: transformers logs errors only (no per-command notices)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()


@contextmanager
def quiet_warnings():
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message=".*TRITON_INTERPRET.*")
        yield
