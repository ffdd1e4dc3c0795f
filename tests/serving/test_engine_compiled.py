"""The engine's graph machinery on CPU: decode "graphs" (stand-ins that re-run the captured function on the static
input buffers) per (batch bucket, block-table bucket) and EC state, eager and compiled with the ``spear`` backend
through the CPU Inductor; tokens equal HF eager ``generate``; no compilation after start-up."""
import copy

import pytest
import torch

from spear_compile.serving import SamplingParams

from .conftest import make_engine, toy_model

LENS = (5, 13, 3, 9)
NEW = 6


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 8000, (n,), generator=g).tolist() for n in LENS]


def hf_greedy(model):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):]
                .tolist() for p in prompts()]


def hf_greedy_with_and_without_ecs(model):
    """HF eager greedy tokens of ``model`` and of a copy whose ECs add nothing (B zeroed)."""
    no_ec = copy.deepcopy(model)
    for mod in no_ec.modules():
        if hasattr(mod, "ec_B"):
            mod.ec_B.data.zero_()
    return hf_greedy(model), hf_greedy(no_ec)


def sp():
    return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def test_graph_bookkeeping_per_ec_state(ref_tokenizer):
    model = toy_model(ecs=True)
    ref_ec, ref_off = hf_greedy_with_and_without_ecs(model)
    assert ref_ec != ref_off
    eng = make_engine(model, ref_tokenizer, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
                      max_num_tokens=16, token_buckets=(8, 16), max_model_len=64, policy="budget-8", ec_switch=True)
    runner = eng.runner
    assert runner.table_buckets == (2, 4, 8) and runner.decode_buckets == (1, 2, 4)
    assert set(runner.graphs) == {(ec, b, w) for ec in (True, False) for b in (1, 2, 4) for w in (2, 4, 8)}
    used = []
    replay = type(next(iter(runner.graphs.values()))).replay

    def spy(self):
        used.append(next(k for k, g in runner.graphs.items() if g is self))
        return replay(self)
    try:
        type(next(iter(runner.graphs.values()))).replay = spy
        assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref_ec
        eng.set_ec_enabled(False)
        assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref_off
    finally:
        type(next(iter(runner.graphs.values()))).replay = replay
    assert {k[0] for k in used} == {True, False} and len({k[1:] for k in used}) >= 2  # several buckets replayed
    assert runner.num_uncaptured_decodes == 0   # every decode step found its graph
    # without ec_switch (the default outside the SLO policies) only the steps with ECs are captured
    eng = make_engine(model, ref_tokenizer, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
                      max_num_tokens=16, token_buckets=(8, 16), max_model_len=64, policy="budget-8")
    assert set(eng.runner.graphs) == {(True, b, w) for b in (1, 2, 4) for w in (2, 4, 8)}
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref_ec
    assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks


def test_compiled_engine_no_recompiles(ref_tokenizer, fresh_compile):
    """compile=True (spear backend, CPU Inductor, dynamic sizes): 2 decode graphs (batch 1, batch >= 2) + 1 mixed;
    every bucket at start-up; serving compiles nothing."""
    model = toy_model()
    ref = hf_greedy(copy.deepcopy(model))
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=2,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16")
    assert eng.runner.graphs_before_serving is not None
    outs = eng.generate(prompts(), sp())
    assert [o.output_token_ids for o in outs] == ref
    eng.generate(prompts()[::-1][:3], SamplingParams(max_tokens=9, temperature=0.7, seed=1, ignore_eos=True))
    assert eng.stats().recompiles == 0
    runner = eng.runner   # a direct decode call with grad mode on (as a test would) reuses the inference graph
    batch, width = runner.decode_buckets[-1], runner.table_buckets[0]
    flat = torch.tensor(runner.decode_inputs([], batch, width), dtype=torch.int64)
    with torch.enable_grad():
        runner._decode_call(batch, runner.split_decode(flat, batch, width), False)
    assert eng.stats().recompiles == 0



