"""Scheduling: the continuous-batching ``Scheduler`` and its policies."""
from .base import Policy, Scheduler, StepContext, StepPlan
from .policies import FifoNoChunk, TokenBudget, make_policy

__all__ = ["Policy", "Scheduler", "StepContext", "StepPlan", "FifoNoChunk", "TokenBudget", "make_policy"]
