"""Paged KV cache bookkeeping: fixed-size blocks, a free list and per-request block tables.

The tensors live in the model runner (per layer ``[num_blocks, block_size, kv_heads, head_dim]``); here only
which request holds which block. Block 0 is reserved as the padding block (padded slots write there), so a
manager of ``num_blocks`` hands out ``num_blocks - 1``.
"""
from __future__ import annotations

from collections import deque

from ..errors import SpearError
from .request import Request

PAD_BLOCK = 0


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise SpearError(f"KVBlockManager: block_size={block_size!r} must be an integer >= 1")
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise SpearError(f"KVBlockManager: num_blocks={num_blocks!r} must be an integer >= 2 (block 0 is padding)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks for ``req`` to hold ``num_computed_tokens + num_new_tokens`` tokens."""
        return max(0, self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self._free)

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Append the blocks ``req`` needs to ``req.block_ids``; False (and nothing changed) if too few are free."""
        if req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * self.block_size:
            return True   # the common decode step: room in its last block
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        req.block_ids.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, req: Request) -> None:
        """Return all of ``req``'s blocks and clear its block table."""
        self._free.extend(req.block_ids)
        req.block_ids = []
