"""Percentiles for the benches: one definition (linear interpolation between the closest ranks, numpy's default)."""
from __future__ import annotations

import math


def pct(xs, q):
    """The q-th percentile (0-100) of ``xs``, ignoring ``None``; ``None`` when nothing is left."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi or math.isinf(xs[hi]):
        return xs[hi]
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
