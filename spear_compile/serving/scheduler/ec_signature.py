"""The EC signature: which ECs are active, per module type (count and total rank). The step cost model's EC
terms read it; the engine computes it for each EC state it serves."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import SpearError


@dataclass(frozen=True)
class ECSignature:
    """The active EC set: per module type (e.g. ``"q_proj"``), how many ECs and their total rank."""
    per_type: tuple = ()  # ((module type, count, total rank), ...), sorted by type

    @classmethod
    def from_counts(cls, counts: dict) -> "ECSignature":
        """From ``{type: (count, total rank)}``; types with no rank are dropped."""
        return cls(tuple(sorted((t, int(c), int(r)) for t, (c, r) in counts.items() if c > 0 and r > 0)))

    @property
    def is_empty(self) -> bool:
        return not self.per_type

    @property
    def total_rank(self) -> int:
        return sum(r for _, _, r in self.per_type)

    @property
    def num_ecs(self) -> int:
        return sum(c for _, c, _ in self.per_type)

    def rank_of(self, module_type: str) -> int:
        for t, _, r in self.per_type:
            if t == module_type:
                return r
        return 0

    @property
    def key(self) -> str:
        """A short stable text form (``none`` or ``q_proj:2x64,down_proj:1x32``), for logs, file keys and tables."""
        return ",".join(f"{t}:{c}x{r}" for t, c, r in self.per_type) or "none"

    def __str__(self) -> str:
        return self.key


def as_signature(sig) -> ECSignature:
    """``sig`` as an ECSignature (the engine's placeholder ``()`` or ``None`` is the empty set)."""
    if isinstance(sig, ECSignature):
        return sig
    if sig is None or sig == ():
        return ECSignature()
    if isinstance(sig, tuple):
        return ECSignature(tuple(sorted(tuple(x) for x in sig)))
    raise SpearError(f"ECSignature: cannot read {sig!r}")


def module_type(name: str) -> str:
    """The module type of a qualified module name: its last component (``model.layers.3.mlp.down_proj`` ->
    ``down_proj``)."""
    return name.rsplit(".", 1)[-1]


def is_active_ec(module) -> bool:
    """A CompensatedLinear with rank > 0 that is not switched off (``ec_enabled = False``)."""
    from ...ec.module import CompensatedLinear
    return (isinstance(module, CompensatedLinear) and getattr(module, "rank", 0) > 0
            and getattr(module, "ec_enabled", True) is not False)


def ec_signature(model, enabled: bool = True) -> ECSignature:
    """Count and total rank of the active ECs per module type of ``model`` (an ``nn.Module``, compiled or not).
    ``enabled=False`` (the engine's ECs switched off) is the empty signature."""
    if not enabled or model is None:
        return ECSignature()
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    counts: dict = {}
    for name, module in model.named_modules():
        if is_active_ec(module):
            c, r = counts.get(module_type(name), (0, 0))
            counts[module_type(name)] = (c + 1, r + int(module.rank))
    return ECSignature.from_counts(counts)
