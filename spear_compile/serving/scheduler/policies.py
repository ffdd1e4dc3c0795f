"""The simple scheduling policies and the policy factory (``make_policy``)."""
from __future__ import annotations

from ...errors import SpearError
from .base import Policy, StepContext


class FifoNoChunk(Policy):
    """Whole prompts in arrival order, as many as fit the largest token bucket beside the decodes."""
    name = "fifo"
    chunked = False

    def prefill_budget(self, ctx: StepContext) -> int:
        return ctx.max_num_tokens - len(ctx.decodes)


class TokenBudget(Policy):
    """Sarathi-style chunked prefill: a step computes at most ``n`` tokens, decodes first."""
    chunked = True

    def __init__(self, n: int = 512):
        if not isinstance(n, int) or n < 1:
            raise SpearError(f"TokenBudget: n={n!r} must be an integer >= 1")
        self.n = n
        self.name = f"budget-{n}"

    def prefill_budget(self, ctx: StepContext) -> int:
        return max(0, min(self.n, ctx.max_num_tokens) - len(ctx.decodes))


SIMPLE_POLICIES = ("fifo", "budget-<n>")


def make_policy(name: str, **kwargs) -> Policy:
    """``"fifo"``, ``"budget-<n>"`` (e.g. ``"budget-512"``), or an SLO policy name (``"slo"``, ``"slo-ec-blind"``,
    built by ``scheduler/slo.py``'s ``make_slo_policy(name, **kwargs)``; kwargs such as ``cost_model``)."""
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str):
        raise SpearError(f"make_policy: policy must be a name or a Policy, got {type(name).__name__}")
    if name == "fifo":
        return FifoNoChunk()
    if name.startswith("budget-"):
        try:
            n = int(name.split("-", 1)[1])
        except ValueError:
            n = -1
        if n < 1:
            raise SpearError(f"make_policy: {name!r} needs a positive token count, e.g. 'budget-512'")
        return TokenBudget(n)
    if name.startswith("slo"):
        try:
            from . import slo
        except ImportError as e:
            raise SpearError(f"make_policy: SLO policy {name!r} is not available ({e})") from e
        return slo.make_slo_policy(name, **kwargs)
    raise SpearError(f"make_policy: unknown policy {name!r}; supported: {SIMPLE_POLICIES + ('slo', 'slo-ec-blind')}")
