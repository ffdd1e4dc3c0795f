"""Overlapped steps (``EngineConfig.overlap_decode``): the host builds and launches step N+1 while the device still
runs step N, and reads step N's tokens back only then (vLLM's asynchronous scheduling, in its plain form).

Step N+1's input ids are step N's sampled tokens, which stay on the device: they are copied into N+1's input buffer
there, in stream order, after the host's copy of the other inputs (positions, KV slots, block tables). On the host
each launched request gets a placeholder output token (``PENDING``) so the scheduler counts it; the read-back fills
it. A request that step N finishes (EOS, a stop string) is already in step N+1: that row's token is dropped and its
placeholder removed before its final output; its KV blocks are freed at once, since any later use of them is launched
after step N+1 on the same stream.

Steps with prefill chunks overlap too (their decode rows' ids patched the same way; a chunk that completes its
prompt samples its first token on the device). Overlapped while every request, running or waiting, samples greedily
(on the device) and a free KV block is left per running request (so the scheduler cannot preempt for a decode; a
preemption for another reason settles the step in flight first); not under tensor parallelism (the other ranks replay
host inputs). Anything else first reads the step in flight back, then runs one ordinary step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

PENDING = -1   # a launched step's output token, not read back yet


@dataclass
class InFlight:
    """A launched step: its sampled requests (rows), where each one's token goes in its outputs, the tokens on the
    device and their host copy (filled once ``ready`` has passed)."""
    rows: list
    index: list          # output position of each row's placeholder
    tokens: torch.Tensor  # [rows] int64 on the device
    host: torch.Tensor    # [rows] int64 on the host (pinned on CUDA)
    ready: Optional[object]   # CUDA: an event after the step's last kernel and its tokens' copy
    started: Optional[object]  # CUDA: an event before its first input copy (it passes once the step before is done)
    plan: object          # the scheduler's StepPlan (its policy observes the measured time)
    record: object        # the StepRecord of this step (measured time filled at read-back)


class OverlappedSteps:
    def __init__(self, engine):
        self.engine = engine
        self.inflight: Optional[InFlight] = None
        self.num_launched = 0    # steps launched ahead of their read-back

    @property
    def in_flight(self) -> bool:
        return self.inflight is not None

    def eligible(self) -> bool:
        """Whether the next step can be launched before the previous one's tokens are known: every request's token
        the device argmax with nothing read back (greedy, no logprobs, no penalties; running and waiting) and a free
        KV block per running request (a decode needs at most one, so the scheduler cannot preempt for them)."""
        sched = self.engine.scheduler
        running = sched.running
        if not (running or sched.waiting) or self.engine.blocks.num_free_blocks < len(running):
            return False
        return all(r.sampling.device_argmax for r in running) and all(r.sampling.device_argmax for r in sched.waiting)

    def step(self) -> list:
        """Schedule and launch a step, then read the previous one back; its outputs are this call's."""
        eng = self.engine
        t0 = time.perf_counter()
        plan = eng.scheduler.schedule(eng.ec_signature)
        outputs = []
        if plan.preempted:  # (a prefill budget of 0 on requests holding every block): settle the step in flight first
            outputs = self.drain()
            eng.num_preemptions += len(plan.preempted)
        # a request whose launched tokens already reach max_tokens / max_model_len ends at the read-back: leave it out
        decodes = [r for r in plan.decodes
                   if len(r.output_token_ids) < r.sampling.max_tokens
                   and r.num_prompt_tokens + len(r.output_token_ids) < eng.max_model_len]
        plan.decodes = decodes   # what was launched (the policy observes this step's measured time against it)
        try:
            launched = self._launch(decodes, plan.prefills, plan, t0) if decodes or plan.prefills else None
        except Exception as e:  # noqa: BLE001  (as one step at a time: this step's requests fail, serving goes on)
            outputs += self.drain()
            return outputs + eng._fail_step(plan, e)
        previous, self.inflight = self.inflight, launched   # the new step is in flight even if the read-back raises
        return outputs + self._read_back(previous)

    def _launch(self, decodes: list, prefills: list, plan, t0: float) -> InFlight:
        eng = self.engine
        prev = self.inflight
        rows = list(decodes) + [r for r, n in prefills if r.num_computed_tokens + n == r.num_tokens]  # sampled
        prefill_context = sum(r.num_computed_tokens for r, _ in prefills)
        device_ids = None
        if prev is not None:  # decode rows whose last token is the previous step's: copied on the device
            where = {id(r): i for i, r in enumerate(prev.rows)}
            src, dst = [], []
            for j, r in enumerate(decodes):
                if r.output_token_ids and r.output_token_ids[-1] == PENDING:
                    src.append(where[id(r)])
                    dst.append(j)
            if src:   # host index lists: moved to the device after the step's other inputs (a copy that waits)
                device_ids = (prev.tokens, src, dst)
        ec = eng.ec_enabled
        started = None
        if eng.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        first_steps, uncaptured = eng.runner.mixed.first_steps, eng.runner.mixed.uncaptured
        if prefills:   # decode rows first, then the chunks (``mixed_inputs``); logits: decodes, completed chunks
            use_ec = ec and eng.runner.net.has_ecs
            args, num_rows = eng.runner.mixed_inputs(decodes, prefills, use_ec)
            logits = eng.runner.run_mixed(use_ec, args, device_ids)[:num_rows]
        else:
            logits = eng.runner.execute_decode(decodes, ec, device_ids)
        tokens = logits.argmax(dim=-1)
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        ready = None
        if cuda:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
        for r in decodes:
            r.num_computed_tokens += 1
        for r, n in prefills:
            r.num_computed_tokens += n
        index = []
        for r in rows:
            index.append(len(r.output_token_ids))
            r.output_token_ids.append(PENDING)
        from .engine import StepRecord
        now = eng.scheduler.clock()
        record = StepRecord(time=now, num_decodes=len(decodes), num_prefill_tokens=sum(n for _, n in prefills),
                            sum_context=sum(r.num_computed_tokens for r in decodes), ec_signature=eng.ec_signature,
                            predicted_s=plan.predicted_s, measured_s=float("nan"),
                            host_s=time.perf_counter() - t0, num_prefills=len(prefills), ec_enabled=ec,
                            captured_graph=eng.runner.mixed.first_steps != first_steps,
                            uncaptured_mixed=eng.runner.mixed.uncaptured != uncaptured,
                            prefill_context=prefill_context,
                            mixed_dims=eng.runner.last_mixed_dims if prefills else None)
        eng.num_steps += 1
        self.num_launched += 1
        return InFlight(rows, index, tokens, host, ready, started, plan, record)

    def drain(self) -> list:
        """Read the step in flight back (waiting for it) and hand its tokens to their requests."""
        step, self.inflight = self.inflight, None
        return self._read_back(step)

    def _read_back(self, step: Optional[InFlight]) -> list:
        if step is None:
            return []
        if step.ready is not None:
            step.ready.synchronize()
        eng = self.engine
        now = eng.scheduler.clock()
        live = [(r, i, tok) for r, i, tok in zip(step.rows, step.index, step.host.tolist())
                if not r.is_finished]   # a finished row: ended by the step before, or aborted: its token is unwanted
        for r, i, tok in live:   # every token in place first: nothing PENDING stays behind if a check below raises
            r.output_token_ids[i] = tok
        outputs = [eng._append_token(r, tok, now, index=i) for r, i, tok in live]
        if step.started is not None:   # the step's own device time (its start waits for the step before it)
            step.record.measured_s = step.started.elapsed_time(step.ready) / 1e3
        else:   # off CUDA the forward ran inside the launch
            step.record.measured_s = step.record.host_s
        eng.policy.observe(step.plan, step.record.measured_s, captured=step.record.captured_graph)
        eng.step_log.append(step.record)
        return outputs
