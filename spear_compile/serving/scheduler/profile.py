"""Start-up profiling sweep for the step cost model, and its on-disk cache.

``profile_runner`` runs the engine's real step function (``ModelRunner.execute``: the compiled graphs, the decode
CUDA graphs) on synthetic batches over a grid of (decodes, prefill tokens, context per decode) for each EC state
the engine serves, timing each point like the engine times a step (``Engine.step`` measures wall time up to the
sampled tokens' read-back, which ends the step on the device: here execute + an argmax read back; median of a few
repeats). Synthetic requests read and write arbitrary KV blocks, so it runs only on an idle
engine (start-up, before any request).

The samples are cached as JSON beside the tuning cache (``tune_cache.cache_dir()``), one file per EC state, keyed
like it: GPU name, SM count, torch, triton, the lowering's code hash, plus the model's shape and weight formats, the
engine's step layout (buckets, block size, CUDA graphs, compile), the model runner's code and the EC signature.
A file that does not parse or does not match is ignored with a warning and rewritten.
"""
from __future__ import annotations

import glob
import hashlib
import os
import statistics
import time
from typing import Optional

from ...errors import SpearError
from .. import json_cache
from ..json_cache import engine_layout, model_fingerprint
from ..buckets import MIN_DIM
from ..request import Request, SamplingParams
from .cost_model import StepCostModel, StepSample, StepShape, fit_models, mixed_rows
from .ec_signature import ECSignature, ec_signature

SCHEMA = 1
GRID_VERSION = 5  # 2: mixed steps' decode rows padded as buckets.mixed_decode_rows (samples' padded tokens, KV);
#                   3: a mixed point runs at most max_num_seqs - 1 decodes (the prefill is a running request too);
#                   4: chunks after a prompt's first tokens (the prefill attention feature), samples carry its cells;
#                   5: steps of 2 and 4 chunks (their graphs pad chunk rows and lengths: the attention feature's
#                      largest values, which session 23's H100 serving met and the profile never ran)


