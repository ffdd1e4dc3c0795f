"""Overlapped decode (``EngineConfig.overlap_decode``): the same outputs as the engine one step at a time, with steps
launched ahead of their read-back; requests ending on a token or stop string nobody could foresee (their next step is
already launched), on max_tokens, aborted mid-run or arriving mid-run; stand-in decode graphs, so the device-side id
copy into the captured input buffer runs; every KV block free after."""
import torch

from spear_compile.serving import SamplingParams

from .conftest import make_engine, toy_model

LENS = (5, 13, 3, 9, 21, 7)


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 8000, (n,), generator=g).tolist() for n in LENS]


def run(engine, samplings, abort_at=None, late=None):
    """Add requests (``late``: (step, prompt, sampling) added while others decode), step to the end; returns each
    request's final (tokens, text, finish reason) in id order, the aborted one included."""
    ids = [engine.add_request(p, s, request_id=f"r{i}") for i, (p, s) in enumerate(zip(prompts(), samplings))]
    final, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = (out.output_token_ids, out.text, out.finish_reason)
            assert -1 not in out.output_token_ids and -1 not in out.new_token_ids
        steps += 1
        if abort_at is not None and steps == abort_at:
            engine.abort_request("r1")
        if late is not None and steps == late[0]:
            ids.append(engine.add_request(late[1], late[2], request_id="late"))
    assert engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks
    return [final[i] for i in ids]


def engines(ref_tokenizer, **kw):
    model = toy_model()
    base = dict(cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=8, max_num_tokens=64, detokenize=True)
    base.update(kw)
    return (make_engine(model, ref_tokenizer, **base),
            make_engine(model, ref_tokenizer, overlap_decode=True, **base))


def test_overlap_equals_one_step_at_a_time(ref_tokenizer):
    sync, over = engines(ref_tokenizer)
    greedy = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (20, 7, 33, 1, 12, 25)]
    ref = run(sync, greedy)
    # stop on tokens / a string that the reference produced mid-way: unknown until read back, one step late
    stop_tok = ref[2][0][10]
    stop_str = ref[4][1][len(ref[4][1]) // 2:][:3].strip() or ref[4][1][-2:]
    samplings = list(greedy)
    samplings[2] = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok])
    samplings[4] = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop_str])
    sync2, over2 = engines(ref_tokenizer)
    want = run(sync2, samplings)
    assert want[2][2] == "stop" and len(want[2][0]) <= 11
    got = run(over2, samplings)
    assert got == want
    assert over2.overlap.num_launched > 20          # most decode steps overlapped
    assert run(over, greedy) == ref


def test_overlap_with_abort_and_late_arrival(ref_tokenizer):
    sync, over = engines(ref_tokenizer, max_num_seqs=4)   # 6 requests over 4 slots: admissions as others finish
    samplings = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (15, 40, 9, 30, 11, 18)]
    late = (6, [7, 8, 9, 10], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    want = run(sync, samplings, abort_at=5, late=late)
    got = run(over, samplings, abort_at=5, late=late)
    assert [w[2] for w in want][1] == "abort"
    # the aborted request's tokens depend on when the abort lands relative to the steps in flight; all others equal
    assert got[:1] + got[2:] == want[:1] + want[2:] and got[1][2] == "abort"
    assert over.overlap.num_launched > 0


def test_overlap_falls_back_for_sampled_requests(ref_tokenizer):
    """A non-greedy request runs the one-step-at-a-time path (its sampler needs the host), with the same tokens."""
    sync, over = engines(ref_tokenizer)
    samplings = [SamplingParams(max_tokens=8, temperature=0.8, seed=5 + i, ignore_eos=True) for i in range(len(LENS))]
    assert run(over, samplings) == run(sync, samplings)
    assert over.overlap.num_launched == 0


def test_overlap_while_requests_wait_for_a_full_batch(ref_tokenizer):
    """Requests queued behind a full batch: decode steps still overlap (nobody can be admitted); each admission,
    once a request ends, runs one step at a time; outputs equal."""
    sync, over = engines(ref_tokenizer, max_num_seqs=2)
    samplings = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 6, 20, 9, 3, 17)]
    want = run(sync, samplings)
    got = run(over, samplings)
    assert got == want
    assert over.overlap.num_launched > 25   # most of the ~40 decode steps (2 slots), though requests wait in most


