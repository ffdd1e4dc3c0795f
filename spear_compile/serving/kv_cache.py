"""Paged KV cache bookkeeping: fixed-size blocks, a free list and per-request block tables, with optional automatic
prefix caching.

The tensors live in the model runner (per layer ``[num_blocks, block_size, kv_heads, head_dim]``); here only
which request holds which block. Block 0 is reserved as the padding block (padded slots write there), so a
manager of ``num_blocks`` hands out ``num_blocks - 1``.

Prefix caching (``prefix_caching=True``, as vLLM's automatic prefix caching): a full block whose KV was computed is
named by a chain hash (SHA-256 of the previous block's hash and this block's token ids), so its content depends on
every token before it. A new request takes the cached blocks of its longest cached prefix of full blocks (never its
last token: a step must compute at least one token to give logits) and computes only the rest. Blocks are reference
counted; a freed block keeps its KV and its name until it is handed out again (least recently freed first, the
blocks of a request's tail before its head), so a finished request's prompt serves the next one. A shared block is
full and nobody writes into it again (a request writes only past its computed tokens), so no copy-on-write is needed.
``reset_prefix_cache`` forgets every name (the model changed: ECs switched or swapped), and requests already running
never name their later blocks, whose KV mixes both models.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from ..errors import SpearError
from .request import Request

PAD_BLOCK = 0
_ROOT = b"spear-kv"  # the hash chain's seed


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if not isinstance(block_size, int) or block_size < 1:
            raise SpearError(f"KVBlockManager: block_size={block_size!r} must be an integer >= 1")
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise SpearError(f"KVBlockManager: num_blocks={num_blocks!r} must be an integer >= 2 (block 0 is padding)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = bool(prefix_caching)
        self._free = OrderedDict.fromkeys(range(1, num_blocks))  # handed out from the front, returned at the back
        self._refs = [0] * num_blocks
        self._cached: dict = {}   # chain hash -> block whose KV holds those tokens
        self._name: dict = {}     # block -> its chain hash (while cached)
        self._epoch = 0           # bumped by reset_prefix_cache
        self.num_cached_tokens = 0  # prompt tokens taken from the cache instead of computed (a counter)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks for ``req`` to hold ``num_computed_tokens + num_new_tokens`` tokens."""
        return max(0, self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self._free)

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Append the blocks ``req`` needs to ``req.block_ids``; False (and nothing changed) if too few are free."""
        ids, bs = req.block_ids, self.block_size
        short = req.num_computed_tokens + num_new_tokens - len(ids) * bs
        if short <= 0:
            return True   # the common decode step: room in its last block
        need, free = -(-short // bs), self._free
        if need > len(free):
            return False
        # every running decode crosses a block boundary now and then, often many in one step: kept lean
        refs, named = self._refs, self._name
        for _ in range(need):
            block = free.popitem(last=False)[0]
            if named:
                self._forget(block)  # handed out again: its old content is gone
            refs[block] = 1
            ids.append(block)
        return True

    def free(self, req: Request) -> None:
        """Return all of ``req``'s blocks and clear its block table (with prefix caching, its computed full blocks
        are named first, so a later request, or this one recomputed after a preemption, can take them)."""
        if self.prefix_caching:
            self.commit(req)
        for block in (reversed(req.block_ids) if self.prefix_caching else req.block_ids):  # cached: the tail is
            self._refs[block] -= 1                                                          # handed out before the head
            if self._refs[block] == 0:
                self._free[block] = None
        req.block_ids = []
        req.block_hashes = []

    # ---- prefix caching --------------------------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """For a request about to be admitted (no blocks yet): take the cached blocks of its longest cached prefix of
        full blocks, set its computed tokens to them; returns how many tokens that saves (0 with caching off)."""
        if not self.prefix_caching or req.block_ids:
            return 0
        req.cache_epoch = self._epoch
        req.block_hashes = []
        bs = self.block_size
        prev = _ROOT
        tokens = req.all_token_ids
        for i in range((len(tokens) - 1) // bs):
            h = _chain(prev, tokens[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            req.block_ids.append(block)
            req.block_hashes.append(h)
            prev = h
        req.num_computed_tokens = len(req.block_ids) * bs
        self.num_cached_tokens += req.num_computed_tokens
        return req.num_computed_tokens

    def commit(self, req: Request) -> None:
        """Name ``req``'s full blocks computed since the last call (the scheduler calls it every step; a token still
        being computed, e.g. an overlapped step's, ends the run)."""
        if not self.prefix_caching or req.cache_epoch != self._epoch:
            return
        bs = self.block_size
        done = min(req.num_computed_tokens, req.num_tokens) // bs
        prev = req.block_hashes[-1] if req.block_hashes else _ROOT
        for i in range(len(req.block_hashes), min(done, len(req.block_ids))):
            tokens = [req.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            if min(tokens) < 0:
                return   # an overlapped step's token, not read back yet
            h = _chain(prev, tokens)
            block = req.block_ids[i]
            if h not in self._cached and block not in self._name:
                self._cached[h] = block
                self._name[block] = h
            req.block_hashes.append(h)
            prev = h

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's name: what follows is computed by a different model (ECs switched)."""
        self._cached.clear()
        self._name.clear()
        self._epoch += 1

    def _forget(self, block: int) -> None:
        h = self._name.pop(block, None)
        if h is not None and self._cached.get(h) == block:
            del self._cached[h]


def _chain(prev: bytes, tokens: list) -> bytes:
    return hashlib.sha256(prev + array("q", tokens).tobytes()).digest()
