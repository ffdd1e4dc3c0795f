"""Quantization configuration and its short spec strings (``w4-pc-rtn``, ``w4-g128-sym-gptq``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torchao.core.config import AOBaseConfig

from ..errors import SpearError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128, 256)  # None means per-channel (one group spanning K)
SUPPORTED_METHODS = ("rtn", "gptq")

_SPEC = re.compile(r"^w(?P<bits>\d+)-(?P<gran>pc|g\d+)(?:-(?P<sym>sym|asym))?-(?P<method>[a-z]+)$")


@dataclass(frozen=True)
class QuantConfig(AOBaseConfig):
    """Weight-only quantization of linear layers.

    ``group_size=None`` is per-channel (one scale and zero per output row). Usable both as
    ``spear_compile.quantize(model, cfg)`` and as ``torchao.quantization.quantize_(model, cfg)``
    (RTN only there: GPTQ needs calibration data).
    """

    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block: int = 128

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise SpearError(f"QuantConfig: unsupported bits={self.bits}; supported: {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size not in SUPPORTED_GROUPS:
            raise SpearError(
                f"QuantConfig: unsupported group_size={self.group_size}; "
                f"supported: None (per-channel) or {SUPPORTED_GROUPS}"
            )
        if self.method not in SUPPORTED_METHODS:
            raise SpearError(f"QuantConfig: unsupported method={self.method!r}; supported: {SUPPORTED_METHODS}")
        if not (0 < self.gptq_damp < 1):
            raise SpearError(f"QuantConfig: gptq_damp must be in (0, 1), got {self.gptq_damp}")

    @property
    def container_bits(self) -> int:
        """Bits actually stored per weight: 2- and 3-bit values live in the 4-bit container."""
        return 4 if self.bits <= 4 else 8

    @property
    def spec(self) -> str:
        gran = "pc" if self.group_size is None else f"g{self.group_size}"
        sym = "-sym" if self.symmetric else ""
        return f"w{self.bits}-{gran}{sym}-{self.method}"

    @classmethod
    def from_spec(cls, spec: str) -> Optional["QuantConfig"]:
        """Parse ``w{bits}-{pc|g<G>}[-sym|-asym]-{rtn|gptq}``; ``none`` returns None."""
        spec = spec.strip().lower()
        if spec in ("none", "fp", "bf16"):
            return None
        m = _SPEC.match(spec)
        if m is None:
            raise SpearError(
                f"quant spec {spec!r} not understood; expected e.g. w4-pc-rtn, w4-g128-rtn, w4-pc-sym-rtn, w3-pc-rtn, "
                "w4-pc-gptq or none"
            )
        gran = m["gran"]
        return cls(
            bits=int(m["bits"]),
            group_size=None if gran == "pc" else int(gran[1:]),
            symmetric=m["sym"] == "sym",
            method=m["method"],
        )

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method, "spec": self.spec}