def test_compiled_engine_groups_ec_siblings(ref_tokenizer, fresh_compile, monkeypatch):
    """ECs on every linear of layer 0: its q|k|v and gate|up run as ``spear::grouped_linear_ec`` in the compiled
    graphs (the op's CPU reference here); tokens equal HF eager ``generate``, nothing compiles after start-up."""
    import importlib
    from .conftest import attach_ecs
    fused_linear = importlib.import_module("spear_compile.lowering.fused_linear")  # (the package exports the op)
    model = attach_ecs(toy_model(), names=[f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")], rank=4)
    ref = hf_greedy(copy.deepcopy(model))
    widths, real = [], fused_linear.reference_grouped_linear_ec
    monkeypatch.setattr(fused_linear, "reference_grouped_linear_ec",
                        lambda *a: widths.append(len(a[1])) or real(*a))
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=2,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16")
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    assert sorted(set(widths)) == [2, 3]   # gate|up and q|k|v, each one op
    assert eng.stats().recompiles == 0


def test_compiled_engine_triton_decode_attention(ref_tokenizer, fresh_compile, monkeypatch):
    """The paged decode-attention op inside the compiled graphs (one custom op per layer; the Triton interpreter runs
    it on CPU): tokens equal HF eager ``generate``, nothing compiles after start-up."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = toy_model()
    ref = hf_greedy(copy.deepcopy(model))
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=2,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16",
                      decode_attention="triton")
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    assert eng.stats().recompiles == 0
    # the kernel reads only each row's context: mixed steps pass their decode tables at the largest width (one
    # graph key for every width), and the tokens above are still HF's
    keys = list(eng.runner.mixed.graphs)
    assert keys and {shapes[4][1] for _, shapes in keys} == {eng.runner.table_buckets[-1]}


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_compiled_unquantized_engine(ref_tokenizer, fresh_compile, monkeypatch, attention):
    """The bf16 baseline's path compiled: a plain float model, q|k|v and gate|up merged into one GEMM each, with the
    torch decode attention or the one-launch RoPE + cache-write + paged attention (head dim 32: the Triton kernel,
    interpreted); tokens equal HF eager ``generate``; nothing compiles after start-up."""
    from transformers import LlamaConfig, LlamaForCausalLM
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=8192, max_position_embeddings=512)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    ref = hf_greedy(model)
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16", block_size=4,
                      decode_attention=attention)
    assert all(m is not None for m in eng.runner.net.merged_qkv)
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    assert eng.stats().recompiles == 0


def test_static_decode_rows_compile_per_batch_size(ref_tokenizer, fresh_compile):
    """``static_decode_rows=2`` (what tensor parallelism's peer-reduction epilogue sets to 16): decode batches 1 and 2
    compile one graph each under their own entry point, batch 4 the dynamic graph; tokens still equal HF eager
    ``generate``; nothing compiles after start-up."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from spear_compile.serving.paged_llama import PagedLlama
    model = toy_model()
    ref = hf_greedy(copy.deepcopy(model))
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16",
                      static_decode_rows=2)
    assert eng.runner.static_rows == 2
    static_entries = _debug_get_cache_entry_list(PagedLlama.decode_forward_static_rows.__code__)
    dynamic_entries = _debug_get_cache_entry_list(PagedLlama.decode_forward.__code__)
    assert len(static_entries) == 2     # B = 1 and B = 2, each its own graph (one EC state: the toy has no ECs)
    assert len(dynamic_entries) == 1    # B = 4 only: the small batches never reach the dynamic graph
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    assert eng.stats().recompiles == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_step_graphs(ref_tokenizer, overlap):
    """Mixed steps (prefill chunks + decodes) captured lazily, one graph per input-shape key (stand-ins on CPU): a
    replay writes the step's inputs into the graph's static buffer (stale inputs would change the tokens: every
    replayed step here has new ids, positions and slots), overlapped steps patch the ids into it; the limit
    holds, and the steps beyond it run uncaptured and equal."""
    model = toy_model(ecs=True)
    ref = hf_greedy(model)
    kw = dict(cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4, max_num_tokens=16, token_buckets=(8, 16),
              max_model_len=64, policy="budget-8", overlap_decode=overlap)
    eng = make_engine(model, ref_tokenizer, **kw)
    runner = eng.runner
    assert runner.mixed.graphs == {}   # start-up runs the mixed buckets uncaptured: no graph for dummy shapes
    from spear_compile.serving.cuda_graphs import MixedGraph
    replays = []
    replay = MixedGraph.replay

    def spy(self):
        replays.append(self)
        return replay(self)
    MixedGraph.replay = spy
    try:
        assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
        first = len(runner.mixed.graphs)
        # the steps that captured are flagged in the step log (the SLO policy keeps them out of its correction)
        assert sum(r.captured_graph for r in eng.step_log) == runner.mixed.first_steps == first
        assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    finally:
        MixedGraph.replay = replay
    assert first >= 2 and replays and len(runner.mixed.graphs) <= runner.config.mixed_cuda_graphs
    assert runner.mixed.uncaptured == 0
    limited = make_engine(model, ref_tokenizer, mixed_cuda_graphs=1, **kw)
    assert [o.output_token_ids for o in limited.generate(prompts(), sp())] == ref
    assert len(limited.runner.mixed.graphs) == 1 and limited.runner.mixed.uncaptured > 0
    assert sum(r.uncaptured_mixed for r in limited.step_log) == limited.runner.mixed.uncaptured   # flagged per step
    assert not any(r.uncaptured_mixed for r in eng.step_log)
    assert limited.blocks.num_free_blocks == limited.blocks.num_usable_blocks


def test_mixed_steps_captured_first(ref_tokenizer):
    """``mixed_capture_first``: a new mixed-step shape whose token bucket and logits rows already ran eagerly is
    captured (stand-ins on CPU) and replayed without an eager run first; the greedy tokens stay HF eager's."""
    model = toy_model(ecs=True)
    ref = hf_greedy(model)
    eng = make_engine(model, ref_tokenizer, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
                      max_num_tokens=16, token_buckets=(8, 16), max_model_len=64, policy="budget-8",
                      mixed_capture_first=True, mixed_graph_padding=0)
    for _ in range(2):
        assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref
    mixed = eng.runner.mixed
    assert 0 < mixed.captured_first < mixed.first_steps == len(mixed.graphs)
    assert eng.stats().captured_first_steps == mixed.captured_first and mixed.uncaptured == 0


def test_compiled_regions(ref_tokenizer, fresh_compile):
    """``compile_regions=True``: one decoder layer compiled per distinct layer structure (two here: an EC on layer 0's
    q_proj, another on layer 1's down_proj), the LM head apart, the whole-model entry points never compiled; every
    linear fused in the layer graphs; tokens equal HF eager ``generate`` with the ECs on and switched off; nothing
    compiles after start-up."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from spear_compile.serving.paged_llama import PagedLlama
    model = toy_model(ecs=True)
    ref_ec, ref_off = hf_greedy_with_and_without_ecs(model)
    eng = make_engine(model, ref_tokenizer, compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=2,
                      max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16", ec_switch=True,
                      compile_regions=True)
    decode_layer = _debug_get_cache_entry_list(PagedLlama.decode_layer.__code__)
    # 2 layer structures x 2 EC states x (batch 1, batch >= 2)
    assert len(decode_layer) == 8, len(decode_layer)
    assert len(_debug_get_cache_entry_list(PagedLlama.mixed_layer.__code__)) == 4   # 2 structures x 2 EC states
    assert not _debug_get_cache_entry_list(PagedLlama.decode_forward.__code__)
    assert not _debug_get_cache_entry_list(PagedLlama.mixed_forward.__code__)
    matches = list(fresh_compile.matches)
    assert matches and all(r.matched for r in matches), [r.reason for r in matches if not r.matched]
    assert {r.kind for r in matches} >= {"plain", "ec-gated"}
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref_ec
    eng.set_ec_enabled(False)
    assert [o.output_token_ids for o in eng.generate(prompts(), sp())] == ref_off
    assert eng.stats().recompiles == 0


def test_compiled_regions_refuse_static_decode_rows_before_touching_the_model(ref_tokenizer):
    """``compile_regions`` with static decode rows (tensor parallelism's peer-reduction epilogue) is refused before
    the engine unwraps the quantized weights: the model stays as it was."""
    from spear_compile.errors import SpearError
    model = toy_model()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(SpearError, match="compile_regions=True cannot serve static decode rows"):
        make_engine(model, ref_tokenizer, compile=True, compile_regions=True, static_decode_rows=2, max_num_seqs=2,
                    max_num_tokens=16, token_buckets=(16,), max_model_len=64, policy="budget-16")
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_mixed_steps_padded_into_covering_graphs(ref_tokenizer):
    """``mixed_graph_padding``: a mixed step whose shapes have no graph replays a captured one of larger shapes that
    covers them (the same tokens and decode rows; longer chunks, more chunk rows, wider tables) instead of capturing
    its own: the tokens stay HF eager ``generate``'s, longer prompts first and then shorter ones (whose steps the
    long prompts' graphs cover), fewer graphs and first steps than with padding off."""
    model = toy_model(ecs=True)
    g = torch.Generator().manual_seed(5)
    long = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in (30, 22, 17, 40)]
    short = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in (6, 3, 11, 9)]
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):]
               .tolist() for p in long + short]
    kw = dict(cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4, max_num_tokens=16, token_buckets=(8, 16),
              max_model_len=64, policy="budget-8")
    counts = {}
    for padding in (0, 2.0):
        eng = make_engine(model, ref_tokenizer, mixed_graph_padding=padding, **kw)
        got = [o.output_token_ids for o in eng.generate(long, sp())] + \
              [o.output_token_ids for o in eng.generate(short, sp())]
        assert got == ref, padding
        mixed = eng.runner.mixed
        counts[padding] = (len(mixed.graphs), mixed.first_steps, mixed.padded_replays)
        assert eng.stats().padded_mixed_steps == mixed.padded_replays and mixed.uncaptured == 0
        assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    assert counts[0][2] == 0 and counts[2.0][2] > 0
    assert counts[2.0][0] < counts[0][0] and counts[2.0][1] < counts[0][1]


