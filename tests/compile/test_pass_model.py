"""The pass on the bundled spear-ref-16m (W4-pc-RTN, bf16, CPU Inductor), compiled once:
all 56 quantized linears fused, the EC pattern exactly on the wrapped modules, q|k|v and gate|up
grouped per layer (minus the EC-wrapped members), decode compiled once for all tokens, greedy
tokens identical to eager."""
import os

import pytest
import torch

import spear_compile
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.api import optimize, sibling_groups
from spear_compile.modules import cache_kwarg

transformers = pytest.importorskip("transformers")

MODEL = os.path.join(os.path.dirname(spear_compile.__file__), "assets", "spear-ref-16m")
EC_MODULES = {"model.layers.0.self_attn.q_proj": "sigmoid", "model.layers.3.mlp.down_proj": "sigmoid",
              "model.layers.6.mlp.up_proj": "none", "model.layers.7.self_attn.o_proj": "sigmoid"}
PROMPT, NEW = 8, 32


def greedy(prefill, step, cache, prompt, n_new):
    cache.reset()
    p = prompt.shape[1]
    kw = cache_kwarg(prefill)
    logits = prefill(input_ids=prompt, cache_position=torch.arange(p), use_cache=True, **{kw: cache}).logits
    tok, toks, all_logits = logits[:, -1:].argmax(-1), [], []
    for i in range(n_new):
        toks.append(tok)
        logits = step(input_ids=tok, cache_position=torch.tensor([p + i]), use_cache=True, **{kw: cache}).logits
        all_logits.append(logits.float())
        tok = logits[:, -1:].argmax(-1)
    return torch.cat(toks, 1), torch.cat(all_logits, 1)


@pytest.fixture(scope="module")
def run():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch._dynamo.reset()
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    g = torch.Generator().manual_seed(0)
    for name, gate in EC_MODULES.items():
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), 8, gate=gate)
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p.dtype)
        setattr(par, attr, ec)
    names = {m: n for n, m in model.named_modules()}
    siblings = [tuple(names[m] for m in ms) for ms in sibling_groups(model)]  # what warm_kernels tunes
    cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT + NEW + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    eager = model.forward
    with torch.no_grad():
        ref_toks, ref_logits = greedy(eager, eager, cache, prompt, NEW)
        # Inductor keeps bf16 intermediates in fp32 unless asked to round like eager does
        with torch._inductor.config.patch(emulate_precision_casts=True, fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            rec = optimize(model, "w4-pc-rtn", fullgraph=True, dynamic=False).spear_records
            toks, logits = greedy(eager, model.forward, cache, prompt, NEW)
            graphs_after_first = rec.graphs
            with torch._dynamo.config.patch(error_on_recompile=True):
                toks2, _ = greedy(eager, model.forward, cache, prompt, NEW)
    return dict(records=list(rec.matches), groups=list(rec.groups), siblings=siblings, ref_toks=ref_toks, toks=toks,
                toks2=toks2, ref_logits=ref_logits, logits=logits, graphs=graphs_after_first, graphs2=rec.graphs)


def test_all_56_quantized_linears_fused(run):
    recs = run["records"]
    assert len(recs) == 56 and all(r.matched for r in recs), [r for r in recs if not r.matched]
    assert len({r.module for r in recs}) == 56


def test_ec_pattern_exactly_on_wrapped_modules(run):
    ec = {r.module: ("sigmoid" if r.gated else "none") for r in run["records"] if r.kind.startswith("ec")}
    assert ec == EC_MODULES
    assert all(r.rank == 8 for r in run["records"] if r.kind.startswith("ec"))


def test_decode_compiles_once_for_all_tokens(run):
    assert run["graphs"] == 1 and run["graphs2"] == 1


def test_greedy_tokens_identical_to_eager(run):
    assert torch.equal(run["toks"], run["ref_toks"])
    assert torch.equal(run["toks2"], run["toks"])
    err = (run["logits"] - run["ref_logits"]).norm() / run["ref_logits"].norm()
    assert err < 2e-2


def test_siblings_grouped_per_layer(run):
    """The decode graph groups q|k|v and gate|up of every layer; EC members stay out."""
    want = []
    for i in range(8):
        for names in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            members = tuple(f"model.layers.{i}.{n}" for n in names if f"model.layers.{i}.{n}" not in EC_MODULES)
            if len(members) >= 2:
                want.append(members)
    assert len(want) == 15
    assert len({g.graph for g in run["groups"]}) == 1
    assert sorted(g.modules for g in run["groups"]) == sorted(want)
    grouped = {r.module for r in run["records"] if r.group is not None}
    assert grouped == {m for ms in want for m in ms}
    # warm_kernels' eager sibling detection finds exactly the pass's groups (so they are tuned before capture)
    assert sorted(run["siblings"]) == sorted(want)


@pytest.mark.parametrize("source", [
    "L['self'].model.layers.0.self_attn.q_proj",          # a compiled module
    "L['args'][0].model.layers.0.self_attn.q_proj",       # forward under a *args decorator (transformers >= 5.2x)
    "L['self'].model.layers[0].self_attn.q_proj",
    "L['self']._modules['model']._modules['layers']._modules['0'].self_attn.q_proj",
    "getattr(L['self'].model.layers, '0').self_attn.q_proj",
    "L__self__.model.layers.0.self_attn.q_proj",
])
def test_module_path_from_every_dynamo_source_form(source):
    from spear_compile.compile.passes.fuse_quantized_linear import module_path
    assert module_path(source) == "model.layers.0.self_attn.q_proj"
