"""SLO-aware scheduling on a fake step-cost runner: the real ``Scheduler`` driven by a simulated clock, each step
taking the time a known cost function gives (no model, no GPU)."""
import math
import random

import pytest

from spear_compile.errors import SpearError
from spear_compile.serving.kv_cache import KVBlockManager
from spear_compile.serving.request import Request, RequestStatus, SamplingParams
from spear_compile.serving.scheduler import Scheduler, make_policy
from spear_compile.serving.scheduler.cost_model import StepCostModel, StepSample, StepShape, fit_models
from spear_compile.serving.scheduler.ec_signature import ECSignature
from spear_compile.serving.scheduler.slo import SloAware

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)
EC_ON = ECSignature((("down_proj", 8, 256), ("q_proj", 8, 256)))
NO_EC = ECSignature()


def true_step_s(d, p, ctx, sig):
    """A 1B-on-one-GPU-like step: ~2.5 ms decode floor, ~20 us per prefill token, attention ~ context; ECs cost
    about a third more (a fixed part per rank and a part per rank x token)."""
    t = ([b for b in (DECODE_BUCKETS if p == 0 else TOKEN_BUCKETS) if b >= d + p] or [d + p])[0]
    y = 2.5e-3 + (0.0 if t <= 16 else 1.8e-5 * t) + 1e-6 * p + 2e-8 * ctx
    r = sig.total_rank
    return y + 2e-6 * r + 1.6e-8 * r * t


def profile_samples():
    out = []
    for sig in (NO_EC, EC_ON):
        for d in (1, 2, 5, 16, 40, 64):
            for p in (0, 16, 100, 300, 900, 1900):
                for c in (64, 600, 2000):
                    if d + p <= 2048:
                        out.append(StepSample(StepShape(d, p, d * c, 0), sig, true_step_s(d, p, d * c, sig)))
    return out


@pytest.fixture(scope="module")
def models():
    aware, blind = fit_models(profile_samples(), DECODE_BUCKETS, TOKEN_BUCKETS, correction_alpha=0.0)
    return aware, blind


class Sim:
    """Drives a Scheduler like the engine does, with a simulated clock and ``true_step_s`` per step."""

    def __init__(self, policy, max_num_seqs=64, num_blocks=4096, ec_signature=NO_EC, host_s=0.0):
        self.clock = 0.0
        self.sched = Scheduler(KVBlockManager(num_blocks, 16), policy, max_num_seqs=max_num_seqs,
                               max_num_tokens=TOKEN_BUCKETS[-1], token_buckets=TOKEN_BUCKETS, clock=lambda: self.clock)
        self.policy = policy
        self.sig = ec_signature
        self.host_s = host_s
        self.steps = []       # (plan, running decodes before the step, predicted, slack, true time)
        self.itl = []         # (request, inter-token latency)
        self.done = []

    def run(self, requests, max_steps=200000, on_step=None):
        pending = sorted(requests, key=lambda r: r.arrival_time)
        i = 0
        for _ in range(max_steps):
            while i < len(pending) and pending[i].arrival_time <= self.clock:
                self.sched.add(pending[i])
                i += 1
            if not self.sched.has_unfinished():
                if i == len(pending):
                    return self
                self.clock = pending[i].arrival_time
                continue
            if on_step:
                on_step(self)
            decoding_before = [r for r in self.sched.running if r.num_tokens_to_compute == 1]
            plan = self.sched.schedule(self.sig)
            ctx = sum(r.num_computed_tokens + 1 for r in plan.decodes)
            dt = true_step_s(len(plan.decodes), plan.num_prefill_tokens, ctx, self.sig)
            self.steps.append((plan, decoding_before, plan.predicted_s,
                               getattr(self.policy, "last_slack_s", None), dt))
            self.clock += dt
            self.policy.observe(plan, dt)
            for req in plan.decodes:
                req.num_computed_tokens += 1
                self._emit(req)
            for req, n in plan.prefills:
                req.num_computed_tokens += n
                if req.num_computed_tokens == req.num_tokens:
                    self._emit(req)
            self.clock += self.host_s
        raise AssertionError("simulation did not finish")

    def _emit(self, req):
        if req.first_token_time is None:
            req.first_token_time = self.clock
        else:
            self.itl.append((req, self.clock - req.last_token_time))
        req.last_token_time = self.clock
        req.output_token_ids.append(7)
        if len(req.output_token_ids) >= req.sampling.max_tokens:
            self.sched.finish(req, RequestStatus.FINISHED_LENGTH)
            self.done.append(req)


