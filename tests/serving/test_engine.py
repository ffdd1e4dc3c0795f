"""The engine against Hugging Face eager ``generate`` on the bundled spear-ref-16m (W4 per-channel RTN, with and
without random gated ECs), on CPU: greedy tokens per request of a mixed batch of prompt lengths, under chunked
prefill, whole-prompt prefill and preemption; blocks all free afterwards; abort, stop strings / tokens, seeds."""
import copy

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.quant.weight import QuantizedWeight
from spear_compile.serving import SamplingParams

from .conftest import make_engine, quantized_ref

PROMPT_LENS = (5, 23, 40, 9)
NEW = 6


def prompts(lens=PROMPT_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 8000, (n,), generator=g).tolist() for n in lens]


def dequantized(model):
    """The same model with each ``QuantizedWeight`` replaced by its dequantized float tensor: what ``spear::qlinear``
    multiplies by (dequantize in the activation dtype, then F.linear), so eager HF runs it without the per-call unpack."""
    model = copy.deepcopy(model)
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, QuantizedWeight):
            mod.weight = torch.nn.Parameter(w.dequantize(torch.float32), requires_grad=False)
    return model


_REF = {}


def hf_greedy(ecs: bool, ec_off: bool = False, new=NEW):
    """HF eager ``generate`` greedy tokens of each prompt, one prompt at a time (no padding)."""
    key = (ecs, ec_off, new)
    if key not in _REF:
        model = dequantized(quantized_ref(ecs))
        if ec_off:
            for mod in model.modules():
                if hasattr(mod, "ec_B"):
                    mod.ec_B.data.zero_()  # the EC adds B(...) = 0: the base linear alone
        out = []
        with torch.no_grad():
            for p in prompts():
                ids = model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
                out.append(ids[0, len(p):].tolist())
        _REF[key] = out
    return _REF[key]


