"""SLO-constrained, EC-aware scheduling policy (``"slo"``) and its EC-blind ablation (``"slo-ec-blind"``).

Each step (the base ``Scheduler`` already gives every running decode its token):

* **Slack.** The tightest deadline among the step's outputs: for every running decode, its TPOT SLO minus the
  time since its last token; for a partially prefilled request whose remaining prompt this step could finish in
  time, its TTFT deadline (``ctx.prefilling``: the running requests part-way through their prompt). The host time
  between steps (sampling, detokenizing, scheduling: learned online as the inter-step gap minus the predicted step time)
  is taken off the slack.
* **Budget.** The largest token count on the engine's bucket grid whose predicted step time (cost model, with the
  active EC signature; the EC-blind ablation predicts as if no EC were active; a step the engine would pad into a
  captured graph of larger dims priced there), times a safety factor, fits the slack. The factor is learned: the
  95th percentile of recent mixed steps' measured / predicted time, at least 1.1. No decode running: the largest
  bucket. Sarathi-Serve's deadline scheduler does the same search over a fixed grid with a linear step-time
  regression. When the budget is filled with several prompts, each chunk after the first joins only if the step
  priced at its actual chunks still fits (``admit``).
* **Order.** Waiting prefills by earliest TTFT deadline (arrival + TTFT SLO). A request that can no longer meet
  its TTFT (its deadline has passed, or its prompt alone cannot be prefilled before it at the model's prefill
  rate) is demoted behind those that still can, but not starved: if no demoted request got a chunk for
  ``aging_steps`` steps, the oldest goes first, and whenever work waits but nothing was prefilled for
  ``aging_steps`` steps the budget is at least ``min_chunk`` tokens.

Cost per step: O(running + waiting) plus a sort of the waiting queue, at most one prediction per bucket, and a
few per chunk admitted after the first (one, or a halving sequence once, for the chunk that does not fit whole).
``ops`` counts the requests visited and predictions made (tests bound it; the benchmark times it).
"""
from __future__ import annotations

import math
from collections import deque
from operator import itemgetter
from typing import Optional

from ...errors import SpearError
from .base import Policy, StepContext, StepPlan
from .cost_model import PredictionLog, StepCostModel
from .ec_signature import ECSignature, as_signature

DEFAULT_TTFT_SLO_S = 2.0
DEFAULT_TPOT_SLO_S = 0.1
SAFETY_WINDOW = 256   # mixed steps whose measured / predicted ratios set the safety factor
SAFETY_EVERY = 32     # new ratios between two updates of it (a sort of the window each time)
NO_SIGNATURE = ECSignature()