def trace(rate, n, seed=0, prompt_scale=1.0):
    """Poisson arrivals; long-tailed prompt (lognormal) and output lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        t += rng.expovariate(rate)
        p = int(min(1900, max(4, rng.lognormvariate(5.5, 0.9) * prompt_scale)))
        o = int(min(200, max(2, rng.lognormvariate(3.5, 0.8))))
        out.append(Request(f"r{k}", [1] * p, SamplingParams(max_tokens=o), arrival_time=t))
    return out


def slo(aware_or_blind, ec_aware=True, **kw):
    kw.setdefault("ttft_slo_s", 1.0)
    kw.setdefault("tpot_slo_s", 0.025)
    return SloAware(aware_or_blind, ec_aware=ec_aware, **kw)


def test_every_running_decode_is_scheduled_every_step(models):
    for policy in (slo(models[0]), slo(models[1], ec_aware=False), make_policy("budget-512"), make_policy("fifo")):
        sim = Sim(policy).run(trace(rate=12, n=80, seed=1))
        assert len(sim.done) == 80
        for plan, decoding_before, *_ in sim.steps:
            if not plan.preempted:
                assert {id(r) for r in plan.decodes} == {id(r) for r in decoding_before}, policy.name


def test_predicted_step_time_within_slo_whenever_a_decode_runs(models):
    policy = slo(models[0])
    sim = Sim(policy, ec_signature=EC_ON).run(trace(rate=10, n=120, seed=2))
    checked = 0
    for plan, decoding_before, predicted, slack, _ in sim.steps:
        if not plan.decodes:
            continue
        decode_only = models[0].predict(len(plan.decodes), 0, sum(r.num_computed_tokens for r in plan.decodes), EC_ON)
        if decode_only * policy.safety > slack:
            continue  # infeasible: even the decodes alone miss; nothing a budget can do
        checked += 1
        assert predicted <= slack, (len(plan.decodes), plan.num_prefill_tokens, predicted, slack)
    assert checked > 200
    # the model is exact here, so measured inter-token latency stays inside the TPOT SLO too
    assert max(x for _, x in sim.itl) <= 0.025 + 1e-9


def test_no_request_waits_forever_under_overload(models):
    # 4x more arrivals than the SLO lets through, and a TPOT SLO so tight that slack alone would never admit a
    # prefill once decodes run: aging still gives every request its chunks, and everyone finishes
    policy = slo(models[0], tpot_slo_s=0.004, ttft_slo_s=0.2, aging_steps=4, min_chunk=16)
    reqs = trace(rate=80, n=150, seed=3)
    sim = Sim(policy, max_num_seqs=32).run(reqs)
    assert len(sim.done) == 150 and all(r.first_token_time is not None for r in reqs)
    # bounded waiting: nobody waits longer than the whole backlog's service time at the minimum chunk
    steps_bound = sum(math.ceil(r.num_prompt_tokens / 16) + r.sampling.max_tokens for r in reqs) * 4
    longest = max(true_step_s(64, 2048 - 64, 64 * 2100, NO_EC), 0.05)
    assert max(r.first_token_time - r.arrival_time for r in reqs) <= steps_bound * longest
    # demoted (already late) requests were still served while others were waiting behind them
    late = [r for r in reqs if r.first_token_time - r.arrival_time > 0.2]
    assert late


def test_demoted_requests_go_behind_feasible_ones_but_age_to_the_front(models):
    policy = slo(models[0], ttft_slo_s=0.5, aging_steps=3)
    now = 10.0
    late = Request("late", [1] * 100, SamplingParams(), arrival_time=now - 5.0)
    fresh = [Request(f"f{k}", [1] * 100, SamplingParams(), arrival_time=now - 0.1 * k) for k in range(3)]
    order = policy.order([late] + fresh, now)
    assert [r.request_id for r in order] == ["f2", "f1", "f0", "late"]
    sched_plan = type("P", (), {"decodes": [], "prefills": [], "num_prefill_tokens": 0})
    for _ in range(3):  # three steps in which the demoted request got nothing
        policy.order([late] + fresh, now)
        policy._work_waits = True
        plan = sched_plan()
        plan.prefills = [(fresh[0], 16)]
        plan.num_prefill_tokens = 16
        policy.predict(plan, _ctx())
    assert policy.order([late] + fresh, now)[0] is late


def _ctx(decodes=(), sig=NO_EC, now=0.0, waiting=()):
    from spear_compile.serving.scheduler.base import StepContext
    return StepContext(now=now, decodes=list(decodes), waiting=list(waiting),
                       sum_context_len=sum(r.num_computed_tokens + 1 for r in decodes), ec_signature=sig,
                       max_num_tokens=TOKEN_BUCKETS[-1], token_buckets=TOKEN_BUCKETS)


def _decodes(n, now, since_last, ctx=500):
    out = []
    for k in range(n):
        r = Request(f"d{k}", [1] * ctx, SamplingParams(), arrival_time=0.0)
        r.num_computed_tokens = ctx
        r.output_token_ids = [3]
        r.last_token_time = now - since_last
        out.append(r)
    return out


def test_budget_shrinks_when_ecs_are_switched_on(models):
    aware, blind = models
    now = 5.0
    decs = _decodes(16, now, since_last=0.004)
    waiting = [Request("w", [1] * 4000, SamplingParams(), arrival_time=now)]
    p_aware = slo(aware)
    off = p_aware.prefill_budget(_ctx(decs, NO_EC, now, waiting))
    on = p_aware.prefill_budget(_ctx(decs, EC_ON, now, waiting))
    assert 0 < on < off
    p_blind = slo(blind, ec_aware=False)
    assert p_blind.prefill_budget(_ctx(decs, EC_ON, now, waiting)) == p_blind.prefill_budget(
        _ctx(decs, NO_EC, now, waiting))
    # predicted time of the chosen budget fits the slack; the next bucket up does not
    slack = 0.025 - 0.004
    assert aware.predict(16, on, p_aware.last_budget and _ctx(decs).sum_context_len, EC_ON) * 1.1 <= slack
    nxt = [b for b in TOKEN_BUCKETS if b > on + 16][0]
    assert aware.predict(16, nxt - 16, _ctx(decs).sum_context_len, EC_ON, nxt) * 1.1 > slack


def test_budget_follows_an_ec_switch_while_serving(models):
    policy = slo(models[0])
    budgets = {NO_EC: [], EC_ON: []}

    def switch(sim):
        sim.sig = EC_ON if int(sim.clock / 2.0) % 2 else NO_EC
        if sim.sched.running:
            budgets[sim.sig].append(policy.last_budget)

    sim = Sim(policy).run(trace(rate=14, n=150, seed=5), on_step=switch)
    assert len(sim.done) == 150
    assert max(x for _, x in sim.itl) <= 0.025 + 1e-9


def test_ec_aware_has_fewer_violations_than_ec_blind(models):
    aware, blind = models
    results = {}
    for name, policy in (("aware", slo(aware)), ("blind", slo(blind, ec_aware=False))):
        sim = Sim(policy, ec_signature=EC_ON, host_s=0.0005).run(trace(rate=80, n=200, seed=6))
        viol = sum(1 for _, x in sim.itl if x > 0.025 + 1e-9)
        tput = sum(len(r.output_token_ids) for r in sim.done) / sim.clock
        results[name] = (viol, tput, len(sim.itl))
    assert results["aware"][0] < results["blind"][0], results
    assert results["aware"][0] == 0
    assert results["blind"][0] > 0.01 * results["blind"][2]   # the blind model really under-predicts
    assert results["aware"][1] > 0.9 * results["blind"][1]    # at (about) equal throughput


def test_scheduling_work_per_step_is_linear_in_requests(models):
    policy = slo(models[0])
    counts = []

    def count(sim):
        counts.append((len(sim.sched.running) + len(sim.sched.waiting), policy.ops))

    Sim(policy, max_num_seqs=64).run(trace(rate=300, n=200, seed=7), on_step=count)
    per_step = [(n, b - a) for (n, a), (_, b) in zip(counts, counts[1:])]
    assert max(n for n, _ in per_step) >= 64
    for n, ops in per_step:
        assert ops <= 2 * n + 2 * len(TOKEN_BUCKETS) + 4, (n, ops)


def test_factory_and_validation(models):
    aware, blind = models
    assert make_policy("slo", cost_model=aware, tpot_slo_s=0.05).name == "slo"
    p = make_policy("slo-ec-blind", cost_model=aware, blind_cost_model=blind)
    assert p.name == "slo-ec-blind" and p.cost_model is blind and not p.ec_aware
    with pytest.raises(SpearError, match="cost model"):
        make_policy("slo")
    with pytest.raises(SpearError, match="unknown policy"):
        make_policy("slo-foo", cost_model=aware)
    with pytest.raises(SpearError, match="not fitted"):
        SloAware(StepCostModel())
    with pytest.raises(SpearError, match="tpot_slo_s"):
        SloAware(aware, tpot_slo_s=-1)


def test_partial_prefill_ttft_deadline_bounds_the_step_when_the_scheduler_provides_it(models):
    aware, _ = models
    now = 5.0
    decs = _decodes(4, now, since_last=0.0)                     # 25 ms of decode slack
    partial = Request("p", [1] * 600, SamplingParams(), arrival_time=now - 0.99)   # TTFT deadline in 10 ms
    partial.num_computed_tokens = 500                           # 100 tokens left: a ~5 ms step can finish it in time
    policy = slo(aware, ttft_slo_s=1.0)
    free = policy.prefill_budget(_ctx(decs, NO_EC, now))
    ctx = _ctx(decs, NO_EC, now)
    ctx.prefilling = [partial]
    bounded = policy.prefill_budget(ctx)
    assert 100 <= bounded < free
    kv = aware.context_feature(4, ctx.sum_context_len, 501, mixed=True)
    assert aware.predict(4, bounded, kv, NO_EC) * policy.safety <= 0.01 + 1e-9
    partial.arrival_time = now - 2.0                            # already late: it does not bound the step
    assert policy.prefill_budget(ctx) == free


def test_a_step_that_captured_a_graph_neither_corrects_the_model_nor_enters_the_log():
    """A mixed step's first run of its shapes also captures its CUDA graph (many times the step's cost, once): the
    engine flags it, and the policy keeps it out of the online correction and the predicted-vs-measured log."""
    aware, _ = fit_models(profile_samples(), DECODE_BUCKETS, TOKEN_BUCKETS, correction_alpha=0.5)
    policy = slo(aware)
    sim = Sim(policy)
    sim.sched.add(Request("a", [1] * 300, SamplingParams(max_tokens=4), arrival_time=0.0))
    plan = sim.sched.schedule(NO_EC)
    assert plan.num_prefill_tokens > 0 and plan.predicted_s
    policy.observe(plan, 20 * plan.predicted_s, captured=True)
    assert aware.corrections() == {} and len(policy.log.pairs) == 0
    for req, n in plan.prefills:
        req.num_computed_tokens += n
        req.output_token_ids.append(7)
    plan = sim.sched.schedule(NO_EC)
    policy.observe(plan, 2 * plan.predicted_s)   # an ordinary step: corrected and logged
    assert len(aware.corrections()) == 1 and len(policy.log.pairs) == 1


def test_every_observed_step_lands_however_long_the_policy_runs(models):
    """Thousands of steps through the real Scheduler, far past the policy's 256-entry bookkeeping bound, no plan kept
    after its step (as the engine: CPython then hands a freed plan's address, hence its id(), to a later one): every
    predicted step's observation lands in the log. Session 20: evicting entries by remembered ids dropped live
    entries whose plans had a reused id, depending on the memory layout."""
    policy = slo(models[0])
    clock = [0.0]
    sched = Scheduler(KVBlockManager(4096, 16), policy, max_num_seqs=64, max_num_tokens=TOKEN_BUCKETS[-1],
                      token_buckets=TOKEN_BUCKETS, clock=lambda: clock[0])
    pending = sorted(trace(rate=12, n=120, seed=5), key=lambda r: r.arrival_time)
    predicted = i = 0
    while i < len(pending) or sched.has_unfinished():
        while i < len(pending) and pending[i].arrival_time <= clock[0]:
            sched.add(pending[i])
            i += 1
        if not sched.has_unfinished():
            clock[0] = pending[i].arrival_time
            continue
        plan = sched.schedule(NO_EC)
        dt = true_step_s(len(plan.decodes), plan.num_prefill_tokens, 0, NO_EC)
        clock[0] += dt
        policy.observe(plan, dt)
        predicted += plan.predicted_s is not None
        for req in plan.decodes:
            req.num_computed_tokens += 1
            req.output_token_ids.append(7)
        for req, n in plan.prefills:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(7)
        for req in list(plan.decodes) + [r for r, _ in plan.prefills]:
            if len(req.output_token_ids) >= req.sampling.max_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
        del plan
    assert predicted > 1000
    assert len(policy.log.pairs) == predicted
    assert len(policy._pending) <= 256


def test_a_plan_is_priced_by_the_keys_its_chunks_read():
    """The policy's prediction of a plan gives the cost model each chunk's tokens before it: a chunk after a long
    context (its attention reads it) is predicted dearer than the same chunk from a prompt's start, and the
    observation that follows corrects the model at the same feature values."""
    samples = []
    for d in (0, 2, 8):
        for p in (16, 100, 300, 900):
            for before in (0, 1000):
                cells = p * (before + p)
                y = 3e-3 + 1.8e-5 * (d + p) + 1e-8 * cells
                samples.append(StepSample(StepShape(d, p, 0, 0, cells), NO_EC, y))
    aware, _ = fit_models(samples, DECODE_BUCKETS, TOKEN_BUCKETS, correction_alpha=0.0)
    policy = slo(aware)
    preds = []
    for before in (0, 1000):
        r = Request(f"r{before}", [1] * (before + 300), SamplingParams(), arrival_time=0.0)
        r.num_computed_tokens = before
        plan = type("P", (), {"decodes": [], "prefills": [(r, 300)], "num_prefill_tokens": 300})()
        preds.append(policy.predict(plan, _ctx()))
        assert policy._pending[id(plan)][1][5] == 300 * (before + 300)
    assert preds[1] > preds[0] * 1.1, preds

    # the budget: a partial prompt served first reads its computed tokens, so a slack the same chunk from a prompt's
    # start fits may not fit it (the rest of a budget past its prompt is priced as a chunk from a start)
    now = 5.0
    decs = _decodes(8, now, since_last=0.008)
    budgets = []
    for before in (0, 1000):
        r = Request(f"p{before}", [1] * (before + 1500), SamplingParams(), arrival_time=now)
        r.num_computed_tokens = before
        c = _ctx(decs, NO_EC, now)
        c.prefilling = [r]
        budgets.append(slo(aware).prefill_budget(c))
    assert 0 < budgets[1] < budgets[0], budgets


def test_a_step_the_engine_would_pad_is_priced_at_the_padded_graph():
    """When the engine says a step would replay a captured graph of larger dims (``StepContext.run_dims``: its
    tokens and padded prefill attention work), the policy prices the step there: the plan's prediction and the cost
    model's correction use those dims, and a budget whose padded step no longer fits the slack shrinks."""
    samples = []
    for d in (0, 2, 8):
        for p in (16, 100, 300, 900):
            for before in (0, 1000):
                cells = p * (before + p)
                samples.append(StepSample(StepShape(d, p, 0, 0, cells), NO_EC,
                                          3e-3 + 1.8e-5 * (d + p) + 1e-8 * cells))
    aware, _ = fit_models(samples, DECODE_BUCKETS, TOKEN_BUCKETS, correction_alpha=0.0)
    calls = []

    def run_dims(num_decodes, decode_tokens, chunks):   # every step pads to 4x its own attention work
        calls.append((num_decodes, decode_tokens, list(chunks)))
        return 0, 4 * sum(n * (c + n) for c, n, _ in chunks)

    r = Request("r", [1] * 300, SamplingParams(), arrival_time=0.0)
    plan = type("P", (), {"decodes": [], "prefills": [(r, 300)], "num_prefill_tokens": 300})()
    own = slo(aware).predict(plan, _ctx())
    ctx = _ctx()
    ctx.run_dims = run_dims
    policy = slo(aware)
    padded = policy.predict(plan, ctx)
    assert policy._pending[id(plan)][1][5] == 4 * 300 * 300 and padded > own * 1.1
    assert calls[-1] == (0, 0, [(0, 300, True)])

    now = 5.0
    decs = _decodes(8, now, since_last=0.008)
    budgets = []
    for hook in (None, run_dims):
        c = _ctx(decs, NO_EC, now, waiting=[Request("w", [1] * 1800, SamplingParams(), arrival_time=now)])
        c.run_dims = hook
        budgets.append(slo(aware).prefill_budget(c))
    assert 0 < budgets[1] < budgets[0], budgets
    assert calls[-1][:2] == (8, 501)   # the decodes' longest context with this step's token

    # a covering graph of a larger token bucket (``EngineConfig.mixed_graph_bucket_padding``): priced at its tokens
    ctx = _ctx()
    ctx.run_dims = lambda nd, dt, chunks: (1024, 300 * 300)
    policy = slo(aware)
    bigger = policy.predict(plan, ctx)
    assert policy._pending[id(plan)][1][4:] == (1024, 300 * 300) and bigger > own * 1.2, (bigger, own)



def test_the_safety_factor_learns_the_mixed_steps_error_tail(models):
    """``safety_now`` becomes the 95th percentile of measured / predicted time over recent mixed steps (never below
    ``safety``): 10 % of steps 1.4x slower than predicted lift it to 1.4, and a budget whose step fitted the slack at
    1.1 no longer does. Decode-only steps and steps that captured a graph do not count; ``safety_quantile=0``
    keeps the factor fixed."""
    aware, _ = models
    r = Request("r", [1] * 300, SamplingParams(), arrival_time=0.0)

    def feed(policy, ratios, p=300, captured=False):
        for ratio in ratios:
            plan = type("P", (), {"decodes": [], "prefills": [(r, p)] if p else [], "num_prefill_tokens": p})()
            if not p:
                plan.decodes = _decodes(1, 0.0, 0.0)
            pred = policy.predict(plan, _ctx())
            policy.observe(plan, pred * ratio, captured=captured)

    tail = [1.0] * 9 + [1.4]
    learned, fixed = slo(aware), slo(aware, safety_quantile=0.0)
    feed(learned, tail * 4, p=0)                 # decode-only steps
    feed(learned, tail * 4, captured=True)       # steps that captured their graph
    assert learned.safety_now == learned.safety == 1.1
    for policy in (learned, fixed):
        feed(policy, tail * 7)
    assert learned.safety_now == pytest.approx(1.4) and fixed.safety_now == 1.1
    feed(learned, [0.5] * 256)                   # a model that now over-predicts: back to the floor
    assert learned.safety_now == 1.1
    feed(learned, tail * 26)

    now = 5.0
    decs = _decodes(8, now, since_last=0.0)
    probe = slo(aware)
    c = _ctx(decs, NO_EC, now, waiting=[Request("w", [1] * 1800, SamplingParams(), arrival_time=now)])
    room = probe.cost_model.prefill_room(8, 256)
    step = probe._predict(8, room, probe.cost_model.context_feature(8, c.sum_context_len, 501, mixed=True,
                                                                      num_prefill_tokens=room), NO_EC, 256)
    budgets = []
    for policy in (fixed, learned):              # a slack the 256-token step fits at 1.1x, not at 1.4x
        policy.tpot_slo_s = step * 1.25
        budgets.append(policy.prefill_budget(_ctx(decs, NO_EC, now, waiting=c.waiting)))
    assert budgets[0] == room and 0 < budgets[1] < room, budgets
    with pytest.raises(SpearError, match="safety_quantile"):
        slo(aware, safety_quantile=1.0)


def test_a_budget_filled_with_several_prompts_keeps_each_step_inside_the_slack():
    """The budget is priced as one chunk; the scheduler fills it with several short prompts, which the engine runs
    in a graph padded to the longest chunk and a power-of-two chunk count (``run_dims``). Each chunk after the
    first joins only if the step priced at its actual chunks fits (``SloAware.admit``): every step with decodes is
    predicted inside its slack. Without the check (the base ``Policy.admit``), some are not."""
    from spear_compile.serving.scheduler.base import Policy
    samples = []
    for d in (0, 2, 8, 32, 64):
        for p in (16, 100, 300, 900, 1900):
            for before in (0, 1000):
                cells = p * (before + p)
                samples.append(StepSample(StepShape(d, p, 0, 0, cells), NO_EC,
                                          3e-3 + 1.8e-5 * (d + p) + 1e-8 * cells))
    aware, _ = fit_models(samples, DECODE_BUCKETS, TOKEN_BUCKETS, correction_alpha=0.0)

    def run_dims(num_decodes, decode_tokens, chunks):   # chunk count, length and keys padded to graph dims
        rows = 1 << (len(chunks) - 1).bit_length()
        pad = lambda x: max(256, 1 << (x - 1).bit_length())  # noqa: E731
        return 0, rows * pad(max(n for _, n, _ in chunks)) * pad(max(c + n for c, n, _ in chunks))

    class NoAdmitCheck(SloAware):
        admit = Policy.admit

    over = {}
    for cls in (SloAware, NoAdmitCheck):
        policy = cls(aware, ttft_slo_s=1.0, tpot_slo_s=0.012)
        sim = Sim(policy)
        sim.sched.run_dims = run_dims
        sim.run(trace(rate=100, n=200, seed=5, prompt_scale=0.3))
        over[cls.__name__] = checked = 0
        for plan, _, predicted, slack, _ in sim.steps:
            if plan.decodes and len(plan.prefills) > 1 and slack is not None and math.isfinite(slack):
                checked += 1
                over[cls.__name__] += predicted > slack - policy.overhead_s + 1e-12
        assert checked > 20, (cls.__name__, checked)
        assert len(sim.done) == 200
    assert over["SloAware"] == 0 and over["NoAdmitCheck"] > 0, over
