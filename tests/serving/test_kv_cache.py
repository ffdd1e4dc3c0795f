"""Block bookkeeping and the continuous-batching scheduler on plain Request objects (no model)."""
import pytest

from spear_compile.errors import SpearError
from spear_compile.serving.kv_cache import PAD_BLOCK, KVBlockManager
from spear_compile.serving.request import Request, RequestStatus, SamplingParams
from spear_compile.serving.scheduler import FifoNoChunk, Scheduler, TokenBudget, make_policy


def req(i, n, arrival=None):
    return Request(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=100), float(i if arrival is None else arrival))


def test_allocate_free_accounting():
    m = KVBlockManager(num_blocks=9, block_size=4)
    assert m.num_free_blocks == 8 and m.num_usable_blocks == 8
    r = req(0, 10)
    assert m.blocks_needed(r, 10) == 3
    assert m.allocate(r, 10) and len(r.block_ids) == 3 and PAD_BLOCK not in r.block_ids
    r.num_computed_tokens = 10
    assert m.blocks_needed(r, 2) == 0 and m.blocks_needed(r, 3) == 1
    big = req(1, 100)
    assert not m.allocate(big, 100) and big.block_ids == [] and m.num_free_blocks == 5   # no partial change
    m.free(r)
    assert r.block_ids == [] and m.num_free_blocks == 8
    with pytest.raises(SpearError, match="num_blocks"):
        KVBlockManager(1, 4)
    with pytest.raises(SpearError, match="block_size"):
        KVBlockManager(4, 0)


def run_step(s, plan, sampled_token=7):
    """Apply a plan as the engine would: tokens computed; a request whose tokens are all computed gets a new one."""
    for r in plan.decodes:
        r.num_computed_tokens += 1
        r.output_token_ids.append(sampled_token)
    for r, n in plan.prefills:
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(sampled_token)


def check_blocks(s):
    held = [b for r in s.running for b in r.block_ids]
    assert len(held) == len(set(held))                                      # no block held twice
    assert len(held) + s.blocks.num_free_blocks == s.blocks.num_usable_blocks
    for r in s.running:                                                     # each holds what its cache needs
        assert len(r.block_ids) * s.blocks.block_size >= r.num_computed_tokens
    for r in s.waiting:
        assert r.block_ids == [] and r.num_computed_tokens == 0


def test_stall_free_decodes_and_chunked_prefill():
    s = Scheduler(KVBlockManager(200, 4), TokenBudget(16), max_num_seqs=8, max_num_tokens=32)
    a = req(0, 10)
    s.add(a)
    plan = s.schedule()
    assert plan.prefills == [(a, 10)]
    run_step(s, plan)
    s.add(req(1, 50))
    for _ in range(5):  # a decodes every step while the long prompt prefills in chunks of at most 16 - 1
        plan = s.schedule()
        assert plan.decodes[:1] == [a]   # (a prompt with one token left to compute counts as a decode too)
        assert plan.num_tokens <= 16 and plan.num_prefill_tokens <= 15
        run_step(s, plan)
        check_blocks(s)


def test_preemption_newest_first_and_recompute():
    blocks = KVBlockManager(5, 4)                 # 4 usable blocks: 16 tokens
    s = Scheduler(blocks, TokenBudget(64), max_num_seqs=4, max_num_tokens=64)
    old, new = req(0, 7), req(1, 7)
    s.add(old), s.add(new)
    plan = s.schedule()
    assert [r for r, _ in plan.prefills] == [old, new]
    run_step(s, plan)                             # both at 7 computed tokens + 1 sampled: 2 blocks each, full
    plan = s.schedule()                           # both need an 8th slot: fits (2 blocks of 4 = 8)
    assert plan.decodes == [old, new]
    run_step(s, plan)
    plan = s.schedule()                           # 9th slot: a third block each; only one can have it
    assert plan.decodes == [old] and plan.preempted == [new]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0 and new.block_ids == []
    assert s.waiting[0] is new and new.num_preemptions == 1
    check_blocks(s)
    run_step(s, plan)
    s.finish(old, RequestStatus.FINISHED_LENGTH)
    plan = s.schedule()                           # recompute: prompt + outputs so far, as one prefill
    assert plan.prefills == [(new, new.num_tokens)]
    check_blocks(s)


