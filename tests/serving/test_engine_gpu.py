"""The engine's decode CUDA graphs on a GPU, W4 + gated ECs (the kernels keep split-K counters and EC epoch tags in
per-stream workspaces between launches). Every bucket's graph is captured into one shared memory pool; a graph whose
workspace was allocated inside its capture would take it from that pool, where the graphs captured before it write
their intermediates, and a later bucket switch would find its EC epochs clobbered (spin, then NaN: session 14's
1.5 s step at the end of the batch-16 decode bench). Here the graphs replay in an interleaved order and each must
match the same step run eagerly, and serving across bucket switches must equal a run without graphs (greedy; the
same kernels, so only a near-tie under fp32 atomics' summation order could flip a token), mixed steps included
(captured at their shapes' first step, replayed after)."""
import pytest
import torch

from spear_compile.serving import Engine, EngineConfig, SamplingParams

from .conftest import attach_ecs

pytestmark = pytest.mark.gpu
EC_MODULES = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.o_proj")


def _model():
    """A 2-layer Llama with Llama-3.2-1B's layer shapes (small vocabulary), W4 per-channel, ECs on 3 linears."""
    import spear_compile
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=8192, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    attach_ecs(model, tuple("model." + m for m in EC_MODULES), rank=32, std=0.02)
    return model.cuda()


def _config(**kw):
    base = dict(max_num_seqs=4, max_num_tokens=32, token_buckets=(32,), max_model_len=128, num_blocks=64,
                device="cuda", dtype=torch.bfloat16, policy="budget-32", progress=False, detokenize=False)
    base.update(kw)
    return EngineConfig(**base)


@pytest.mark.filterwarnings("error:spear_compile.*not fused")
def test_decode_graphs_replay_like_eager_in_any_order():
    from spear_compile.compile.records import recording
    # compiled afresh (no graph cache: a cached graph runs no pass), recording what the pass fused. Sessions 15 and
    # 16 warned these three EC linears unfused: the eager calls below ran with grad mode on, a recompile into a
    # training-form graph (fixed: the runner's decode call turns grad off); any such warning now fails the test
    with recording() as rec, torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        eng = Engine(_model(), None, _config())
    ec_recs = [r for r in rec.matches if r.module and r.module.endswith(EC_MODULES)]
    assert ec_recs and all(r.kind == "ec-gated" for r in ec_recs), \
        [(r.graph, r.module, r.kind, r.reason) for r in ec_recs if r.kind != "ec-gated"]
    runner = eng.runner
    keys = sorted(runner.graphs)
    assert len(keys) == len(runner.decode_buckets) * len(runner.table_buckets)
    eager = {}
    stream = runner.capture.stream
    for key in keys:   # the same padded step, run eagerly on the stream whose workspaces the graphs use
        use_ec, batch, width = key
        flat = torch.tensor(runner.decode_inputs([], batch, width), dtype=torch.int64, device=runner.device)
        with torch.cuda.stream(stream):
            eager[key] = runner._decode_call(batch, runner.split_decode(flat, batch, width), use_ec).float().clone()
        torch.cuda.current_stream().wait_stream(stream)
    for order in (keys, keys[::-1], keys[::2] + keys[1::2]):   # every switch of bucket, both ways
        for key in order:
            g = runner.graphs[key]
            g.inputs.copy_(torch.tensor(runner.decode_inputs([], key[1], key[2]), dtype=torch.int64))
            out = g.replay().float()
            assert torch.isfinite(out).all(), f"graph {key}: non-finite logits after a bucket switch"
            err = (out - eager[key]).abs().max() / eager[key].abs().max()   # (fp32 atomics: summation order)
            assert err < 1e-2, f"graph {key} vs eager: max error {err:.3g} of the largest logit"


@pytest.mark.parametrize("regions", [False, True], ids=["whole_model", "compile_regions"])
def test_serving_across_bucket_switches_equals_no_graphs(regions):
    """``compile_regions``: each decoder layer its own compiled graph inside the step's CUDA graph."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in (7, 19, 3, 30, 12)]
    lens = (20, 6, 14, 3, 9)   # requests leave at different steps: the batch shrinks 4 -> 3 -> 2 -> 1, and grows
    results = []
    for graphs in (True, False):
        eng = Engine(_model(), None, _config(cuda_graphs=graphs, compile_regions=regions))
        for _ in range(2 if graphs else 1):   # with graphs, twice: the second run replays the mixed steps' graphs
            outs = eng.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
                                          for n in lens])
            assert all(lp.logprob > float("-inf") for o in outs for lp in o.output_logprobs), "non-finite logits"
            results.append([o.output_token_ids for o in outs])
        assert eng.runner.num_uncaptured_decodes == 0 and eng.runner.mixed.uncaptured == 0
        if graphs:   # mixed steps: captured at their shapes' first step (the first run), replayed in the second
            assert eng.runner.mixed.graphs and eng.runner.mixed.replays > 0
        assert eng.blocks.num_free_blocks == eng.blocks.num_usable_blocks
    assert results[0] == results[2] and results[1] == results[2]
