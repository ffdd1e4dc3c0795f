"""The start-up profile on a real (tiny, CPU, eager) engine: samples per EC state, the on-disk cache (reuse, a
corrupt file ignored with a warning), the fitted models, and the SLO policy serving through the engine."""
import json
import os

import pytest
import torch

from spear_compile.ec.module import CompensatedLinear
from spear_compile.serving.config import EngineConfig
from spear_compile.serving.engine import Engine
from spear_compile.serving.request import SamplingParams
from spear_compile.serving import json_cache
from spear_compile.serving.scheduler import profile
from spear_compile.serving.scheduler.ec_signature import ECSignature, ec_signature

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "spear_compile", "assets", "spear-ref-16m")


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for layer in model.model.layers[:2]:
        layer.self_attn.q_proj = CompensatedLinear.wrap(layer.self_attn.q_proj, rank=4)
        layer.mlp.down_proj = CompensatedLinear.wrap(layer.mlp.down_proj, rank=8)
        for p in layer.mlp.down_proj.ec_parameters():
            torch.nn.init.normal_(p, std=0.02)
    cfg = EngineConfig(device="cpu", dtype=torch.float32, compile=False, cuda_graphs=False, max_num_seqs=4,
                       max_num_tokens=64, cpu_num_blocks=64, max_model_len=256, progress=False, ec_switch=True)
    return Engine(model, AutoTokenizer.from_pretrained(MODEL), cfg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stepcost")


POINTS = 4


def test_profile_is_cached_per_ec_state_and_survives_corruption(engine, cache_dir, monkeypatch):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(cache_dir))
    samples = profile.profile_engine(engine, max_points=POINTS, repeats=1)
    files = sorted(cache_dir.glob("stepcost-*.json"))
    assert len(files) == 2 and len(samples) == 2 * POINTS
    sigs = {s.signature for s in samples}
    on = ec_signature(engine.model)
    assert sigs == {on, ECSignature()} and on.per_type == (("down_proj", 2, 16), ("q_proj", 2, 8))
    assert all(s.seconds > 0 for s in samples)
    header = json.loads(files[0].read_text())["fields"]
    for key in ("gpu", "sms", "torch", "triton", "model", "layout", "ec"):
        assert key in header

    calls = []
    real = engine.runner.execute

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine.runner, "execute", counting)
    again = profile.profile_engine(engine, max_points=POINTS, repeats=1)
    assert not calls and sorted(map(repr, again)) == sorted(map(repr, samples))

    files[0].write_text("{ not json")
    with pytest.warns(UserWarning, match="ignoring it"):
        third = profile.profile_engine(engine, max_points=POINTS, repeats=1)
    assert len(calls) == POINTS and len(third) == 2 * POINTS  # only the corrupt state is profiled again
    json.loads(files[0].read_text())  # rewritten


def test_cache_is_off_when_the_tuning_cache_is_off(engine, monkeypatch):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", "0")
    fields = profile.cache_fields(engine.device, engine.model, json_cache.engine_layout(engine.runner), ECSignature())
    assert profile.cache_path(fields) is None


def test_slo_policy_serves_through_the_engine(engine, cache_dir, monkeypatch):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(cache_dir))  # the first test's profile (or profiled now)
    aware, blind = profile.cost_models_for(engine, max_points=POINTS, repeats=1)
    assert aware.fitted and blind.fitted and aware.ec_types == ("down_proj", "q_proj") and blind.ec_types == ()
    engine.set_policy("slo", cost_model=aware, ttft_slo_s=5.0, tpot_slo_s=1.0)
    try:
        prompts = [[5 + k] * n for k, n in enumerate((3, 40, 90))]
        outs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert [o.num_output_tokens for o in outs] == [4] * 3
        log = list(engine.step_log)[-3:]
        assert log and all(r.predicted_s is not None and r.predicted_s > 0 for r in log)
        assert len(engine.policy.log.pairs) > 0
        engine.set_ec_enabled(False)
        outs = engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        assert engine.step_log[-1].ec_signature == ECSignature()
    finally:
        engine.set_ec_enabled(True)
        engine.set_policy("budget-512")


