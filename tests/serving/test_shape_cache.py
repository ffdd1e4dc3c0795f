"""The mixed-step shape cache (``serving/shape_cache.py``) on CPU with stand-in graphs: the shapes one engine
captures while serving are captured by the next start-up of the same engine, which then serves the same requests
without a first step, with the same tokens; a corrupt file is refused whole (a warning) and rewritten; another
engine layout or the cache switched off reads nothing."""
import json
import os
import warnings

import pytest
import torch

from spear_compile.serving import SamplingParams
from spear_compile.serving.buckets import MixedDims

from .conftest import make_engine, toy_model

LENS = (5, 13, 3, 9, 21, 2)


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 8000, (n,), generator=g).tolist() for n in LENS]


def engine(tokenizer, **kw):
    return make_engine(toy_model(), tokenizer, cuda_graphs=True, cuda_graphs_stand_in=True, compile=False,
                       max_num_seqs=4, max_num_tokens=16, token_buckets=(8, 16), max_model_len=64, policy="budget-8",
                       **kw)


def serve(eng):
    return [o.output_token_ids for o in eng.generate(prompts(), SamplingParams(max_tokens=5, temperature=0.0,
                                                                               ignore_eos=True))]


def shape_files(directory):
    return sorted(f for f in os.listdir(directory) if f.startswith("mixed-shapes-"))


def test_next_start_up_captures_the_shapes_served(tmp_path, monkeypatch, ref_tokenizer):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(tmp_path))
    first = engine(ref_tokenizer)
    assert len(first.runner.mixed.graphs) == 0
    want = serve(first)
    captured = set(first.runner.mixed.graphs)
    assert captured and first.runner.mixed.first_steps == len(captured)
    (name,) = shape_files(tmp_path)
    with open(tmp_path / name) as f:
        rows = json.load(f)["shapes"]
    assert {(ec, MixedDims(**d).shapes()) for ec, d in rows} == captured

    second = engine(ref_tokenizer)
    assert set(second.runner.mixed.graphs) == captured     # captured at start-up, over the padding block
    assert second.runner.warmup_breakdown["mixed_graphs"] == len(captured)
    steps_at_start = second.runner.mixed.first_steps
    assert serve(second) == want                            # the same tokens ...
    assert second.runner.mixed.first_steps == steps_at_start  # ... and no first step while serving
    assert second.runner.mixed.replays > 0
    assert shape_files(tmp_path) == [name]


def test_corrupt_file_is_refused_whole_and_rewritten(tmp_path, monkeypatch, ref_tokenizer):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(tmp_path))
    want = serve(engine(ref_tokenizer))
    (name,) = shape_files(tmp_path)
    path = tmp_path / name
    with open(path) as f:
        data = json.load(f)
    good = len(data["shapes"])
    data["shapes"].append([True, {"tokens": -3}])     # one bad entry: nothing of the file is used
    path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eng = engine(ref_tokenizer)
    assert any("mixed-step shape cache" in str(w.message) and name in str(w.message) for w in seen)
    assert len(eng.runner.mixed.graphs) == 0
    assert serve(eng) == want
    with open(path) as f:
        assert len(json.load(f)["shapes"]) == good        # rewritten from what this engine captured
    for bad in ("{not json", json.dumps(dict(data, shapes=[[True, list(MixedDims.__dataclass_fields__)]])),
                json.dumps(dict(data, shapes=7)), json.dumps(dict(data, schema=99))):
        path.write_text(bad)
        with pytest.warns(UserWarning, match="mixed-step shape cache"):
            assert len(engine(ref_tokenizer).runner.mixed.graphs) == 0


def test_other_layout_or_cache_off_reads_nothing(tmp_path, monkeypatch, ref_tokenizer):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(tmp_path))
    serve(engine(ref_tokenizer))
    other = engine(ref_tokenizer, mixed_graph_bucket_padding=1.0)   # other paddings: other shapes, another file
    assert len(other.runner.mixed.graphs) == 0
    off = engine(ref_tokenizer, mixed_shape_cache=False)
    assert off.runner.shapes is None and len(off.runner.mixed.graphs) == 0
    serve(off)
    assert len(shape_files(tmp_path)) == 1   # the off engine wrote nothing
    monkeypatch.setenv("SPEAR_TUNE_CACHE", "0")
    assert engine(ref_tokenizer).runner.shapes.path is None