def test_admission_by_free_blocks_and_max_num_seqs():
    s = Scheduler(KVBlockManager(4, 4), FifoNoChunk(), max_num_seqs=2, max_num_tokens=64)
    for i in range(3):
        s.add(req(i, 4))
    assert not s.slots_full                                                # nothing running yet
    plan = s.schedule()
    assert len(plan.prefills) == 2 and len(s.waiting) == 1                # max_num_seqs
    assert s.slots_full                                                    # both slots taken, one waiting
    s2 = Scheduler(KVBlockManager(3, 4), FifoNoChunk(), max_num_seqs=8, max_num_tokens=64)
    s2.add(req(0, 8)), s2.add(req(1, 8))
    plan = s2.schedule()
    assert not s2.slots_full                                               # blocks, not slots, held it
    assert [r.request_id for r, _ in plan.prefills] == ["0"] and len(s2.waiting) == 1   # blocks


def test_abort_frees_and_finish():
    s = Scheduler(KVBlockManager(20, 4), TokenBudget(32), max_num_seqs=4, max_num_tokens=32)
    a, b = req(0, 9), req(1, 5)
    s.add(a), s.add(b)
    run_step(s, s.schedule())
    assert s.abort("0") is a and a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert s.abort("nope") is None
    s.finish(b, RequestStatus.FINISHED_STOPPED)
    assert not s.has_unfinished() and s.blocks.num_free_blocks == s.blocks.num_usable_blocks


def test_no_deadlock_when_partial_prefills_hold_every_block():
    s = Scheduler(KVBlockManager(5, 4), TokenBudget(8), max_num_seqs=4, max_num_tokens=8)
    a, b = req(0, 14), req(1, 14)
    s.add(a), s.add(b)
    for _ in range(40):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        assert not plan.is_empty
        run_step(s, plan)
        check_blocks(s)
        for r in list(s.running):
            if len(r.output_token_ids) >= 1:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
    assert not s.has_unfinished()


def test_make_policy():
    assert make_policy("fifo").chunked is False
    p = make_policy("budget-512")
    assert isinstance(p, TokenBudget) and p.n == 512 and p.name == "budget-512"
    for bad in ("budget-0", "budget-x", "nope", 3):
        with pytest.raises(SpearError):
            make_policy(bad)


# ---- prefix caching ---------------------------------------------------------------------------------------------
def computed(m, r, n=None):
    """``r`` holds blocks for its tokens and has computed ``n`` of them (all by default), then names them."""
    n = r.num_tokens if n is None else n
    assert m.allocate(r, n - r.num_computed_tokens)
    r.num_computed_tokens = n
    m.commit(r)


def test_prefix_blocks_are_shared_counted_and_kept_after_free():
    m = KVBlockManager(num_blocks=13, block_size=4, prefix_caching=True)
    a = Request("a", list(range(1, 11)), SamplingParams(), 0.0)           # 10 tokens: 2 full blocks + 2
    assert m.match_prefix(a) == 0
    computed(m, a)
    assert m.num_cached_blocks == 2 and m.num_free_blocks == 12 - 3
    b = Request("b", list(range(1, 9)) + [50, 51, 52], SamplingParams(), 1.0)   # shares a's first 2 blocks
    assert m.match_prefix(b) == 8 and b.block_ids == a.block_ids[:2] and b.num_computed_tokens == 8
    assert m.num_free_blocks == 9                                           # shared: nothing new taken
    m.free(a)
    assert m.num_free_blocks == 10                                          # a's private tail block only
    m.free(b)
    assert m.num_free_blocks == 12 and m.num_cached_blocks == 2             # free, but still named
    c = Request("c", list(range(1, 9)), SamplingParams(), 2.0)              # exactly 2 blocks: the last one recomputed
    assert m.match_prefix(c) == 4 and c.num_tokens_to_compute == 4
    d = Request("d", [9] + list(range(2, 12)), SamplingParams(), 3.0)       # differs in token 0: the chain differs
    assert m.match_prefix(d) == 0 and d.block_ids == []
    assert m.num_cached_tokens == 12


