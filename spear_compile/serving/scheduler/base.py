"""Continuous-batching scheduler: which requests compute which tokens in the next engine step.

Stall-free (Sarathi-style): every running decode gets its token each step; prefill chunks fill the budget the
policy gives. When KV blocks run out, the most recently arrived running request is preempted by recompute
(its blocks freed, its tokens recomputed later as a prefill of prompt + outputs so far).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ...errors import SpearError
from ..buckets import mixed_decode_rows
from ..kv_cache import KVBlockManager
from ..request import Request, RequestStatus

_arrival = attrgetter("arrival_time")  # the sort key of every step (C-level: no Python call per request)


@dataclass
class StepPlan:
    """What one engine step computes."""
    decodes: list = field(default_factory=list)      # Requests computing exactly 1 token
    prefills: list = field(default_factory=list)     # (Request, chunk length); a chunk may finish the prompt
    preempted: list = field(default_factory=list)    # moved back to waiting this step (blocks freed)
    predicted_s: Optional[float] = None

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decodes)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass
class StepContext:
    """What a policy sees when sizing the prefill budget."""
    now: float
    decodes: list
    waiting: list                 # in the policy's order
    sum_context_len: int          # sum over decodes of num_computed_tokens + 1
    ec_signature: Any
    max_num_tokens: int
    token_buckets: tuple
    prefilling: list = field(default_factory=list)  # running requests part-way through their prompt (TTFT-bound)
    # (num_decodes, longest decode's tokens, [(tokens before, chunk length, ends its prompt)]) -> (tokens, prefill
    # attention cells) of the captured graph the engine would replay the step in, padded; None: its own dims
    run_dims: Optional[Callable] = None


class Policy(ABC):
    name: str = "policy"
    chunked: bool = True          # False: a prompt is prefilled whole in one step

    def order(self, waiting: list, now: float) -> list:
        """FIFO by arrival; preempted requests (recompute) keep their arrival time, so they come first."""
        return sorted(waiting, key=_arrival)

    @abstractmethod
    def prefill_budget(self, ctx: StepContext) -> int:
        """Tokens for prefill chunks this step (decodes are always scheduled on top)."""

    def admit(self, ctx: StepContext, plan: StepPlan, req: Request, chunk: int) -> int:
        """How much of ``chunk`` (``req``'s next prefill chunk, within the budget) joins ``plan``; 0: none, and no
        later request's either this step (admission is in order)."""
        return chunk

    def predict(self, plan: StepPlan, ctx: StepContext) -> Optional[float]:
        return None

    def observe(self, plan: StepPlan, measured_s: float, captured: bool = False) -> None:
        """The engine's measured time of ``plan``; ``captured``: the step also captured a CUDA graph (one-off)."""


class Scheduler:
    def __init__(self, blocks: KVBlockManager, policy: Policy, max_num_seqs: int, max_num_tokens: int,
                 token_buckets=(), clock: Callable[[], float] = time.monotonic, max_decode_rows: Optional[int] = None):
        if max_num_seqs < 1 or max_num_tokens < max_num_seqs:
            raise SpearError(f"Scheduler: need 1 <= max_num_seqs ({max_num_seqs}) <= max_num_tokens ({max_num_tokens})")
        self.blocks = blocks
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.token_buckets = tuple(token_buckets) or (max_num_tokens,)
        self.clock = clock
        self.run_dims: Optional[Callable] = None   # the engine's ``StepContext.run_dims``
        # the engine's largest decode bucket: a step's decodes take their rows padded as the engine pads them
        # (``buckets.mixed_decode_rows`` with no prefill) of ``max_num_tokens``, so its chunks leave room for the padded
        # rows and the step runs at a decode-row bucket (one graph key per bucket, not one per decode count); None:
        # the decodes take their count
        self.max_decode_rows = max_decode_rows
        self.waiting: deque = deque()
        self.running: list = []

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def find(self, request_id: str) -> Optional[Request]:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None

    def abort(self, request_id: str) -> Optional[Request]:
        """Remove the request (waiting or running), free its blocks; returns it (None if unknown)."""
        req = self.find(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Free ``req``'s blocks, take it out of the queues, mark it finished with ``status``."""
        self.blocks.free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        req.finish_time = self.clock()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def slots_full(self) -> bool:
        """Every sequence slot is taken while requests wait: none can start, whatever a step's slack."""
        return bool(self.waiting) and len(self.running) >= self.max_num_seqs

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _not_admitted(self, req: Request, is_new: bool) -> None:
        """A waiting request that took cached blocks but is not admitted this step gives them back."""
        if is_new and req.block_ids:
            self.blocks.free(req)
            req.num_computed_tokens = 0

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.blocks.free(req)
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    def schedule(self, ec_signature: Any = ()) -> StepPlan:
        plan = StepPlan()
        now = self.clock()
        self.running.sort(key=_arrival)
        if self.blocks.prefix_caching:  # name the blocks the last step filled, for requests admitted from now on
            for req in self.running:
                self.blocks.commit(req)
        # one pass over the running requests (this runs every step at up to max_num_seqs of them): decoding ones
        # compute their last sampled token, partially prefilled ones more than one
        decoding, partial = [], []
        for r in self.running:
            todo = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if todo == 1:
                decoding.append(r)
            elif todo > 1:
                partial.append(r)
        # 1. decodes: one token each, oldest first; preempt the newest running request when blocks run out
        i, block_size = 0, self.blocks.block_size
        while i < len(decoding):
            req = decoding[i]
            # KVBlockManager.allocate's first check, inlined (most steps: room in the last block; no call per decode)
            if req.num_computed_tokens < len(req.block_ids) * block_size:
                plan.decodes.append(req)
                i += 1
                continue
            while not self.blocks.allocate(req, 1):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim in decoding:
                    decoding.remove(victim)
                if victim is req:
                    break
            else:
                plan.decodes.append(req)
                i += 1
        # 2. prefill chunks within the policy's budget: partially prefilled running requests, then waiting ones
        ordered_waiting = self.policy.order(list(self.waiting), now)
        if plan.preempted:
            partial = [r for r in partial if r.status is not RequestStatus.PREEMPTED]
        ctx = StepContext(now=now, decodes=list(plan.decodes), waiting=ordered_waiting,
                          sum_context_len=sum(r.num_computed_tokens + 1 for r in plan.decodes),
                          ec_signature=ec_signature, max_num_tokens=self.max_num_tokens,
                          token_buckets=self.token_buckets, prefilling=partial, run_dims=self.run_dims)
        rows = len(plan.decodes)
        if self.max_decode_rows is not None:
            rows = mixed_decode_rows(rows, 0, self.max_decode_rows, self.max_num_tokens)
        room = self.max_num_tokens - rows
        budget = min(int(self.policy.prefill_budget(ctx)), room)
        # no new admissions in a step that had to preempt (they would only be preempted again)
        for req in partial + ([] if plan.preempted else ordered_waiting):
            if budget <= 0:
                break
            is_new = req not in self.running
            if is_new and len(self.running) >= self.max_num_seqs:
                break
            if is_new and self.blocks.prefix_caching and not req.block_ids:
                self.blocks.match_prefix(req)  # its cached prefix counts as computed (undone below if not admitted)
            remaining = req.num_tokens_to_compute
            free_tokens = (len(req.block_ids) + self.blocks.num_free_blocks) * self.blocks.block_size \
                - req.num_computed_tokens
            chunk = min(remaining, budget, free_tokens)
            if chunk <= 0:
                self._not_admitted(req, is_new)
                break  # admission by free blocks, in order: no skipping ahead
            if not self.policy.chunked and chunk < remaining:
                # whole prompts only; a prompt longer than the largest bucket goes alone, in bucket-sized chunks
                if plan.prefills or remaining <= room:
                    self._not_admitted(req, is_new)
                    break
            chunk = self.policy.admit(ctx, plan, req, chunk)
            if chunk <= 0:
                self._not_admitted(req, is_new)
                break
            ok = self.blocks.allocate(req, chunk)
            assert ok, "block accounting"
            if is_new:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = RequestStatus.RUNNING
            plan.prefills.append((req, chunk))
            budget -= chunk
        if plan.is_empty and len(self.running) > 1 and not plan.preempted:
            # partially prefilled requests hold every block and none can go on: recompute the newest later
            self._preempt(self.running[-1], plan)
            retry = self.schedule(ec_signature)
            retry.preempted[:0] = plan.preempted
            return retry
        plan.predicted_s = self.policy.predict(plan, ctx)
        return plan
