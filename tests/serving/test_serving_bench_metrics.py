"""``bench/serving.py``'s latency metrics: the per-token criterion with and without the gaps spanning a step that
captured a CUDA graph (a shape's one-off first occurrence)."""
import argparse

from bench.serving import metrics, passes


def two_requests():
    # request a: tokens every 10 ms, one 80 ms gap (0.05 -> 0.13) around a capturing step at 0.06-0.12;
    # request b: tokens every 10 ms, one 40 ms gap (0.30 -> 0.34) that spans no capture
    a = [0.01 * k for k in range(1, 6)] + [0.13 + 0.01 * k for k in range(0, 20)]
    b = [0.20 + 0.01 * k for k in range(0, 11)] + [0.34 + 0.01 * k for k in range(0, 14)]
    times = {"a": a, "b": b}
    meta = {"a": (0.0, 10, len(a)), "b": (0.19, 10, len(b))}
    return times, meta


def test_gaps_spanning_a_capture_are_left_out_of_the_no_capture_p99_only():
    times, meta = two_requests()
    m = metrics(times, meta, ttft_slo=1.0, tpot_slo=0.03, t0=0.0, capture_windows=[(0.06, 0.12)])
    # p99 interpolates between the two largest gaps: 40-80 ms with the capture's gap, 10-40 ms without it
    assert 40.0 < m["itl_ms_p99"] < 80.0
    assert 10.0 < m["itl_ms_p99_no_capture"] < 40.0                        # the 40 ms gap is not a capture's
    both = metrics(times, meta, ttft_slo=1.0, tpot_slo=0.03, t0=0.0, capture_windows=[(0.06, 0.12), (0.31, 0.33)])
    assert abs(both["itl_ms_p99_no_capture"] - 10.0) < 1e-6
    assert abs(m["capture_stall_s"] - 0.06) < 1e-9
    assert m["itl_violations"] == 2                                       # both gaps over 30 ms, as served
    none = metrics(times, meta, ttft_slo=1.0, tpot_slo=0.03, t0=0.0)
    assert none["itl_ms_p99_no_capture"] == none["itl_ms_p99"]


def test_passes_follows_the_criterion():
    times, meta = two_requests()
    # only the capture's gap is over 50 ms: the run fails with it and passes without it
    m = metrics(times, meta, ttft_slo=1.0, tpot_slo=0.05, t0=0.0, capture_windows=[(0.06, 0.12)])
    args = argparse.Namespace(ttft_slo_ms=1000.0, tpot_slo_ms=50.0, capacity_criterion="itl")
    assert not passes(m, args)
    assert passes(m, args, exclude_captures=True)
    args.capacity_criterion = "itl-no-capture"
    assert passes(m, args)
    assert not passes(m, args, exclude_captures=False)


def test_capture_replay_counts_captures_an_earlier_graph_would_have_covered(tmp_path):
    import json

    from bench.capture_replay import replay
    step = lambda dims, captured, ec=True: [8, 1, 40, 0, 0, list(dims), ec, captured, False, None, 0.01]  # noqa: E731
    raw = {"steps": [{"label": "a", "steps": [
        step((128, 8, 4, 2, 32, 8, 8), True),       # the first graph: nothing earlier covers it
        step((64, 8, 4, 2, 16, 8, 8), True),        # covered by the first only with a larger token bucket
        step((64, 8, 4, 2, 16, 8, 8), True, False),  # EC off: no graph of that state met earlier
        step((128, 8, 4, 4, 32, 8, 8), True),       # more chunk rows than any graph met before: never covered
    ]}]}
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    r = replay(str(path))
    assert r["captures"] == 4
    assert r["covered"][(2.0, 1.0)] == 0 and r["covered"][(2.0, 2.0)] == 1
    assert r["covered"][(4.0, 1.0)] == 0 and r["covered"][(4.0, 2.0)] == 1
