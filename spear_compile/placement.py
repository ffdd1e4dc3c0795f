"""Which modules get an EC, at which rank, so that EC bytes stay within a budget.

Modes: ``"diagnostic"`` (highest diagnostic score first), ``"random"`` (seeded shuffle),
both filled greedily at a fixed ``rank`` (a module that does not fit is skipped and the next
tried); ``"all"``: every module at the largest uniform rank that fits.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional, Tuple

from .ec import ec_shapes
from .errors import SpearError

MODES = ("diagnostic", "random", "all")


def ec_params(n: int, k: int, rank: int, gate: str) -> int:
    """Parameters of one EC (shapes from :func:`spear_compile.ec.ec_shapes`)."""
    return sum(math.prod(s) for s in ec_shapes(n, k, rank, gate).values())


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise SpearError(f"placement: budget must be a fraction in (0, 1) of the quantized model's bytes, got {budget!r}")
    return float(budget)


def place(shapes: Dict[str, Tuple[int, int]], budget_bytes: int, mode: str = "diagnostic",
          scores: Optional[Dict[str, float]] = None, rank: int = 8, gate: str = "sigmoid",
          bytes_per_param: int = 2, seed: int = 0, per_byte: bool = False) -> Dict[str, int]:
    """``{module name: rank}`` with total EC bytes ``<= budget_bytes``.

    ``per_byte``: in ``"diagnostic"`` mode rank modules by score per EC byte instead of score.
    ``shapes``: ``{name: (N, K)}`` of the candidate linears (in model order).
    """
    if mode not in MODES:
        raise SpearError(f"placement: unknown mode {mode!r}; supported: {MODES}")
    if not shapes:
        raise SpearError("placement: no candidate modules")
    if budget_bytes <= 0:
        raise SpearError(f"placement: budget of {budget_bytes} bytes leaves no room for an EC")
    cost = lambda name, r: ec_params(*shapes[name], r, gate) * bytes_per_param  # noqa: E731
    if mode == "all":
        r = 0
        while r < min(min(s) for s in shapes.values()) and sum(cost(n, r + 1) for n in shapes) <= budget_bytes:
            r += 1
        if r == 0:
            need = sum(cost(n, 1) for n in shapes)
            raise SpearError(f"placement 'all': rank 1 on all {len(shapes)} modules needs {need} bytes, budget is {budget_bytes}")
        return {n: r for n in shapes}
    for n, (nn_, k) in shapes.items():
        if rank < 1 or rank > min(nn_, k):
            raise SpearError(f"placement: rank={rank} must be in [1, min(N={nn_}, K={k})] for {n}")
    if mode == "diagnostic":
        if scores is None or set(scores) < set(shapes):
            missing = sorted(set(shapes) - set(scores or {}))[:3]
            raise SpearError(f"placement 'diagnostic' needs a score for every module; missing e.g. {missing}")
        order = sorted(shapes, key=lambda n: -scores[n] / (cost(n, rank) if per_byte else 1))
    else:
        order = list(shapes)
        random.Random(seed).shuffle(order)
    chosen, used = {}, 0
    for n in order:
        c = cost(n, rank)
        if used + c <= budget_bytes:
            chosen[n], used = rank, used + c
    if not chosen:
        raise SpearError(f"placement: budget of {budget_bytes} bytes fits no module at rank {rank}")
    return {n: chosen[n] for n in shapes if n in chosen}
