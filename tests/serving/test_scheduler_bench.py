"""The serving benchmark's metric definitions (vLLM bench serve / DistServe) on hand-made token timelines, its trace
generator, and the capacity search's bisection on a fake probe."""
import importlib.util
import math
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "serving.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serving_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_metrics_on_known_timelines(bench):
    t0 = 100.0
    meta = {"a": (t0, 10, 4), "b": (t0 + 1.0, 10, 3), "c": (t0 + 2.0, 10, 5), "d": (t0 + 2.5, 10, 2)}
    times = {"a": [t0 + 0.2, t0 + 0.25, t0 + 0.30, t0 + 0.35],      # TTFT 200 ms, gaps 50 ms: good
             "b": [t0 + 1.5, t0 + 1.6, t0 + 1.9],                   # TTFT 500 ms, TPOT 200 ms: misses the TPOT SLO
             "c": [t0 + 2.1, t0 + 2.12],                            # cut off after 2 of 5 tokens
             "d": []}                                               # never started
    m = bench.metrics(times, meta, ttft_slo=0.3, tpot_slo=0.1, t0=t0)
    assert m["num_requests"] == 4 and m["completed"] == 2
    assert m["ttft_ms_p99"] == math.inf                             # the never-started request
    assert m["num_itl"] == 3 + 2 + 1 and m["itl_violations"] == 1   # b's 100 ms gap is within, its 300 ms is not
    assert m["slo_attainment"] == 0.25                              # only a meets both
    assert abs(m["duration_s"] - 2.12) < 1e-9
    assert abs(m["goodput_rps"] - 1 / 2.12) < 1e-9 and abs(m["throughput_rps"] - 2 / 2.12) < 1e-9
    assert abs(m["output_tok_s"] - 9 / 2.12) < 1e-9
    assert abs(m["tpot_ms_p50"] - 50.0) < 1e-6                      # a: 50, b: 200, c (so far): 20
    assert abs(m["e2el_ms_p50"] - (350 + 900) / 2) < 1e-6


def test_percentiles_and_capacity_criterion(bench):
    assert bench.pct([1, 2, 3, 4], 50) == 2.5 and bench.pct([5], 99) == 5 and bench.pct([], 50) is None
    assert bench.pct([1, 2, math.inf], 99) == math.inf and bench.pct([1, 2, math.inf], 0) == 1
    args = type("A", (), {"ttft_slo_ms": 1000.0, "tpot_slo_ms": 30.0})
    ok = {"ttft_ms_p99": 900.0, "itl_ms_p99": 29.0, "tpot_ms_p99": 10.0}
    assert bench.passes(ok, args) and bench.passes_tpot(ok, args)
    assert not bench.passes(dict(ok, itl_ms_p99=31.0), args) and bench.passes_tpot(dict(ok, itl_ms_p99=31.0), args)
    assert not bench.passes(dict(ok, ttft_ms_p99=math.inf), args)


def test_trace_is_seeded_with_the_requested_rate_and_clipped_lengths(bench):
    a = bench.make_trace(20.0, 50.0, seed=3, max_prompt=300, max_output=64, vocab=1000)
    assert a == bench.make_trace(20.0, 50.0, seed=3, max_prompt=300, max_output=64, vocab=1000)
    assert abs(len(a) / 50.0 - 20.0) < 3.0
    assert all(4 <= len(ids) <= 300 and 2 <= o <= 64 and all(3 <= t < 1000 for t in ids) for _, ids, o in a)
    assert max(len(ids) for _, ids, _ in a) == 300                  # the long tail reaches the clip
    bursty = bench.make_trace(20.0, 50.0, seed=3, max_prompt=300, max_output=64, vocab=1000, burstiness=0.25)
    gaps = [y[0] - x[0] for x, y in zip(bursty, bursty[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert 1.5 < cv < 2.6                                            # gamma shape 0.25: CV 2 (Poisson: 1)


def test_capacity_search_brackets_a_known_threshold(bench, monkeypatch):
    threshold = {"fast": 7.0, "slow": 1.3}
    calls = []

    def fake_probe(bundle, policy, rate, args, seed, label=None, **kw):
        calls.append((label, rate))
        ok = rate <= threshold[label]
        return {"label": label, "rate": rate, "ttft_ms_p99": 10.0 if ok else 5000.0, "itl_ms_p99": 10.0,
                "tpot_ms_p99": 10.0}

    monkeypatch.setattr(bench, "probe", fake_probe)
    args = type("A", (), {"ttft_slo_ms": 1000.0, "tpot_slo_ms": 30.0, "probes": 6, "duration": 1.0,
                          "drain_s": 1.0, "json": None})
    clock = bench.Clock(1e9)
    results = {"runs": [], "skipped": []}
    caps = bench.capacity_search([(None, "p", "fast"), (None, "p", "slow")], 2.0, args, clock, results)
    assert caps["fast"]["capacity_rps"] <= 7.0 < caps["fast"]["first_failing_rps"]
    assert caps["slow"]["capacity_rps"] <= 1.3 < caps["slow"]["first_failing_rps"]
    assert caps["fast"]["first_failing_rps"] / caps["fast"]["capacity_rps"] < 1.5   # bisection narrowed it
    assert [c[0] for c in calls[:2]] == ["fast", "slow"]                          # round-robin