def test_reuse_evicts_names_and_reset_forgets():
    m = KVBlockManager(num_blocks=4, block_size=2, prefix_caching=True)    # 3 usable blocks
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), 0.0)
    m.match_prefix(a)
    computed(m, a)
    m.free(a)
    assert m.num_cached_blocks == 2
    big = Request("big", list(range(10, 16)), SamplingParams(), 1.0)       # needs all 3 blocks: evicts both names
    assert m.match_prefix(big) == 0
    assert m.allocate(big, 6) and m.num_cached_blocks == 0
    m.free(big)
    again = Request("again", [1, 2, 3, 4, 5], SamplingParams(), 2.0)
    assert m.match_prefix(again) == 0                                        # the KV was overwritten: no false hit
    computed(m, again)
    m.reset_prefix_cache()
    assert m.num_cached_blocks == 0
    m.commit(again)                                                         # admitted before the reset: names nothing
    assert m.num_cached_blocks == 0
    m.free(again)
    late = Request("late", [1, 2, 3, 4, 5], SamplingParams(), 3.0)
    assert m.match_prefix(late) == 0


def test_pending_tokens_are_not_named():
    m = KVBlockManager(num_blocks=8, block_size=2, prefix_caching=True)
    r = Request("r", [1, 2, 3], SamplingParams(), 0.0)
    m.match_prefix(r)
    computed(m, r)
    r.output_token_ids.append(-1)                                           # an overlapped step's token, unknown
    computed(m, r, 4)
    assert len(r.block_hashes) == 1
    r.output_token_ids[-1] = 7
    m.commit(r)
    assert len(r.block_hashes) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scheduler_with_prefix_caching_keeps_its_invariants(seed):
    """Random shared-prefix requests through the scheduler with few blocks (preemptions, evictions): no block held
    twice by one request, refcounts equal the holders, a request's cached blocks hold exactly its tokens' chain,
    everyone finishes, every block free at the end."""
    import random
    rnd = random.Random(seed)
    blocks = KVBlockManager(24, 4, prefix_caching=True)
    s = Scheduler(blocks, TokenBudget(16), max_num_seqs=4, max_num_tokens=16)
    stems = [[rnd.randrange(1, 50) for _ in range(rnd.randrange(4, 14))] for _ in range(3)]
    reqs = []
    for i in range(12):
        prompt = rnd.choice(stems) + [rnd.randrange(1, 50) for _ in range(rnd.randrange(1, 6))]
        r = Request(str(i), prompt, SamplingParams(max_tokens=rnd.randrange(1, 8)), float(i))
        reqs.append(r)
        s.add(r)
    for _ in range(400):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        run_step(s, plan, sampled_token=rnd.randrange(1, 50))
        holders = {}
        for r in s.running:
            assert len(r.block_ids) == len(set(r.block_ids))
            for b in r.block_ids:
                holders[b] = holders.get(b, 0) + 1
        assert all(blocks._refs[b] == n for b, n in holders.items())
        for r in s.running:  # a named block a request holds carries that request's own chain at that position
            for i, h in enumerate(r.block_hashes):
                assert blocks._name.get(r.block_ids[i], h) == h
        assert len(holders) + blocks.num_free_blocks == blocks.num_usable_blocks
        for r in list(s.running):
            if len(r.output_token_ids) >= r.sampling.max_tokens and r.num_computed_tokens == r.num_tokens - 1:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
    assert not s.has_unfinished()
    assert blocks.num_free_blocks == blocks.num_usable_blocks and blocks.num_cached_tokens > 0


def test_chunks_leave_room_for_padded_decode_rows():
    """With the engine's largest decode bucket (``max_decode_rows``), a budget-filling chunk leaves room for the
    decode rows padded to their bucket, so the step runs at that bucket; without it, room for the decodes only."""
    from spear_compile.serving.buckets import mixed_decode_rows
    for hooked, chunk in ((False, 59), (True, 56)):
        s = Scheduler(KVBlockManager(400, 4), TokenBudget(64), max_num_seqs=8, max_num_tokens=64,
                      max_decode_rows=8 if hooked else None)
        for i in range(5):   # five requests past their prompts: decoding
            r = Request(f"d{i}", [1, 2, 3], SamplingParams(max_tokens=50), arrival_time=float(i))
            s.add(r)
        first = s.schedule()
        for r, n in first.prefills:
            r.num_computed_tokens += n
            r.output_token_ids.append(7)
        s.add(Request("long", list(range(1, 200)), SamplingParams(max_tokens=4), arrival_time=9.0))
        plan = s.schedule()
        assert len(plan.decodes) == 5 and plan.prefills[0][1] == chunk, (hooked, plan.prefills)
        assert mixed_decode_rows(5, chunk, 8, 64) == (8 if hooked else 5)