def test_overlap_with_chunked_prefills_and_preemption(ref_tokenizer):
    """Prefill chunks (prompts longer than the 16-token budget) overlapped alongside decodes, then a KV cache so
    small that requests are preempted and recomputed: outputs still equal one step at a time."""
    long_prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((40, 3, 25, 18, 33))]
    samplings = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 30, 8, 21, 15)]
    for blocks in (64, 12):   # 12 blocks of 8 tokens: not enough for all five at once -> preemption
        sync, over = engines(ref_tokenizer, max_num_seqs=4, policy="budget-16", num_blocks=blocks)
        outs = []
        for eng in (sync, over):
            ids = [eng.add_request(p, s) for p, s in zip(long_prompts, samplings)]
            final = {}
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        final[o.request_id] = o.output_token_ids
            outs.append([final[i] for i in ids])
            assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
        assert outs[1] == outs[0]
        assert over.overlap.num_launched > 20
        if blocks == 12:
            assert sync.num_preemptions > 0 and over.num_preemptions > 0


def test_overlap_measured_step_time_is_one_step(ref_tokenizer):
    """The step log's measured times (the SLO policy's online correction reads them) add up to the wall time, not
    twice it, although each step is read back one step late."""
    import time
    _, over = engines(ref_tokenizer)
    for i in range(4):
        over.add_request([5 + i, 6, 7, 8], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    over.step()
    first = len(over.step_log)
    t0 = time.perf_counter()
    while over.has_unfinished():
        over.step()
    wall = time.perf_counter() - t0
    assert 0.3 < sum(r.measured_s for r in list(over.step_log)[first:]) / wall < 1.3


def test_overlap_read_back_failure_keeps_the_launched_step(ref_tokenizer):
    """A read-back that raises once (a detokenizer error) after the next step was launched: that step's placeholders
    are still filled later, nothing reaches the model as -1, and both requests end normally."""
    import warnings

    import spear_compile.serving.detokenizer as detokenizer
    _, over = engines(ref_tokenizer)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    over.add_request([5, 6, 7, 8], sp, request_id="a")
    over.add_request([9, 10, 11], sp, request_id="b")
    real, calls = detokenizer.IncrementalDetokenizer.add, [0]

    def flaky(self, token):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("transient")
        return real(self, token)
    detokenizer.IncrementalDetokenizer.add = flaky
    final = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while over.has_unfinished():
                try:
                    for o in over.step():
                        if o.finished:
                            final[o.request_id] = o.finish_reason
                except RuntimeError:
                    pass
    finally:
        detokenizer.IncrementalDetokenizer.add = real
    assert final == {"a": "length", "b": "length"}, (final, over.last_error)


def test_overlap_with_prefix_caching(ref_tokenizer):
    """Shared-prefix prompts arriving while others decode, with prefix caching, overlapped vs one step at a time
    without caching: the same tokens; the overlapped engine still overlaps and its cache hits (blocks holding an
    overlapped step's unknown token are named only once it is read back)."""
    stem = list(range(100, 140))
    ps = [stem + [1, 2], stem[:37] + [3], list(range(200, 211)), stem + [4, 5, 6]]
    samplings = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 9, 20, 6)]
    sync, _ = engines(ref_tokenizer, max_num_seqs=4, policy="budget-16", num_blocks=64, block_size=4)
    _, over = engines(ref_tokenizer, max_num_seqs=4, policy="budget-16", num_blocks=64, block_size=4,
                      enable_prefix_caching=True)
    outs = []
    for eng in (sync, over):
        eng.generate(ps[:1], samplings[:1])
        outs.append([o.output_token_ids for o in eng.generate(ps[1:], samplings[1:])])
        assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    assert outs[1] == outs[0]
    assert over.overlap.num_launched > 10 and over.stats().prefix_cache_hit_tokens >= 36 + 40
