"""Which modules get an EC, at which rank, so that EC bytes stay within a budget.

Modes:

- ``"diagnostic"`` / ``"local"``: highest score first (the caller passes the model-level
  diagnostic score, or the module-local one). At a fixed ``rank`` the list is filled greedily
  (a module that does not fit is skipped and the next tried); with ``capture`` (per module, the
  share of its output error a rank-r EC cancels, :func:`spear_compile.ec.initialization.captured_fraction`)
  ranks are allocated instead: repeatedly take the (module, rank) step with the largest
  ``score · Δcapture / Δbytes`` that still fits, ranks from ``rank_choices`` up to ``rank``.
- ``"random"``: a seeded shuffle filled greedily at the fixed ``rank``.
- ``"all"``: every module at the largest uniform rank that fits.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional, Sequence, Tuple

from .module import ec_shapes
from ..errors import SpearError

MODES = ("diagnostic", "local", "random", "all")
RANK_CHOICES = (1, 2, 4, 8, 16, 32)


def ec_params(n: int, k: int, rank: int, gate: str) -> int:
    """Parameters of one EC (shapes from :func:`spear_compile.ec.module.ec_shapes`)."""
    return sum(math.prod(s) for s in ec_shapes(n, k, rank, gate).values())


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise SpearError(f"placement: budget must be a fraction in (0, 1) of the quantized model's bytes, "
                         f"got {budget!r}")
    return float(budget)


def _allocate(shapes, budget_bytes, scores, capture, cost, choices) -> Dict[str, int]:
    cur, used = {n: 0 for n in shapes}, 0
    while True:
        best = None
        for n in shapes:
            c0, g0 = cost(n, cur[n]), capture[n][cur[n]]
            for r in choices:
                if r <= cur[n] or r >= len(capture[n]):
                    continue
                dc = cost(n, r) - c0
                if used + dc > budget_bytes:
                    continue
                ratio = scores[n] * (float(capture[n][r]) - float(g0)) / dc
                if best is None or ratio > best[0]:
                    best = (ratio, n, r, dc)
        if best is None or best[0] <= 0:
            return {n: r for n, r in cur.items() if r}
        _, n, r, dc = best
        cur[n], used = r, used + dc


def place(shapes: Dict[str, Tuple[int, int]], budget_bytes: int, mode: str = "diagnostic",
          scores: Optional[Dict[str, float]] = None, rank: int = 8, gate: str = "sigmoid",
          bytes_per_param: int = 2, seed: int = 0, per_byte: bool = False,
          capture: Optional[Dict[str, Sequence[float]]] = None,
          rank_choices: Sequence[int] = RANK_CHOICES) -> Dict[str, int]:
    """``{module name: rank}`` with total EC bytes ``<= budget_bytes``.

    ``shapes``: ``{name: (N, K)}`` of the candidate linears (in model order). ``per_byte``: at a
    fixed rank, rank modules by score per EC byte instead of score. ``capture``: allocate ranks
    (``"diagnostic"``/``"local"`` only), ``rank`` is then the largest rank handed out.
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
            raise SpearError(f"placement 'all': rank 1 on all {len(shapes)} modules needs {need} bytes, "
                             f"budget is {budget_bytes}")
        return {n: r for n in shapes}
    for n, (nn_, k) in shapes.items():
        if rank < 1 or rank > min(nn_, k):
            raise SpearError(f"placement: rank={rank} must be in [1, min(N={nn_}, K={k})] for {n}")
    if mode in ("diagnostic", "local"):
        if scores is None or set(scores) < set(shapes):
            missing = sorted(set(shapes) - set(scores or {}))[:3]
            raise SpearError(f"placement {mode!r} needs a score for every module; missing e.g. {missing}")
        if capture is not None:
            if set(capture) < set(shapes):
                raise SpearError("placement: rank allocation needs the captured-error curve of every module")
            choices = sorted({r for r in rank_choices if 1 <= r <= rank} | {rank})
            chosen = _allocate(shapes, budget_bytes, scores, capture, cost, choices)
            if not chosen:
                raise SpearError(f"placement: budget of {budget_bytes} bytes fits no module at rank {min(choices)}")
            return {n: chosen[n] for n in shapes if n in chosen}
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
