"""Storage layout of quantized integers.

Values of up to 4 bits are packed two per byte along K: byte ``j`` of row ``n`` holds
``q[n, 2j]`` in its low nibble and ``q[n, 2j+1]`` in its high nibble. 8-bit values are
stored one per byte. Every kernel in ``spear_compile.lowering`` reads this layout.
"""
import torch

from ..errors import SpearError


def pack(q: torch.Tensor, container_bits: int) -> torch.Tensor:
    """``q``: unsigned integers ``[N, K]`` (any int dtype) -> uint8 ``[N, K // 2]`` or ``[N, K]``."""
    q = q.to(torch.uint8)
    if container_bits == 8:
        return q.contiguous()
    if container_bits != 4:
        raise SpearError(f"pack: unsupported container of {container_bits} bits")
    if q.shape[-1] % 2:
        raise SpearError(f"pack: K={q.shape[-1]} must be even for 4-bit packing")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`; the container is read off the shape (``K/2`` columns: 4-bit)."""
    if packed.shape[-1] == k:
        return packed
    if packed.shape[-1] * 2 != k:
        raise SpearError(f"unpack: packed width {packed.shape[-1]} does not fit K={k}")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], k)
