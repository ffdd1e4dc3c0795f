"""``ServingMetrics`` on a fake clock: latencies from hand-computed values, one registry per object, engine gauges
read at scrape time, the text parses as Prometheus."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from spear_compile.serving.metrics import ServingMetrics  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _samples(metrics: ServingMetrics) -> dict:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "le")))
             + ((("le", s.labels["le"]),) if "le" in s.labels else ())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_request_latencies_from_a_fake_clock():
    clock = Clock()
    stats = SimpleNamespace(num_running=3, num_waiting=2, kv_blocks_used=10, kv_blocks_total=40, num_steps=7,
                            recompiles=0)
    m = ServingMetrics("m", engine_stats=lambda: stats, clock=clock)
    timer = m.track(num_prompt_tokens=5)          # arrives at t=100
    clock.now = 100.5
    timer.on_tokens(1)                            # first token: TTFT 0.5
    clock.now = 100.75
    timer.on_tokens(2)                            # two tokens after 0.25 s: two ITLs of 0.125
    clock.now = 101.0
    timer.on_tokens(1)                            # ITL 0.25
    timer.on_finish("length")                     # E2E 1.0, TPOT (101.0 - 100.5) / 3
    timer.on_finish("length")                     # idempotent
    s = _samples(m)
    assert s[("spear_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("spear_time_to_first_token_seconds_count", ())] == 1
    assert s[("spear_inter_token_latency_seconds_count", ())] == 3
    assert s[("spear_inter_token_latency_seconds_sum", ())] == pytest.approx(0.125 + 0.125 + 0.25)
    assert s[("spear_inter_token_latency_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("spear_inter_token_latency_seconds_bucket", (("le", "0.15"),))] == 2
    assert s[("spear_inter_token_latency_seconds_bucket", (("le", "0.3"),))] == 3
    assert s[("spear_time_per_output_token_seconds_sum", ())] == pytest.approx(0.5 / 3)
    assert s[("spear_e2e_request_latency_seconds_sum", ())] == pytest.approx(1.0)
    assert s[("spear_prompt_tokens_total", ())] == 5
    assert s[("spear_generation_tokens_total", ())] == 4
    assert s[("spear_requests_finished_total", (("finish_reason", "length"),))] == 1
    assert s[("spear_num_requests_running", ())] == 3 and s[("spear_num_requests_waiting", ())] == 2
    assert s[("spear_kv_cache_blocks_used", ())] == 10 and s[("spear_kv_cache_blocks_total", ())] == 40
    assert s[("spear_kv_cache_usage_ratio", ())] == pytest.approx(0.25)
    assert s[("spear_engine_steps_total", ())] == 7 and s[("spear_recompiles_total", ())] == 0
    stats.kv_blocks_used = 0                      # read at scrape time
    assert _samples(m)[("spear_kv_cache_blocks_used", ())] == 0


def test_each_metrics_object_has_its_own_registry():
    a, b = ServingMetrics("a"), ServingMetrics("b")   # same metric names: would clash in one registry
    a.track(3).on_tokens(1)
    a.rejected(400)
    assert a.registry is not b.registry
    assert _samples(a)[("spear_prompt_tokens_total", ())] == 3
    assert _samples(b)[("spear_prompt_tokens_total", ())] == 0
    assert _samples(a)[("spear_requests_rejected_total", (("status", "400"),))] == 1
