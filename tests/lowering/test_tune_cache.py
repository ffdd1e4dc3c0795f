"""The on-disk tuning cache (``lowering/tune_cache.py``) as the dispatch tuner uses it, on CPU: the tuner's
``can_tune`` is forced on and its ``tune`` replaced by a fake that times nothing (candidate i "takes" 1 + i ms, the second one 0.5 ms,
the last one fails), so a cache hit shows as a key that reaches no ``tune`` call."""
import contextlib
import json
import os
import warnings

import pytest
import torch

from spear_compile import options
from spear_compile.lowering import candidates, dispatch, grouped as grouped_module, runtime, tune_cache
from spear_compile.lowering.tuner import group_key, linear_key

TUNER = runtime.TUNER

K, N, GS = 2048, 2048, 128
NS = (2048, 512, 512)  # grouped members (q|k|v-like)
DT = torch.bfloat16
GPU = {"gpu": "Test GPU", "sms": 132}


def fake_tune(calls):
    def tune(key, cands, run, reference, out):
        calls.append((key, [c.name for c in cands]))
        results = [(c.name, 1.0 + i) for i, c in enumerate(cands)]
        if len(cands) > 1:
            results[1] = (cands[1].name, 0.5)
        if len(cands) > 2:
            results[-1] = (cands[-1].name, "failed: OutOfResources")
        TUNER.timings[key] = results
        return cands[1] if len(cands) > 1 else cands[0]
    return tune


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The keys ``tune`` was called for; the cache in ``tmp_path``, a made-up GPU, clean in-process state."""
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(tune_cache, "_device_fields", lambda device: dict(GPU))
    monkeypatch.setattr(TUNER, "can_tune", lambda x: True)
    log = []
    monkeypatch.setattr(TUNER, "tune", fake_tune(log))
    dispatch.clear_tuning()
    yield log
    dispatch.clear_tuning()


def single(m=1, ec=False, gated=False, gs=GS):
    """``_config_for`` of a ``[m, K] x [N, K]`` linear (+ r = 32 EC) on CPU tensors (``tune`` is fake)."""
    x = torch.randn(m, K, dtype=DT)
    q = torch.zeros(N, K // 2, dtype=torch.uint8)
    s = torch.ones(N, K // gs, dtype=DT)
    a, b = (torch.zeros(32, K, dtype=DT), torch.zeros(N, 32, dtype=DT)) if ec else (None, None)
    gw, gb = (torch.zeros(32, 32, dtype=DT), torch.zeros(32, dtype=DT)) if gated else (None, None)
    args = (x, q, s, s, None, gs, a, b, gw, gb, None, torch.empty(m, N, dtype=DT))
    return dispatch.config_for(x, args, K, N, gs, ec, gated)


def grouped(m=1):
    x = torch.randn(m, K, dtype=DT)
    qs = [torch.zeros(n, K // 2, dtype=torch.uint8) for n in NS]
    ss = [torch.ones(n, K // GS, dtype=DT) for n in NS]
    return grouped_module.grouped_config_for(x, qs, ss, ss, [None] * len(NS), GS, torch.empty(m, sum(NS), dtype=DT))


def cache_files(tmp_path):
    return sorted(p for p in os.listdir(tmp_path))


def restart():
    """What a new process starts with: no tuned configs, no log, no file read."""
    dispatch.clear_tuning()


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_the_tuner_counts_keys_it_timed_not_cache_hits(calls, tmp_path):
    """``tuned_keys`` / ``tune_seconds`` (the engine's start-up breakdown): a key timed counts, a key found in the
    cache file by the next process does not, ``clear`` resets both."""
    single(1)
    grouped(1)
    assert TUNER.tuned_keys == 2 and TUNER.tune_seconds >= 0.0
    restart()
    assert TUNER.tuned_keys == 0 and TUNER.tune_seconds == 0.0
    single(1)
    grouped(1)
    assert TUNER.tuned_keys == 0 and len(calls) == 2
    single(4)
    assert TUNER.tuned_keys == 1


@pytest.mark.parametrize("m,gs", [(1, GS), (1, K), (4, GS), (200, GS)])
def test_a_tuned_key_is_reused_by_the_next_process(calls, tmp_path, m, gs):
    cfg = single(m, gs=gs)
    key = linear_key(m, K, N, gs, DT, False, False)
    assert [k for k, _ in calls] == [key]
    log = TUNER.timings.get(key, [])
    assert len(cache_files(tmp_path)) == 1 and cache_files(tmp_path)[0].endswith(".json")  # no temp file left
    restart()
    with no_warnings():
        again = single(m, gs=gs)
    assert len(calls) == 1  # no second tune call
    assert again == cfg and again.name == cfg.name and type(again) is type(cfg)
    assert TUNER.timings.get(key, []) == log  # the timed list as the tuner's timings held it (tuples, floats, failure strings)
    stored = next(iter(TUNER.cache.loaded.values()))
    (restored,) = [k for k in stored if k == key]
    assert [type(v) for v in restored] == [type(v) for v in key]  # the tuple restored exactly (bools stay bools)


@pytest.mark.parametrize("m", [1, 4])
def test_grouped_keys_are_reused(calls, tmp_path, m):
    cfg = grouped(m)
    key = group_key(m, K, list(NS), GS, DT, False)
    assert [k for k, _ in calls] == [key]
    restart()
    again = grouped(m)
    assert len(calls) == 1 and again == cfg and again.name == cfg.name
    stored = next(iter(TUNER.cache.loaded.values()))
    (restored,) = [k for k in stored if k == key]
    assert restored == key and isinstance(restored[3], tuple)  # member widths: a tuple again


@pytest.mark.parametrize("gated", [True, False])
def test_ec_decode_keys_rebuild_their_candidates_from_the_restored_w4_ranking(calls, gated):
    """The EC key's candidates come from the W4 key's ranking (``Tuner.ranked`` over its timings): after a restart
    both keys hit, the W4 key's log is restored first, so the EC candidates and pick are the same."""
    cfg = single(1, ec=True, gated=gated)
    w4_key, ec_key = (linear_key(1, K, N, GS, DT, False, False), linear_key(1, K, N, GS, DT, True, gated, 32))
    assert [k for k, _ in calls] == [w4_key, ec_key]
    ec_cands = calls[1][1]
    w4_cands = candidates.decode_candidates(K, N, GS, 132, False, 1)
    ranked = TUNER.ranked(w4_key, w4_cands)
    assert ranked[0] == w4_cands[1]  # the fake's winner leads the ranking the EC candidates are made of
    restart()
    again = single(1, ec=True, gated=gated)
    assert len(calls) == 2 and again == cfg and again.name == cfg.name == ec_cands[1]
    assert TUNER.ranked(w4_key, w4_cands) == ranked
    assert TUNER.picks[w4_key] == w4_cands[1]


def test_two_processes_saving_different_keys_both_survive(calls, tmp_path):
    """Process B reads the (empty) cache, process A tunes and saves a key, then B tunes and saves another: B's
    save re-reads the file and merges, so a third process finds both."""
    assert TUNER.cache.lookup(("any",), [], torch.device("cpu")) is None  # B: reads the cache (no file yet)
    b_loaded = dict(TUNER.cache.loaded)
    TUNER.cache.loaded.clear()
    single(1)  # A: its own read, tune, save
    TUNER.cache.loaded.clear()
    TUNER.cache.loaded.update(b_loaded)
    grouped(1)  # B: a miss in what it read, tune, save after A's save
    assert len(calls) == 2
    restart()
    single(1), grouped(1)
    assert len(calls) == 2
    assert len(cache_files(tmp_path)) == 1


@pytest.mark.parametrize("change", ["code", "gpu", "sms", "torch", "triton", "gluon_swap"])
def test_another_environment_retunes(calls, tmp_path, monkeypatch, change):
    cfg = single(1)
    restart()
    if change == "gluon_swap":   # a switch that adds candidates: the other setting's picks are not served
        monkeypatch.setenv("SPEAR_GLUON_SWAP", "0" if options.current().gluon_swap else "1")
    elif change == "code":
        monkeypatch.setattr(tune_cache, "_code_hash", lambda: "0123456789abcdef")
    elif change in ("gpu", "sms"):
        other = dict(GPU, **({"gpu": "Other GPU"} if change == "gpu" else {"sms": 114}))
        monkeypatch.setattr(tune_cache, "_device_fields", lambda device: other)
    else:
        monkeypatch.setattr(torch if change == "torch" else tune_cache.triton, "__version__", "0.0.0")
    with no_warnings():  # another environment's file has another name: a plain miss
        assert single(1) == cfg
    assert len(calls) == 2
    assert len(cache_files(tmp_path)) == 2  # the other environment's file is left as it was


def _file(tmp_path):
    (name,) = cache_files(tmp_path)
    return os.path.join(tmp_path, name)


def _edit(path, fn):
    with open(path) as f:
        doc = json.load(f)
    fn(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _set(where, value):
    def fn(doc):
        target = doc
        for part in where[:-1]:
            target = target[part]
        target[where[-1]] = value
    return fn


def _write(data):
    def fn(path):
        with open(path, "wb") as f:
            f.write(data)
    return fn


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    _write(data[:len(data) // 2])(path)


BROKEN = {
    "not json": _write(b"{not json"),
    "truncated": _truncate,
    "empty": _write(b""),
    "binary": _write(b"\xff\xfe\x00garbage"),
    "a list": _write(b"[]"),
    "schema 2": lambda path: _edit(path, _set(["schema"], 2)),
    "no schema": lambda path: _edit(path, lambda doc: doc.pop("schema")),
    "other header": lambda path: _edit(path, _set(["fields", "gpu"], "Other GPU")),
    "entries a dict": lambda path: _edit(path, _set(["entries"], {})),
    "key a string": lambda path: _edit(path, _set(["entries", 0, "key"], "k")),
    "key with a float": lambda path: _edit(path, _set(["entries", 0, "key", 0], 2048.0)),
    "key with null": lambda path: _edit(path, _set(["entries", 0, "key", 0], None)),
    "config an int": lambda path: _edit(path, _set(["entries", 0, "config"], 3)),
    "results missing": lambda path: _edit(path, lambda doc: doc["entries"][0].pop("results")),
    "ms a list": lambda path: _edit(path, _set(["entries", 0, "results", 0, 1], [1.0])),
    "ms an int": lambda path: _edit(path, _set(["entries", 0, "results", 0, 1], 1)),
    "result of 3": lambda path: _edit(path, _set(["entries", 0, "results", 0], ["a", 1.0, 2.0])),
    "bad second entry": lambda path: _edit(path, lambda doc: doc["entries"].append({"key": [1], "config": None})),
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_a_damaged_file_is_ignored_wholesale_with_one_warning(calls, tmp_path, damage):
    cfg = single(1)
    path = _file(tmp_path)
    BROKEN[damage](path)
    restart()
    with pytest.warns(UserWarning, match="tuning cache") as seen:
        assert single(1) == cfg  # re-tuned, no exception (never half-loaded: the valid first entry is not used)
        single(4)  # the save after it re-reads the same damaged file: no second warning
    assert len(calls) == 3
    assert sum("tuning cache" in str(w.message) for w in seen) == 1
    assert path in str(seen[0].message)
    restart()
    with no_warnings():  # the next save replaced the damaged file by a good one
        single(1), single(4)
    assert len(calls) == 3


def test_a_cached_name_not_among_the_candidates_retunes_with_a_warning(calls, tmp_path):
    cfg = single(1)
    path = _file(tmp_path)
    _edit(path, _set(["entries", 0, "config"], "decode[no such config]"))
    restart()
    with pytest.warns(UserWarning, match="not among the tuner's candidates"):
        assert single(1) == cfg
    assert len(calls) == 2
    restart()
    single(1)  # the re-tune overwrote the entry
    assert len(calls) == 2


@pytest.mark.parametrize("value", ["0", ""])
def test_disabled_by_env(calls, tmp_path, monkeypatch, value):
    monkeypatch.setenv("SPEAR_TUNE_CACHE", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tune_cache.cache_dir() is None
    single(1), grouped(1)
    restart()
    single(1), grouped(1)
    assert len(calls) == 4
    assert cache_files(tmp_path) == []


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("SPEAR_TUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune_cache.cache_dir() == os.path.join(tmp_path / "xdg", "spear_compile")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tune_cache.cache_dir() == os.path.join(tmp_path / "home", ".cache", "spear_compile")


def test_unwritable_cache_dir_warns_and_still_tunes(calls, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPEAR_TUNE_CACHE", str(blocker / "cache"))  # a directory under a file: cannot be made
    with pytest.warns(UserWarning) as seen:
        cfg = single(1)
    assert any("could not save" in str(w.message) for w in seen)
    assert cfg == TUNER.picks[linear_key(1, K, N, GS, DT, False, False)]


def test_the_suite_does_not_use_the_home_cache():
    """conftest turns the cache off for every other test (they must not write to the user's cache)."""
    assert os.environ.get("SPEAR_TUNE_CACHE") == "0"
