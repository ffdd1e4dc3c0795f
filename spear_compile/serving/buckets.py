"""Graph buckets: the padded sizes the engine's compiled graphs and CUDA graphs run at. One home for the padding
rules, which the model runner pads each step by and the step cost model predicts with (pure Python: the scheduler
imports it without torch)."""
from __future__ import annotations

from ..errors import SpearError

MIN_DIM = 2  # every dynamic size is padded to at least this (no 0/1 specialization, no extra graphs)


def next_bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise SpearError(f"model runner: {n} exceeds the largest bucket {buckets[-1]}")


def pow2_buckets(lo: int, hi: int) -> tuple:
    """``lo``, ``2 lo``, ``4 lo``, ... below ``hi``, then ``hi``."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(max(hi, lo))
    return tuple(sorted(set(out)))


def pow2_bucket(n: int, lo: int, hi: int) -> int:
    """``next_bucket(n, pow2_buckets(lo, hi))`` for ``n <= max(hi, lo)``, without building the buckets (the step cost
    model pads with it several times a scheduling step)."""
    b = lo
    while b < n:
        b *= 2
    return b if b < hi else max(hi, lo)


def mixed_decode_rows(num_decodes: int, num_prefill_tokens: int, max_decode_rows: int, max_tokens: int) -> int:
    """Decode rows a mixed step runs: at least ``MIN_DIM`` (dummies), padded to a power of two up to
    ``max_decode_rows`` (fewer graph keys), unless the padded rows and the prefill tokens would overflow
    ``max_tokens`` (the largest token bucket)."""
    rows = max(num_decodes, MIN_DIM)
    padded = pow2_bucket(rows, MIN_DIM, max(MIN_DIM, max_decode_rows, rows))
    return padded if padded + num_prefill_tokens <= max_tokens else rows