# ----------------------------------------------------------------------------------------------- the grid
def default_grid(decode_buckets, token_buckets, max_model_len: int, max_points: Optional[int] = None,
                 mixed_min_rows: int = 0, max_num_seqs: Optional[int] = None) -> list:
    """(decodes, prefill tokens, context per decode, prompt tokens before each chunk, chunks) points: decodes on the
    decode buckets (and 0); prefill so that a step's tokens land on each token bucket (and 0); three contexts (short, a
    quarter and half of the longest); chunks from a prompt's start, and, beside no decodes and the middle decode
    bucket, chunks after a quarter and half of the longest context (their attention reads it: the cost model's
    prefill attention feature needs both kinds to tell chunk length from the keys read).
    A step with a prefill runs at most ``max_num_seqs - 1`` decodes (the prefilling request is running too): a
    point beside a full decode bucket takes one decode fewer (session 20: 64 decodes + a prefill needed 128 logits
    rows, more than the engine's mixed-step graphs hold, so those points ran uncaptured at 30-45 ms and skewed the
    fit). Then, at the four largest token buckets, 2 and 4 chunks of equal length (``chunk_lens``) from a prompt's
    start and after a quarter of the longest context: their graphs pad the chunk rows and lengths, the prefill
    attention's largest work. ``max_points`` keeps an evenly spaced subset (tiny CPU sweeps)."""
    ctxs = sorted({min(64, max_model_len // 4), max(2, max_model_len // 4), max(2, max_model_len // 2)})
    points = []
    for bucket in (0,) + tuple(decode_buckets):
        d = bucket if max_num_seqs is None else min(bucket, max_num_seqs - 1)   # decodes beside a prefill
        rows = [(b, mixed_rows(d, b - d, decode_buckets, token_buckets, mixed_min_rows)) for b in token_buckets]
        steps = ([(bucket, 0)] if bucket else []) + [(d, b - r) for b, r in rows if b > max(r, d)]
        for decodes, p in steps:
            for c in (ctxs if decodes else ctxs[:1]):
                if p + 1 < max_model_len:
                    points.append((decodes, p, c, 0, 1))
    befores = sorted({max(2, max_model_len // 4), max(2, max_model_len // 2)})
    few = sorted({0, tuple(decode_buckets)[len(decode_buckets) // 2] if decode_buckets else 0})
    # (chunks, token buckets, tokens before each chunk, fewest prefill tokens): one chunk after a context at every
    # bucket; 2 and 4 chunks at the largest buckets, where padded chunk rows cost the most
    for chunks, buckets, chunk_befores, least in ((1, token_buckets, befores, 1),
                                                   (2, token_buckets[-4:], (0, befores[0]), 2 * MIN_DIM),
                                                   (4, token_buckets[-4:], (0, befores[0]), 4 * MIN_DIM)):
        for bucket in few:
            d = bucket if max_num_seqs is None else max(0, min(bucket, max_num_seqs - chunks))
            for b in buckets:
                p = b - mixed_rows(d, b - d, decode_buckets, token_buckets, mixed_min_rows) if d else b
                for before in chunk_befores:
                    if p >= least and before + -(-p // chunks) + 1 < max_model_len:
                        points.append((d, p, ctxs[0], before, chunks))
    points = list(dict.fromkeys(points))  # (two buckets can meet at max_num_seqs - 1)
    if max_points and len(points) > max_points:
        step = len(points) / max_points
        points = [points[int(i * step)] for i in range(max_points)]
    return points


def chunk_lens(p: int, chunks: int) -> list:
    """``p`` prefill tokens as ``chunks`` chunks of (nearly) equal length."""
    return [p // chunks + (j < p % chunks) for j in range(chunks)] if p else []


def _fake_requests(d: int, p: int, ctx: int, num_blocks: int, block_size: int, before: int = 0, chunks: int = 1):
    """``d`` decoding requests with ``ctx`` tokens cached and ``chunks`` prefill requests sharing ``p`` prompt
    tokens (``chunk_lens``), each after ``before`` already computed, on block ids cycling over the usable blocks
    (aliasing is harmless: nothing reads the results)."""
    nxt = [1]

    def blocks(n_tokens):
        out = []
        for _ in range(-(-n_tokens // block_size)):
            out.append(nxt[0])
            nxt[0] = nxt[0] % (num_blocks - 1) + 1
        return out

    decodes = []
    for k in range(d):
        r = Request(f"profile-d{k}", [1] * ctx, SamplingParams(max_tokens=2), arrival_time=0.0)
        r.output_token_ids = [1]
        r.num_computed_tokens = ctx
        r.block_ids = blocks(ctx + 1)
        decodes.append(r)
    prefills = []
    for j, n in enumerate(chunk_lens(p, chunks)):
        r = Request(f"profile-p{j}", [1] * (before + n), SamplingParams(max_tokens=2), arrival_time=0.0)
        r.num_computed_tokens = before
        r.block_ids = blocks(before + n)
        prefills.append((r, n))
    return decodes, prefills


def profile_runner(runner, ec_states, cost_model_template: StepCostModel, grid, repeats: int = 3,
                   progress: bool = False) -> dict:
    """Time ``runner.execute`` on every grid point for each ``(use_ec, signature)`` of ``ec_states``.
    Returns ``{signature: [StepSample, ...]}``; samples carry the padded token count and the context feature of
    ``cost_model_template`` (its buckets and KV layout)."""
    import torch
    out = {}
    total = len(grid) * len(ec_states)
    bar = _progress(total, progress)
    for use_ec, sig in ec_states:
        samples = []
        for d, p, c, before, chunks in grid:
            decodes, prefills = _fake_requests(d, p, c, runner.num_blocks, runner.block_size, before, chunks)
            with torch.no_grad():
                if runner.device.type == "cuda":
                    time_step(runner, decodes, prefills, use_ec)  # warm (first touch of this shape's buffers)
                times = [time_step(runner, decodes, prefills, use_ec) for _ in range(repeats)]
            padded = cost_model_template.pad(d, p)
            kv = cost_model_template.context_feature(d, d * (c + 1), c + 1, mixed=p > 0, num_prefill_tokens=p)
            cells = cost_model_template.prefill_cells([(before, n) for n in chunk_lens(p, chunks)])
            samples.append(StepSample(StepShape(d, p, kv, padded, cells), sig, statistics.median(times)))
            bar.update(1)
        out[sig] = samples
    bar.close()
    return out


def time_step(runner, decodes, prefills, use_ec) -> float:
    """Wall time of one step as the engine sees it: execute, then read the next tokens back (greedy here)."""
    t0 = time.perf_counter()
    logits, rows = runner.execute(decodes, prefills, use_ec)
    logits[:rows].argmax(-1).tolist()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- the cache
def _runner_code_hash() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):  # the serving package: runner, attention, engine
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def cache_fields(device, model, layout: dict, sig: ECSignature) -> dict:
    from ...lowering import tune_cache
    return dict(tune_cache.environment(device), model=model_fingerprint(model), layout=layout,
                runner=_runner_code_hash(), grid=GRID_VERSION, ec=sig.key)


def cache_path(fields: dict) -> Optional[str]:
    return json_cache.path_for("stepcost", fields)


def _parse_samples(rows) -> list:
    if not isinstance(rows, list) or not rows:
        raise ValueError("no samples")
    return [StepSample.from_json(r) for r in rows]


def load_samples(path: Optional[str], fields: dict) -> Optional[list]:
    """The cached samples, or None when missing, or (with a warning) unreadable, corrupt or for another key."""
    return json_cache.load(path, SCHEMA, fields, "samples", _parse_samples, "step-cost profile",
                           "re-profiled and rewritten")


def save_samples(path: Optional[str], fields: dict, samples: list) -> None:
    """Write atomically (temporary file + ``os.replace``); a failed write warns and changes nothing."""
    json_cache.save(path, SCHEMA, fields, "samples", [s.to_json() for s in samples], "step-cost profile")


# ----------------------------------------------------------------------------------------------- engine entry point
def template_for(runner) -> StepCostModel:
    """An unfitted model with the engine's buckets and KV layout (pads and computes features like the engine)."""
    return StepCostModel(decode_buckets=runner.decode_buckets, token_buckets=runner.token_buckets,
                         kv_layout=(runner.block_size, runner.table_buckets), mixed_min_rows=MIN_DIM)


def profile_engine(engine, extra_samples=(), refresh: bool = False, repeats: int = 3, max_points=None,
                   progress: bool = False) -> list:
    """Samples for every EC state ``engine`` serves (ECs on and off), from the cache or profiled now (and cached).
    ``extra_samples``: samples of other EC sets (e.g. another engine's) to fit together with these."""
    runner, model = _runner_of(engine), _model_of(engine)
    if engine.has_unfinished():
        raise SpearError("profile_engine: the engine is serving requests; profile at start-up (idle engine)")
    if True in runner.ec_states() and False not in runner.ec_states():
        raise SpearError("profile_engine: the EC-aware and EC-blind cost models need steps without ECs too; start the "
                         "engine with EngineConfig(ec_switch=True)")
    layout = engine_layout(runner)
    template = template_for(runner)
    grid = default_grid(runner.decode_buckets, runner.token_buckets, runner.max_model_len, max_points,
                        MIN_DIM, runner.config.max_num_seqs)
    layout = dict(layout, grid_points=len(grid), repeats=repeats)
    samples = list(extra_samples)
    todo = []
    for use_ec in runner.ec_states():
        sig = ec_signature(model) if use_ec else ECSignature()
        fields = cache_fields(runner.device, model, layout, sig)
        path = cache_path(fields)
        cached = None if refresh else load_samples(path, fields)
        if cached is not None:
            samples += cached
        else:
            todo.append((use_ec, sig, fields, path))
    if todo:
        got = profile_runner(runner, [(u, s) for u, s, _, _ in todo], template, grid, repeats, progress)
        for use_ec, sig, fields, path in todo:
            save_samples(path, fields, got[sig])
            samples += got[sig]
    return samples


def cost_models_for(engine, extra_samples=(), refresh: bool = False, samples=None, **kwargs) -> tuple:
    """(EC-aware, EC-blind) step cost models fitted on ``samples`` (default: ``profile_engine(engine)``'s)."""
    runner = _runner_of(engine)
    if samples is None:
        samples = profile_engine(engine, extra_samples, refresh, **kwargs)
    return fit_models(samples, runner.decode_buckets, runner.token_buckets,
                      kv_layout=(runner.block_size, runner.table_buckets), mixed_min_rows=MIN_DIM)


def _runner_of(engine):
    runner = getattr(engine, "runner", None) or getattr(engine, "model_runner", None)
    if runner is None or not hasattr(runner, "execute"):
        raise SpearError(f"profile: {type(engine).__name__} has no model runner (.runner with execute())")
    return runner


def _model_of(engine):
    return getattr(engine, "model", None) or getattr(engine.runner, "net", None)


def _progress(total: int, enabled: bool):
    import sys
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="spear serving: step-cost profile", file=sys.stderr, disable=not enabled,
                leave=False)
