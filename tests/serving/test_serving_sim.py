"""``bench/serving_sim.py``: the simulated clock, the step cost it charges and the profile it reads."""
import argparse
import json

import pytest

from bench import serving_sim
from spear_compile.serving.scheduler import make_policy

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def sim_args(**kw):
    base = dict(num_blocks=4096, block_size=16, max_num_seqs=8, max_num_tokens=2048, token_buckets=TOKEN_BUCKETS,
                drain_s=5.0, host_ms=0.0, max_decode_rows=8)
    base.update(kw)
    return argparse.Namespace(**base)


class Constant:
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, decodes, prefills, sig):
        self.calls.append((len(decodes), sum(n for _, n in prefills)))
        return self.seconds


def test_one_request_costs_one_step_per_token():
    """FIFO, one 40-token prompt, 5 outputs, every step 10 ms: the prefill step gives the first token at 10 ms, each
    decode step one more token 10 ms later; the clock starts at the arrival (0.5 s)."""
    truth = Constant(0.01)
    m = serving_sim.simulate(make_policy("fifo"), [(0.5, [5] * 40, 5)], truth, (), sim_args(), 1.0, 0.05)
    assert truth.calls == [(0, 40), (1, 0), (1, 0), (1, 0), (1, 0)]
    assert m["completed"] == 1 and m["ttft_ms_p50"] == pytest.approx(10.0) and m["itl_ms_p99"] == pytest.approx(10.0)
    assert m["output_tokens"] == 5


def test_requests_past_the_drain_are_cut_off():
    """A step far longer than the drain window: the second request never starts (infinite TTFT)."""
    trace = [(0.0, [5] * 20, 3), (0.001, [5] * 20, 3)]
    m = serving_sim.simulate(make_policy("fifo"), trace, Constant(10.0), (), sim_args(drain_s=1.0), 1.0, 0.05)
    assert m["completed"] == 0 and m["ttft_ms_p99"] == float("inf")


def test_profile_drops_mixed_steps_with_a_full_batch_of_decodes(tmp_path):
    """Mixed samples with max_num_seqs decodes never happen in serving (grid-2 profiles took them uncaptured); the
    fit of exact samples has no residual spread."""
    layout = dict(decode_buckets=[1, 2, 4, 8], token_buckets=list(TOKEN_BUCKETS), table_buckets=[2, 4, 8, 16, 32],
                  block_size=16)
    rows = []
    for d, p in ((0, 14), (0, 126), (0, 510), (0, 2046), (2, 14), (2, 126), (4, 60), (4, 508), (8, 0), (4, 0), (1, 0),
                 (2, 0), (8, 24), (8, 1016)):
        t = 0.002 + 1e-5 * p + 1e-4 * d
        rows.append([d, p, 0, 0, [], t])
    path = tmp_path / "stepcost.json"
    path.write_text(json.dumps({"schema": 1, "fields": {"layout": layout, "gpu": "test"}, "samples": rows}))
    samples, got_layout, gpu = serving_sim.load_profile([str(path)], max_num_seqs=8)
    assert gpu == "test" and got_layout == layout
    assert len(samples) == len(rows) - 2 and not any(s.shape.num_decodes == 8 and s.shape.num_prefill_tokens
                                                     for s in samples)
    truth = serving_sim.TrueCost(serving_sim.fit(samples, layout)[0], samples, seed=0)
    assert truth.sigma < 0.05