def test_engine_config_slo_policy_profiles_at_start_up(cache_dir, monkeypatch):
    """``EngineConfig(policy="slo")`` builds the engine with its own profiled cost model (no manual set_policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(cache_dir))
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    cfg = EngineConfig(device="cpu", dtype=torch.float32, compile=False, cuda_graphs=False, max_num_seqs=4,
                       max_num_tokens=64, cpu_num_blocks=64, max_model_len=256, progress=False, policy="slo",
                       profile_points=POINTS, tpot_slo_ms=1000.0, ttft_slo_ms=5000.0)
    engine = Engine(model, AutoTokenizer.from_pretrained(MODEL), cfg)
    assert engine.policy.name.startswith("slo") and engine.policy.cost_model.fitted
    outs = engine.generate([[7] * 20, [9] * 50], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert [o.num_output_tokens for o in outs] == [3, 3]
    assert all(r.predicted_s is not None for r in list(engine.step_log)[-2:])


def test_every_mixed_point_of_the_grid_fits_the_mixed_step_graphs(engine):
    """A profiled mixed step must be one the engine can capture (its logits rows within the mixed-step graphs'
    buffer), as every served one is: a prefill request is running too, so a mixed point runs at most
    ``max_num_seqs - 1`` decodes. Session 20's H100 grid had 64 decodes + a prefill (128 padded rows > 64): those
    points ran uncaptured at 30-45 ms, against 3-22 ms for 32 decodes, and the fit's error in their bins was 27-52 %."""
    runner = engine.runner
    cap = runner.config.max_num_seqs
    grid = profile.default_grid(runner.decode_buckets, runner.token_buckets, runner.max_model_len, None, 2, cap)
    unbounded = profile.default_grid(runner.decode_buckets, runner.token_buckets, runner.max_model_len, None, 2)
    assert any(d == max(runner.decode_buckets) and p for d, p, *_ in unbounded)   # what the bound removes
    assert any(d == cap for d, p, *_ in grid if not p) and any(d == cap - 1 for d, p, *_ in grid if p)
    assert len(grid) == len(set(grid))
    # chunks after a prompt's first tokens, beside no decodes and beside some (the prefill attention feature)
    assert {d == 0 for d, p, _, before, _ in grid if p and before} == {True, False}
    # steps of several chunks, from a prompt's start and after a context (their graphs pad chunk rows and lengths)
    assert {(k, before > 0) for _, p, _, before, k in grid if p and k > 1} == {(2, False), (2, True), (4, False),
                                                                              (4, True)}
    template = profile.template_for(runner)
    for d, p, c, before, k in grid:
        decodes, prefills = profile._fake_requests(d, p, c, runner.num_blocks, runner.block_size, before, k)
        if not p:
            assert d <= max(runner.decode_buckets) and not before and k == 1
            continue
        assert d + k <= cap and before + p // k < runner.max_model_len, (d, p, c, before, k)
        assert [n for _, n in prefills] == profile.chunk_lens(p, k) and sum(profile.chunk_lens(p, k)) == p
        args, rows = runner.mixed_inputs(decodes, prefills)
        assert rows == d + k and args[-1].shape[0] <= runner.mixed.max_rows, (d, p, c, tuple(args[-1].shape))
        # the sample's attention feature is what the step's graph pads its chunks to (rows x length x table)
        q_index = args[7]
        assert template.prefill_cells([(before, n) for _, n in prefills]) == \
            q_index.shape[0] * q_index.shape[1] * max(args[6].shape[1], -(-(before + max(profile.chunk_lens(p, k))) //
                                                                          runner.block_size)) * runner.block_size


def test_mixed_step_dims_are_the_runner_input_shapes(engine):
    """``buckets.mixed_step_dims_for`` (what the simulator pads by) is what ``mixed_inputs`` builds,
    on random steps: decodes of random contexts beside 1-3 chunks, some completing their prompts."""
    import random

    from spear_compile.serving.buckets import mixed_step_dims_for
    from spear_compile.serving.request import Request
    runner = engine.runner
    template = profile.template_for(runner)
    rng = random.Random(7)
    blocks = iter(range(1, 10 ** 6))
    for _ in range(60):
        d = rng.randrange(0, runner.config.max_num_seqs)
        decodes, _ = profile._fake_requests(d, 0, rng.randrange(1, 120), runner.num_blocks, runner.block_size)
        prefills = []
        for k in range(rng.randrange(1, 4)):
            prompt = rng.randrange(2, 100)
            r = Request(f"p{k}", [1] * prompt, SamplingParams(max_tokens=2), arrival_time=0.0)
            r.num_computed_tokens = rng.randrange(0, prompt)
            n = rng.randrange(1, prompt - r.num_computed_tokens + 1)
            r.block_ids = [next(blocks) % (runner.num_blocks - 1) + 1
                           for _ in range(-(-(r.num_computed_tokens + n) // runner.block_size))]
            prefills.append((r, n))
        if d + sum(n for _, n in prefills) > runner.token_buckets[-1]:
            continue
        args, rows = runner.mixed_inputs(decodes, prefills)
        dims = mixed_step_dims_for(decodes, prefills, runner.decode_buckets[-1], runner.token_buckets,
                                   runner.table_buckets)
        assert tuple(tuple(a.shape) for a in args) == dims.shapes(), (d, [n for _, n in prefills])
        # the cost model's prefill attention feature is these dims' work
        cells = template.prefill_cells([(r.num_computed_tokens, n) for r, n in prefills])
        assert cells == dims.attention_cells() * runner.block_size, (cells, dims)


def test_profiled_chunk_after_context_runs_and_carries_its_attention_cells(engine):
    """A grid point of a chunk after a prompt's first tokens, or of several chunks, runs through the real step (its
    prefill reads the earlier blocks) and its sample carries the attention work the cost model prices it by: that of
    its chunks at the graph's padding (a chunk after a context reads more keys; four chunks run four rows)."""
    runner = engine.runner
    template = profile.template_for(runner)
    grid = [(0, 32, 8, 0, 1), (0, 32, 8, 160, 1), (2, 30, 8, 96, 1), (0, 32, 8, 0, 4), (1, 30, 8, 40, 2)]
    (sig, samples), = profile.profile_runner(runner, [(False, ECSignature())], template, grid, repeats=1).items()
    cells = [s.shape.prefill_cells for s in samples]
    assert cells == [template.prefill_cells([(before, n) for n in profile.chunk_lens(p, k)])
                     for _, p, _, before, k in grid]
    assert cells[1] > cells[0] and cells[3] != template.prefill_cells([(0, 32)]) and all(s.seconds > 0 for s in samples)
    assert [s.shape.num_prefill_tokens for s in samples] == [p for _, p, *_ in grid]