def greedy(max_tokens=NEW, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_dequantized_reference_is_the_quantized_model():
    q = quantized_ref(ecs=True)
    ids = torch.tensor([prompts()[1]])
    with torch.no_grad():
        a, b = q(ids).logits, dequantized(q)(ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ecs", [False, True], ids=["w4", "w4+ec"])
def test_greedy_equals_hf_generate_chunked(ecs, ref_tokenizer):
    """Budget 16 tokens a step, 4-token blocks: the 23- and 40-token prompts prefill in chunks beside decodes."""
    eng = make_engine(quantized_ref(ecs), ref_tokenizer, policy="budget-16", block_size=4, max_num_tokens=32)
    outs = eng.generate(prompts(), greedy())
    assert [o.output_token_ids for o in outs] == hf_greedy(ecs)
    assert all(o.finish_reason == "length" for o in outs)
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    chunked = [r for r in eng.step_log if r.num_decodes and r.num_prefill_tokens]
    assert chunked, "no step mixed decodes with a prefill chunk"
    assert eng.stats().recompiles == 0


def test_triton_decode_attention_same_tokens(ref_tokenizer, monkeypatch):
    """``decode_attention="triton"``: the paged decode-attention kernel (Triton interpreter on CPU) for every decode
    row, chunked prefills beside them, 4-token blocks: the greedy tokens still equal HF eager ``generate``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eng = make_engine(quantized_ref(True), ref_tokenizer, policy="budget-16", block_size=4, max_num_tokens=32,
                      decode_attention="triton")
    assert eng.runner.net.decode_attention == "triton"
    assert [o.output_token_ids for o in eng.generate(prompts(), greedy())] == hf_greedy(True)
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_unquantized_siblings_run_merged_same_tokens(ref_tokenizer):
    """A plain float model (the bf16 baseline's path): q|k|v and gate|up each run as one GEMM on a merged weight
    whose rows the modules' own weights now view (no memory added); tokens equal HF eager ``generate`` before and
    after; a quantized model keeps its linears apart."""
    from transformers import AutoModelForCausalLM
    from .conftest import MODEL_PATH
    model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):]
               .tolist() for p in prompts()]
    eng = make_engine(model, ref_tokenizer, policy="budget-16", block_size=4, max_num_tokens=32)
    net = eng.runner.net
    assert all(m is not None for m in net.merged_qkv + net.merged_gate_up)
    attn = model.model.layers[0].self_attn
    w = net.merged_qkv[0][0]
    assert attn.k_proj.weight.data_ptr() == w.data_ptr() + attn.q_proj.out_features * w.shape[1] * w.element_size()
    assert [o.output_token_ids for o in eng.generate(prompts(), greedy())] == ref
    with torch.no_grad():
        again = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):]
                 .tolist() for p in prompts()]
    assert again == ref
    q = make_engine(quantized_ref(), ref_tokenizer).runner.net
    assert all(m is None for m in q.merged_qkv + q.merged_gate_up)


def test_whole_prompt_policy_same_tokens(ref_tokenizer):
    eng = make_engine(quantized_ref(), ref_tokenizer, policy="fifo", max_num_tokens=64)
    chunks = []
    schedule = eng.scheduler.schedule

    def recording(sig):
        plan = schedule(sig)
        chunks.extend((r.num_computed_tokens, n, r.num_tokens) for r, n in plan.prefills)
        return plan
    eng.scheduler.schedule = recording
    outs = eng.generate(prompts(), greedy())
    assert [o.output_token_ids for o in outs] == hf_greedy(False)
    assert sorted(n for _, n, _ in chunks) == sorted(PROMPT_LENS)
    assert all(start == 0 and n == total for start, n, total in chunks)  # whole prompts, one step each


def test_preemption_by_recompute_same_tokens(ref_tokenizer):
    """11 usable blocks of 4 tokens (44 tokens) for prompts of 5, 23 and 9 tokens + 6 new ones each (55 tokens):
    requests get preempted and recomputed."""
    eng = make_engine(quantized_ref(), ref_tokenizer, policy="budget-32", block_size=4, num_blocks=12,
                      max_num_tokens=32)
    keep = [0, 1, 3]
    outs = eng.generate([prompts()[i] for i in keep], greedy())
    assert eng.num_preemptions > 0
    assert [o.output_token_ids for o in outs] == [hf_greedy(False)[i] for i in keep]
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_ec_switch_while_serving(ref_tokenizer):
    with pytest.raises(SpearError, match="ec_switch=True"):   # only the steps with ECs were compiled
        make_engine(quantized_ref(True), ref_tokenizer, policy="budget-16").set_ec_enabled(False)
    eng = make_engine(quantized_ref(True), ref_tokenizer, policy="budget-16", ec_switch=True)
    assert eng.ec_enabled
    ids = [eng.add_request(p, greedy()) for p in prompts()[:2]]
    eng.step()
    eng.set_ec_enabled(False)  # the requests in flight go on without ECs; new ones start without
    outs = eng.generate(prompts()[2:], greedy())
    assert [o.output_token_ids for o in outs] == hf_greedy(True, ec_off=True)[2:]
    assert not eng.has_unfinished() and ids
    with pytest.raises(SpearError, match="no ECs"):
        make_engine(quantized_ref(), ref_tokenizer).set_ec_enabled(True)
    assert hf_greedy(True) != hf_greedy(True, ec_off=True)  # the ECs change the tokens: the switch is visible


def test_abort_frees_blocks(toy_engine):
    eng = toy_engine
    ids = [eng.add_request(p, greedy(max_tokens=12)) for p in prompts()]
    for _ in range(3):
        eng.step()
    assert eng.blocks.num_used_blocks > 0
    eng.abort_request(ids[0])
    eng.abort_request("no-such-request")
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[ids[0]].finish_reason == "abort" and outs[ids[0]].finished
    assert all(outs[i].finish_reason == "length" for i in ids[1:])
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    assert eng.scheduler.num_running == 0 and eng.scheduler.num_waiting == 0


def test_abort_waiting_request(toy_engine):
    eng = toy_engine
    rid = eng.add_request(prompts()[0], greedy())
    eng.abort_request(rid)
    outs = eng.step()
    assert [o.finish_reason for o in outs] == ["abort"]
    assert not eng.has_unfinished()


def test_stop_string_and_stop_token(ref_tokenizer):
    eng = make_engine(quantized_ref(), ref_tokenizer, max_model_len=256)
    refs = hf_greedy(False)
    text = ref_tokenizer.decode(refs[2], skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    eos = refs[0][3]
    eng.eos_token_ids = frozenset({eos})  # pretend request 0's 4th greedy token is EOS
    outs = eng.generate(prompts()[:3], [SamplingParams(max_tokens=NEW, temperature=0.0),
                                        greedy(stop_token_ids=[refs[1][2]]), greedy(stop=[stop])])
    assert outs[0].finish_reason == "stop" and outs[0].output_token_ids == refs[0][:refs[0].index(eos) + 1]
    assert outs[1].finish_reason == "stop" and outs[1].output_token_ids == refs[1][:refs[1].index(refs[1][2]) + 1]
    assert outs[2].finish_reason == "stop" and outs[2].text == text[:text.index(stop)]
    assert outs[2].output_token_ids == refs[2][:len(outs[2].output_token_ids)]
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_streamed_text_equals_decode(toy_engine, ref_tokenizer):
    eng = toy_engine
    rid = eng.add_request("The history of the city", greedy(max_tokens=12))
    pieces, final = [], None
    while eng.has_unfinished():
        for o in eng.step():
            pieces.append(o.new_text)
            final = o
    assert "".join(pieces) == final.text == ref_tokenizer.decode(final.output_token_ids, skip_special_tokens=True)
    assert final.request_id == rid and final.num_output_tokens == 12


def test_seeded_sampling_reproducible(toy_engine):
    eng = toy_engine
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    a = eng.generate([prompts()[1]], sp)[0].output_token_ids
    # the same seed again, now beside other requests (one unseeded): the same tokens; another seed: others
    b, c, _ = eng.generate([prompts()[1], prompts()[1], prompts()[3]], [sp, other, SamplingParams(max_tokens=5)])
    assert a == b.output_token_ids
    assert a != c.output_token_ids


def test_add_request_validation(toy_engine):
    eng = toy_engine
    with pytest.raises(SpearError, match="max_model_len"):
        eng.add_request([5] * eng.max_model_len, greedy())
    with pytest.raises(SpearError, match="empty"):
        eng.add_request([], greedy())
    with pytest.raises(SpearError, match="token ids"):
        eng.add_request([1, 10 ** 9], greedy())
    with pytest.raises(SpearError, match="SamplingParams"):
        eng.add_request([1, 2], {"max_tokens": 3})
    eng.add_request([1, 2], greedy(), request_id="dup")
    with pytest.raises(SpearError, match="already in use"):
        eng.add_request([1, 2], greedy(), request_id="dup")


def test_async_stream_and_disconnect(toy_engine):
    import asyncio

    from spear_compile.serving import AsyncEngine
    eng = toy_engine

    async def main():
        ae = AsyncEngine(eng)
        await ae.start()
        outs = [o async for o in ae.generate(prompts()[0], greedy(max_tokens=5))]
        assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 5
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].output_token_ids
        stream = ae.generate(prompts()[1], greedy(max_tokens=200))   # the consumer leaves after one output
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(500):
            if not eng.has_unfinished():
                break
            await asyncio.sleep(0.01)
        await ae.shutdown()

    asyncio.run(main())
    assert not eng.has_unfinished()
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_logprobs_equal_the_model_log_softmax(ref_tokenizer):
    """Per output token, greedy and sampled: its log-probability and top 5 equal the log-softmax of HF's eager logits
    of prompt + outputs (teacher forcing), in the raw logits (before temperature); requests without logprobs get
    none; the streamed pieces add up to the final list."""
    eng = make_engine(quantized_ref(True), ref_tokenizer, policy="budget-16")
    ps = prompts()[:3]
    sps = [greedy(logprobs=5), SamplingParams(max_tokens=NEW, temperature=0.8, seed=7, ignore_eos=True, logprobs=2),
           greedy()]
    ids = [eng.add_request(p, sp) for p, sp in zip(ps, sps)]
    streamed = {i: [] for i in ids}
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            streamed[out.request_id] += out.new_logprobs
            if out.finished:
                final[out.request_id] = out
    model = dequantized(quantized_ref(True))
    for p, sp, i in zip(ps, sps, ids):
        out = final[i]
        if sp.logprobs is None:
            assert out.output_logprobs == [] and streamed[i] == []
            continue
        assert streamed[i] == out.output_logprobs and len(out.output_logprobs) == NEW
        with torch.no_grad():
            logits = model(torch.tensor([p + out.output_token_ids])).logits[0].double()
        ref = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
        for j, lp in enumerate(out.output_logprobs):
            assert lp.token_id == out.output_token_ids[j]
            assert abs(lp.logprob - ref[j, lp.token_id].item()) < 1e-4
            top = ref[j].topk(sp.logprobs)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            if sp.greedy:
                assert lp.top[0][0] == lp.token_id


def test_penalties_equal_hf_and_a_teacher_forced_reference(ref_tokenizer):
    """Greedy with a repetition penalty equals HF eager ``generate(repetition_penalty=...)``; greedy with presence
    and frequency penalties picks, at every step, the argmax of HF's eager logits of prompt + outputs so far minus
    the penalties (OpenAI's definition); the penalties change the tokens (the check can fail)."""
    new = 12
    eng = make_engine(quantized_ref(), ref_tokenizer, policy="budget-16")
    ps = prompts()[:3]
    rep, pf = greedy(new, repetition_penalty=1.8), greedy(new, presence_penalty=1.5, frequency_penalty=1.0)
    outs = eng.generate(ps, [rep, pf, greedy(new)])
    model = dequantized(quantized_ref())
    with torch.no_grad():
        hf = model.generate(torch.tensor([ps[0]]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            repetition_penalty=1.8)[0, len(ps[0]):].tolist()
        assert outs[0].output_token_ids == hf
        toks = outs[1].output_token_ids
        logits = model(torch.tensor([ps[1] + toks])).logits[0, len(ps[1]) - 1:-1].double()
    for j, tok in enumerate(toks):
        row = logits[j].clone()
        for t in set(toks[:j]):
            row[t] -= 1.0 * toks[:j].count(t) + 1.5
        assert tok == int(row.argmax()), j
    plain = eng.generate(ps[:2], greedy(new))
    assert plain[0].output_token_ids != hf or plain[1].output_token_ids != toks


@pytest.mark.parametrize("ecs,num_blocks", [(False, 40), (True, 40), (False, 16)], ids=["w4", "w4+ec", "w4-tight"])
def test_prefix_caching_same_tokens_fewer_computed(ecs, num_blocks, ref_tokenizer):
    """Prompts sharing a 40-token stem, after one that computed it: the later ones take its cached blocks (hit
    tokens counted; without preemptions, computed + cached = their prompt tokens exactly) and their greedy tokens
    equal HF eager ``generate``; with 15 usable 4-token blocks requests are preempted and recomputed (taking their
    own cached blocks back) and the tokens still equal. Switching ECs off forgets the cache."""
    stem = prompts()[2]
    ps = [stem + [11, 12, 13], stem[:33] + [7, 8, 9, 10, 11], stem + [500], prompts()[1]]
    model = dequantized(quantized_ref(ecs))
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):]
               .tolist() for p in ps]
    eng = make_engine(quantized_ref(ecs), ref_tokenizer, policy="budget-16", block_size=4, num_blocks=num_blocks,
                      enable_prefix_caching=True, ec_switch=ecs)
    first = eng.generate(ps[:1], greedy())
    computed_first = sum(r.num_prefill_tokens for r in eng.step_log)
    hits_first = eng.stats().prefix_cache_hit_tokens
    rest = eng.generate(ps[1:], greedy())
    assert [o.output_token_ids for o in first + rest] == ref
    hits = eng.stats().prefix_cache_hit_tokens - hits_first
    computed_rest = sum(r.num_prefill_tokens for r in eng.step_log) - computed_first
    if num_blocks == 40:
        assert eng.num_preemptions == 0 and hits_first == 0
        assert hits == 32 + 40                                    # ps[1]: 8 blocks of the stem; ps[2]: 10 blocks
        assert computed_rest + hits == sum(len(p) for p in ps[1:])
    else:
        assert eng.num_preemptions > 0 and hits > 0
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    if ecs:
        eng.set_ec_enabled(False)
        assert eng.blocks.num_cached_blocks == 0