@pytest.mark.parametrize("bucket_padding", [1.0, 2.0])
def test_the_scheduler_is_told_which_steps_run_padded(ref_tokenizer, bucket_padding):
    """``StepContext.run_dims`` (what the SLO policy prices a step by) names, before each step runs, the padded
    graph the runner then replays: the covering graph's tokens and prefill attention work for a padded step, None
    for a step at its own dims. Checked against the dims the runner records, from the requests' block lists; with
    ``mixed_graph_bucket_padding`` 2 too (a covering graph of a larger token bucket or more decode rows), where the
    greedy tokens must equal those of the engine without any padding."""
    from spear_compile.serving.buckets import MixedDims, mixed_step_dims_for
    model = toy_model(ecs=True)
    g = torch.Generator().manual_seed(6)
    long = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in (30, 22, 17, 40)]
    short = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in (6, 3, 11, 9)]
    kw = dict(cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4, max_num_tokens=16, token_buckets=(8, 16),
              max_model_len=64, policy="budget-8")
    ref = make_engine(model, ref_tokenizer, mixed_graph_padding=0, **kw)
    expected = [[o.output_token_ids for o in ref.generate(batch, sp())] for batch in (long, short)]
    eng = make_engine(model, ref_tokenizer, mixed_graph_padding=2.0, mixed_graph_bucket_padding=bucket_padding, **kw)
    runner, seen, bigger = eng.runner, [], []
    execute = runner.execute

    def checked(decodes, prefills, use_ec):
        told = eng.scheduler.run_dims(len(decodes), max((r.num_computed_tokens + 1 for r in decodes), default=0),
                                       [(r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                                        for r, n in prefills]) if prefills else None
        out = execute(decodes, prefills, use_ec)
        if prefills:
            own = mixed_step_dims_for(decodes, prefills, runner.decode_buckets[-1], runner.token_buckets,
                                      runner.table_buckets, full_decode_tables=runner.config.decode_attention == "triton")
            ran = MixedDims(*runner.last_mixed_dims)
            blocks = max(len(r.block_ids) for r, _ in prefills)
            want = ran.prefills * ran.chunk_len * max(ran.prefill_width, blocks) * runner.block_size
            seen.append(ran != own)
            bigger.append((ran.tokens, ran.decode_rows) != (own.tokens, own.decode_rows))
            assert told == ((ran.tokens, want) if ran != own else None), (told, ran, own)
        return out

    runner.execute = checked
    got = [[o.output_token_ids for o in eng.generate(batch, sp())] for batch in (long, short)]
    assert any(seen) and not all(seen), seen   # both kinds of step were checked
    assert got == expected
    assert any(bigger) == (bucket_padding > 1), bigger   # a larger token bucket or more decode rows replayed


def test_step_log_records_what_a_mixed_step_ran(ref_tokenizer):
    """The step log keeps, per mixed step, the padded sizes it ran at (``mixed_dims``, a ``MixedDims`` tuple whose
    token bucket holds the step's tokens) and the context its chunks attend to besides themselves."""
    from spear_compile.serving.buckets import MixedDims
    eng = make_engine(toy_model(), ref_tokenizer, max_num_seqs=4, max_num_tokens=16, token_buckets=(8, 16),
                      max_model_len=64, policy="budget-8")
    eng.generate([list(range(3, 23)), list(range(30, 35))], sp())   # a 20-token prompt: chunks of at most 8
    mixed = [r for r in eng.step_log if r.num_prefill_tokens]
    assert mixed and all(r.mixed_dims is not None for r in mixed)
    assert not any(r.mixed_dims for r in eng.step_log if not r.num_prefill_tokens)
    for r in mixed:
        dims = MixedDims(*r.mixed_dims)
        assert dims.tokens >= r.num_decodes + r.num_prefill_tokens and dims.prefills >= r.num_prefills
    assert sorted(r.prefill_context for r in mixed if r.prefill_context)[:2] == [8, 16]   # the 20-token prompt's chunks