def test_graph_keys_charge_a_new_shape_once_and_steps_beyond_the_limit_always():
    from types import SimpleNamespace
    layout = dict(decode_buckets=[1, 2, 4, 8], token_buckets=list(TOKEN_BUCKETS), table_buckets=[2, 4, 8, 16, 32])
    graphs = serving_sim.GraphKeys(limit=1, uncaptured_s=0.03, capture_s=0.02, layout=layout, max_num_seqs=8)

    def req(blocks, computed, tokens):
        return SimpleNamespace(block_ids=[1] * blocks, num_computed_tokens=computed, num_tokens=tokens)

    def plan(decodes, chunk):
        return SimpleNamespace(decodes=[req(3, 40, 41)] * decodes, prefills=[(req(2, 0, 30), chunk)])

    assert graphs.extra_s(SimpleNamespace(decodes=[req(3, 40, 41)], prefills=[])) == 0.0   # decode step: replays
    assert graphs.extra_s(plan(2, 10)) == pytest.approx(0.05)      # first of its shape: uncaptured, then captured
    assert graphs.extra_s(plan(2, 12)) == 0.0                      # the same padded shapes: replays
    assert graphs.extra_s(plan(2, 30)) == pytest.approx(0.03)      # a new shape beyond the limit: uncaptured
    assert graphs.extra_s(plan(2, 30)) == pytest.approx(0.03)      # ... every time
    assert (graphs.captures, graphs.uncaptured, len(graphs.keys)) == (1, 2, 1)


def test_warm_up_rates_go_both_ways_from_the_start_rate():
    from bench.serving import warmup_rate
    assert [warmup_rate(8.0, k) for k in range(5)] == [8.0, 16.0, 4.0, 32.0, 2.0]


def test_graph_keys_replay_a_larger_token_bucket_only_with_bucket_padding_and_charge_its_work():
    from types import SimpleNamespace
    layout = dict(decode_buckets=[1, 2, 4, 8], token_buckets=list(TOKEN_BUCKETS), table_buckets=[2, 4, 8, 16, 32],
                  block_size=16)
    charged = []
    truth = SimpleNamespace(at_tokens=lambda plan, tokens, sig: charged.append(tokens) or 0.004)

    def req(blocks, computed, tokens):
        return SimpleNamespace(block_ids=[1] * blocks, num_computed_tokens=computed, num_tokens=tokens)

    def plan(decodes, chunk):
        return SimpleNamespace(decodes=[req(3, 40, 41)] * decodes, prefills=[(req(2, 0, 30), chunk)])

    for bucket_padding, second in ((1.0, 0.05), (2.0, 0.004)):
        graphs = serving_sim.GraphKeys(limit=8, uncaptured_s=0.03, capture_s=0.02, layout=layout, max_num_seqs=8,
                                       max_padding=2.0, bucket_padding=bucket_padding, truth=truth)
        assert graphs.extra_s(plan(2, 28)) == pytest.approx(0.05)      # a 30-token step: the 32 bucket, captured
        assert graphs.extra_s(plan(2, 10)) == pytest.approx(second)    # a 12-token step (16): captures, or replays 32
        # the engine's answer to the SLO policy: the covering graph's tokens (None: the step runs at its own dims)
        told = graphs.run_dims(2, 41, [(0, 9, False)])
        assert (told is not None and told[0] == 32) == (bucket_padding > 1), told
    assert charged == [32]


def test_offline_sim_runs_both_scheduler_rules(capsys):
    """``bench.offline_sim`` on a committed H100 profile: a row per rule and capture cost; capture costs only slow a
    pass down, and the engine's padded decode rows never need more graph keys than exact counts on this trace."""
    from bench import offline_sim
    offline_sim.main(["--stepcost", "bench/tune_cache/stepcost-8c3881410172c3bf.json,"
                      "bench/tune_cache/stepcost-f240af304a0111c7.json", "--requests", "48", "--capture-ms", "0,50"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| padded")
            or line.startswith("| exact")]
    assert len(rows) == 4
    cells = {(r[0][2:], float(r[1])): (float(r[2]), int(r[3]), float(r[4]), int(r[5].rstrip(" |"))) for r in rows}
    for rule in ("padded decode rows (engine)", "exact decode rows (before session 33)"):
        free, costly = cells[(rule, 0.0)], cells[(rule, 50.0)]
        assert costly[0] < free[0] and costly[1] == free[1] > 0
    assert cells[("padded decode rows (engine)", 0.0)][1] <= cells[("exact decode rows (before session 33)", 0.0)][1]