class SloAware(Policy):
    """Prefill budget from the tightest slack and a step cost model; EDF prefill order with demotion and aging.

    ``cost_model``: a fitted ``StepCostModel``. ``ec_aware=False``: predictions ignore the active ECs (the
    ablation; give it the EC-blind model, fitted on EC-free steps). ``ttft_slo_s`` / ``tpot_slo_s``: defaults
    for requests without their own. ``safety``: predicted time is multiplied by at least this before the fit test;
    ``safety_quantile`` (0: off): by the running quantile of measured / predicted time over the last
    ``SAFETY_WINDOW`` mixed steps when larger. A mixed step carries every running decode's token, so for p99
    inter-token latency inside the SLO the step that fills the slack must overrun it rarely: the model's p50 error is
    small but its mixed-step tail is not (session 23 on the H100: measured / predicted p90 1.09-1.19, p98 1.23-1.47).
    ``min_chunk`` / ``aging_steps``: the anti-starvation guarantee (see module docstring).
    """
    chunked = True

    def __init__(self, cost_model: StepCostModel, ec_aware: bool = True, ttft_slo_s: Optional[float] = None,
                 tpot_slo_s: Optional[float] = None, safety: float = 1.1, safety_quantile: float = 0.95,
                 min_chunk: int = 32, aging_steps: int = 8, overhead_alpha: float = 0.1, name: Optional[str] = None):
        if not isinstance(cost_model, StepCostModel):
            raise SpearError(f"SloAware: cost_model must be a StepCostModel, got {type(cost_model).__name__}")
        if not cost_model.fitted:
            raise SpearError("SloAware: the cost model is not fitted (run scheduler.profile first)")
        for nm, v in (("ttft_slo_s", ttft_slo_s), ("tpot_slo_s", tpot_slo_s)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise SpearError(f"SloAware: {nm}={v!r} must be a positive number of seconds")
        if not (safety >= 1.0 and math.isfinite(safety)):
            raise SpearError(f"SloAware: safety={safety!r} must be >= 1")
        if not (isinstance(safety_quantile, (int, float)) and 0.0 <= safety_quantile < 1.0):
            raise SpearError(f"SloAware: safety_quantile={safety_quantile!r} must be in [0, 1) (0: a fixed safety)")
        if not (isinstance(min_chunk, int) and min_chunk >= 1 and isinstance(aging_steps, int) and aging_steps >= 1):
            raise SpearError(f"SloAware: min_chunk={min_chunk!r} and aging_steps={aging_steps!r} must be integers >= 1")
        self.cost_model = cost_model
        self.ec_aware = bool(ec_aware)
        self.name = name or ("slo" if ec_aware else "slo-ec-blind")
        self.ttft_slo_s = float(ttft_slo_s or DEFAULT_TTFT_SLO_S)
        self.tpot_slo_s = float(tpot_slo_s or DEFAULT_TPOT_SLO_S)
        self.safety = float(safety)
        self.safety_quantile = float(safety_quantile)
        self.safety_now = self.safety   # max(safety, the quantile of recent mixed steps' measured / predicted)
        self._ratios: deque = deque(maxlen=SAFETY_WINDOW)
        self._new_ratios = 0
        self.min_chunk = min_chunk
        self.aging_steps = aging_steps
        self.overhead_alpha = overhead_alpha
        self.overhead_s = 0.0          # learned host time between steps
        self.ops = 0                   # requests visited + predictions made (bounded per step; tests check)
        self.log = PredictionLog()
        self.last_budget = 0
        self.last_slack_s = math.inf
        self._longest = 0
        self._avail = math.inf         # this step's slack less the host overhead (``admit`` keeps steps inside it)
        self._admit_closed = False
        self._sig_now = NO_SIGNATURE
        self._starved_steps = 0        # consecutive steps with work waiting and no prefill chunk
        self._demoted_starved_steps = 0  # consecutive steps with demoted requests and none of them served
        self._demoted: set = set()
        self._work_waits = False
        self._aging_now = False
        self._prev_now: Optional[float] = None
        self._prev_plan_id: Optional[int] = None
        self._pending: dict = {}       # id(plan) -> (plan, shape args) until observe(), oldest first
        self._rate_cache: dict = {}    # signature -> seconds per prefill token at the largest bucket

    # helpers -------------------------------------------------------------------------------------------------
    def _sig(self, ctx_sig) -> ECSignature:
        return as_signature(ctx_sig) if self.ec_aware else NO_SIGNATURE

    def ttft_deadline(self, req) -> float:
        return req.arrival_time + (req.ttft_slo_s or self.ttft_slo_s)

    def _prefill_s_per_token(self, sig: ECSignature) -> float:
        rate = self._rate_cache.get(sig)
        if rate is None:
            n = max(self.cost_model.token_buckets or (512,))
            rate = self.cost_model.predict_raw(0, n, 0, sig, n) / n
            self._rate_cache[sig] = rate
        return rate

    # Policy ---------------------------------------------------------------------------------------------------
    def order(self, waiting: list, now: float) -> list:
        """Earliest TTFT deadline first; requests that cannot make theirs after those that can (aging: the oldest
        demoted one first when none was served for ``aging_steps`` steps)."""
        rate = self._prefill_s_per_token(NO_SIGNATURE)  # an optimistic rate: demote only the surely late
        feasible, late = [], []
        default_ttft = self.ttft_slo_s
        for r in waiting:   # ttft_deadline and num_tokens_to_compute inlined: every waiting request, every step
            d = r.arrival_time + (r.ttft_slo_s or default_ttft)
            todo = len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens
            if now + todo * rate > d:
                late.append((d, r.arrival_time, r))
            else:
                feasible.append((d, r.arrival_time, r))
        self.ops += len(waiting)
        feasible.sort(key=_first_two)
        late.sort(key=_first_two)
        self._demoted = {id(x[2]) for x in late}
        out = [x[2] for x in feasible]
        demoted_starving = bool(late) and self._demoted_starved_steps >= self.aging_steps
        if demoted_starving:
            out = [late[0][2]] + out + [x[2] for x in late[1:]]
        else:
            out += [x[2] for x in late]
        self._work_waits = bool(waiting)
        self._aging_now = demoted_starving or (self._work_waits and self._starved_steps >= self.aging_steps)
        return out

    def prefill_budget(self, ctx: StepContext) -> int:
        now = ctx.now
        self._learn_overhead(now)
        sig = self._sig(ctx.ec_signature)
        d = len(ctx.decodes)
        slack = math.inf
        default_tpot = self.tpot_slo_s
        longest = 0
        for r in ctx.decodes:
            last = r.last_token_time if r.last_token_time is not None else now
            s = (r.tpot_slo_s or default_tpot) - (now - last)
            if s < slack:
                slack = s
            if r.num_computed_tokens >= longest:
                longest = r.num_computed_tokens + 1
        self.ops += d
        self._longest = longest
        cm = self.cost_model

        run_dims = ctx.run_dims

        def kv_mixed(p):  # the KV a mixed step of p prefill tokens gathers (its decode rows depend on p)
            return cm.context_feature(d, ctx.sum_context_len, longest, mixed=True, num_prefill_tokens=p)

        def fits(p, chunks, limit, bucket=0, own_cells=None):
            """Whether a step of ``p`` prefill tokens in ``chunks`` = (tokens before, length, ends its prompt) fits
            ``limit`` at its own padding (``own_cells``; None: one chunk from a prompt's start), then, if the engine
            would replay it padded in a larger captured graph (``run_dims``: its tokens and attention work), there
            too. Padding only adds work, so the engine is asked only about a step that fits unpadded (mostly the
            first bucket tried)."""
            kv = kv_mixed(p)
            if self._predict(d, p, kv, sig, bucket, own_cells) * self.safety_now > limit:
                return False
            padded = run_dims(d, longest, chunks) if run_dims is not None else None
            return padded is None or self._predict(d, p, kv, sig, *padded) * self.safety_now <= limit
        # partially prefilled requests that can still make their TTFT: the step finishing them must be in time
        for r in ctx.prefilling:
            self.ops += 1
            s = self.ttft_deadline(r) - now
            rem = r.num_tokens_to_compute
            if s > 0 and fits(rem, [(r.num_computed_tokens, rem, True)], s,
                              own_cells=cm.prefill_cells([(r.num_computed_tokens, rem)])):
                slack = min(slack, s)
        # a budget's chunks as the base scheduler fills them: the partial prompt served first (its attention reads
        # its computed tokens too) up to its remaining tokens, the rest one chunk from a prompt's start
        first = ctx.prefilling[0] if ctx.prefilling else None
        before = first.num_computed_tokens if first is not None else 0
        first_rem = first.num_tokens_to_compute if first is not None else 0

        def chunks_of(room):
            if not before:
                return [(0, room, False)], None   # one chunk from a prompt's start: the model's default cells
            chunks = [(before, min(room, first_rem), room >= first_rem)] + (
                [(0, room - first_rem, False)] if room > first_rem else [])
            return chunks, cm.prefill_cells([(c, n) for c, n, _ in chunks])
        buckets = ctx.token_buckets or (ctx.max_num_tokens,)
        self._avail, self._admit_closed, self._sig_now = math.inf, False, sig
        if slack == math.inf:
            budget = self.cost_model.prefill_room(d, max(buckets[-1], ctx.max_num_tokens))
        else:
            avail = self._avail = slack - self.overhead_s
            budget = 0
            for b in reversed(buckets):  # the largest bucket whose step fits; few buckets, one prediction each
                room = self.cost_model.prefill_room(d, b)
                if room <= 0:
                    break
                chunks, own = chunks_of(room)
                if fits(room, chunks, avail, b, own):
                    budget = room
                    break
        if ctx.prefilling:
            self._work_waits = True
            self._aging_now = self._aging_now or self._starved_steps >= self.aging_steps
        if self._aging_now:
            budget = max(budget, self.min_chunk)
        self.last_budget = max(0, budget)
        self.last_slack_s = slack
        return self.last_budget

    def admit(self, ctx: StepContext, plan: StepPlan, req, chunk: int) -> int:
        """The budget was priced as one or two chunks; the base scheduler may fill it with several short prompts,
        each a chunk with its own attention rows, and the engine pads a step of more chunks into a graph of more
        (session 24 on the H100: 6-8 chunks of a 960-token budget predicted 16.9-17.5 ms against a 15 ms SLO).
        A chunk after the first joins only if the step with it, priced at its chunks as the engine will run it
        (``run_dims``), still fits the slack; else it is halved down to ``min_chunk``, and past the first
        chunk that does not fit whole no later one is tried this step."""
        avail = self._avail
        if not plan.prefills or avail == math.inf:
            return chunk     # the budget's own first chunk (or no decode running: no slack to keep)
        if self._admit_closed:
            return 0
        d, longest, sig, cm = len(plan.decodes), self._longest, self._sig_now, self.cost_model
        chunks = _chunks(plan.prefills)
        before, p0 = req.num_computed_tokens, plan.num_prefill_tokens
        c = chunk
        while c >= min(chunk, self.min_chunk):
            step = chunks + [(before, c, before + c == req.num_tokens)]
            kv = cm.context_feature(d, ctx.sum_context_len, longest, mixed=True, num_prefill_tokens=p0 + c)
            if self._predict(d, p0 + c, kv, sig, *self._run_at(ctx, d, longest, step)) * self.safety_now <= avail:
                self._admit_closed = c < chunk
                return c
            c //= 2
        self._admit_closed = True
        return 0

    def _run_at(self, ctx: StepContext, d: int, longest: int, chunks) -> tuple:
        """(tokens, prefill attention cells) a step of ``chunks`` runs at: the covering graph's if the engine would
        replay it padded (``ctx.run_dims``), else its own (tokens 0: the cost model pads them)."""
        ran = ctx.run_dims(d, longest, chunks) if ctx.run_dims is not None else None
        return ran if ran is not None else (0, self.cost_model.prefill_cells([(b, n) for b, n, _ in chunks]))

    def _predict(self, d, p, ctx_len, sig, padded=0, cells=None) -> float:
        self.ops += 1
        return self.cost_model.predict(d, p, ctx_len, sig, padded, cells)

    def predict(self, plan: StepPlan, ctx: StepContext) -> Optional[float]:
        d, p = len(plan.decodes), plan.num_prefill_tokens
        self._starved_steps = 0 if (p or not self._work_waits) else self._starved_steps + 1
        if not self._demoted or any(id(r) in self._demoted for r, _ in plan.prefills):
            self._demoted_starved_steps = 0
        else:
            self._demoted_starved_steps += 1
        if d == 0 and p == 0:
            return None
        sig = self._sig(ctx.ec_signature)
        longest = self._longest if d == len(ctx.decodes) else max((r.num_computed_tokens + 1 for r in plan.decodes),
                                                                  default=0)
        kv = self.cost_model.context_feature(d, ctx.sum_context_len, longest, mixed=p > 0, num_prefill_tokens=p)
        tokens, cells = 0, 0
        if p:   # priced at the graph the engine will run it in (a captured one of larger dims, padded) if it knows
            tokens, cells = self._run_at(ctx, d, longest, _chunks(plan.prefills))
        pred = self._predict(d, p, kv, sig, tokens, cells)
        # [plan, shape, predicted, gap to the next step's start, measured]: done when both of the last two are in
        # keyed by id(plan): unique among the entries, which hold their plans (an id freed and reused can only be
        # a settled entry's, gone from here); the oldest unsettled entries go past 256
        self._pending[id(plan)] = [plan, (d, p, kv, sig, tokens, cells), pred, None, None]
        while len(self._pending) > 256:
            del self._pending[next(iter(self._pending))]
        self._prev_plan_id = id(plan)
        return pred

    def observe(self, plan: StepPlan, measured_s: float, captured: bool = False) -> None:
        """The engine's measured time of ``plan`` (possibly a step or more later): online correction of the cost
        model, the predicted-vs-measured log, and (with the gap to the next step) the host overhead. A step that
        ran eagerly to capture its CUDA graph (``captured``; once per mixed-step shape) neither corrects the model
        nor enters the log: its time is a one-off, not the step's cost."""
        entry = self._pending.get(id(plan))
        if entry is None or entry[0] is not plan or not (measured_s > 0 and math.isfinite(measured_s)):
            return
        d, p, ctx_len, sig, tokens, cells = entry[1]
        if not captured:
            self.log.add(entry[2], measured_s)
            if p and self.safety_quantile and entry[2] > 0:
                self._learn_safety(measured_s / entry[2])
            self.cost_model.observe(d, p, ctx_len, sig, measured_s, num_tokens=tokens, prefill_cells=cells)
        entry[4] = measured_s
        self._settle(entry)

    def _learn_safety(self, ratio: float) -> None:
        """A mixed step's measured / predicted time (the prediction it was planned with); every ``SAFETY_EVERY``
        of them, ``safety_now`` becomes the window's ``safety_quantile`` (never below ``safety``)."""
        if not math.isfinite(ratio):
            return
        self._ratios.append(ratio)
        self._new_ratios += 1
        if self._new_ratios >= SAFETY_EVERY:
            self._new_ratios = 0
            ranked = sorted(self._ratios)
            q = ranked[min(len(ranked) - 1, int(self.safety_quantile * len(ranked)))]
            self.safety_now = max(self.safety, q)

    def _learn_overhead(self, now: float) -> None:
        """The previous step ran from the previous call's ``now`` to this one: record that gap on its entry."""
        entry = self._pending.get(self._prev_plan_id) if self._prev_plan_id is not None else None
        if entry is not None and self._prev_now is not None:
            entry[3] = now - self._prev_now
            self._settle(entry)
        self._prev_now = now
        self._prev_plan_id = None

    def _settle(self, entry) -> None:
        """Host time between steps = gap - measured step time, exponentially averaged, once both are known; a gap
        much longer than the step (the engine idling for arrivals) is skipped."""
        gap, measured = entry[3], entry[4]
        if gap is None or measured is None:
            return
        self._pending.pop(id(entry[0]), None)
        if gap <= 2.0 * measured + 0.005:
            self.overhead_s += self.overhead_alpha * (max(0.0, gap - measured) - self.overhead_s)


_first_two = itemgetter(0, 1)  # (deadline, arrival): the order's sort key


SLO_POLICY_NAMES = ("slo", "slo-ec-blind")


def make_slo_policy(name: str, cost_model: Optional[StepCostModel] = None,
                    blind_cost_model: Optional[StepCostModel] = None, engine=None, **kwargs) -> SloAware:
    """``"slo"`` (EC-aware) or ``"slo-ec-blind"``. Cost models: ``cost_model`` (EC-aware; also used, without its EC
    terms' input, by the blind policy when ``blind_cost_model`` is not given), else profiled from ``engine``
    (``scheduler.profile.cost_models_for``: cached on disk). Other kwargs go to ``SloAware``."""
    if name not in SLO_POLICY_NAMES:
        raise SpearError(f"make_slo_policy: unknown policy {name!r}; supported: {SLO_POLICY_NAMES}")
    if cost_model is None and blind_cost_model is None:
        if engine is None:
            raise SpearError(f"policy {name!r} needs a step cost model: pass cost_model=... or engine=... "
                             f"(profiled by spear_compile.serving.scheduler.profile.cost_models_for)")
        from .profile import cost_models_for
        cost_model, blind_cost_model = cost_models_for(engine)
    if name == "slo":
        if cost_model is None:
            raise SpearError("policy 'slo' needs the EC-aware cost_model")
        return SloAware(cost_model, ec_aware=True, **kwargs)
    return SloAware(blind_cost_model or cost_model, ec_aware=False, **kwargs)

def _chunks(prefills) -> list:
    """A plan's ``(request, chunk)`` prefills as ``(tokens before, chunk length, ends its prompt)``."""
    return [(r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens) for r, n in prefills]
