"""Prometheus metrics of one served engine, in a registry of their own (no process-wide state).

Latencies are measured where the client sees them, in the server, on ``time.monotonic``: TTFT from the request's
arrival at the handler to its first token; ITL between successive token deliveries (a delivery of k tokens counts
as k intervals of 1/k of the gap); TPOT per finished request, (end - first token) / (output tokens - 1); end-to-end
latency from arrival to the last token. Engine state (running / waiting requests, KV blocks, recompiles) is read
from ``engine.stats()`` at scrape time.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                          0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineStateCollector(Collector):
    """Gauges read from the engine's ``stats()`` at each scrape."""

    def __init__(self, stats: Callable[[], object], model_name: str):
        self._stats = stats
        self._model_name = model_name

    def collect(self):
        s = self._stats()
        labels = ["model_name"]
        value = [self._model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, float(v))
            return g

        yield gauge("spear_num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("spear_num_requests_waiting", "Requests waiting for admission (or preempted).", s.num_waiting)
        yield gauge("spear_kv_cache_blocks_used", "KV-cache blocks held by requests.", s.kv_blocks_used)
        yield gauge("spear_kv_cache_blocks_total", "KV-cache blocks requests can hold.", s.kv_blocks_total)
        yield gauge("spear_kv_cache_usage_ratio", "Used / total KV-cache blocks.",
                    s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        steps = CounterMetricFamily("spear_engine_steps", "Engine steps run.", labels=labels)
        steps.add_metric(value, float(s.num_steps))
        yield steps
        recompiles = CounterMetricFamily("spear_recompiles", "torch.compile recompilations after start-up.",
                                         labels=labels)
        recompiles.add_metric(value, float(s.recompiles))
        yield recompiles


class ServingMetrics:
    """The metrics of one app. ``registry`` is its own ``CollectorRegistry`` (pass one to share it)."""

    def __init__(self, model_name: str, engine_stats: Optional[Callable[[], object]] = None,
                 registry: Optional[CollectorRegistry] = None, clock: Callable[[], float] = time.monotonic):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.clock = clock
        labels = ["model_name"]
        self.ttft = Histogram("spear_time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("spear_time_per_output_token_seconds",
                              "Per finished request: (last - first token time) / (output tokens - 1).", labels,
                              buckets=_TOKEN_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("spear_inter_token_latency_seconds", "Time between successive output tokens.", labels,
                             buckets=_TOKEN_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("spear_e2e_request_latency_seconds", "Arrival to the last token.", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter("spear_prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("spear_generation_tokens", "Generated tokens.", labels,
                                         registry=self.registry).labels(model_name)
        self._finished = Counter("spear_requests_finished", "Requests finished, by finish reason.",
                                 labels + ["finish_reason"], registry=self.registry)
        self._rejected = Counter("spear_requests_rejected", "Requests answered with an error, by HTTP status.",
                                 labels + ["status"], registry=self.registry)
        if engine_stats is not None:
            self.registry.register(_EngineStateCollector(engine_stats, model_name))

    def track(self, num_prompt_tokens: int, arrival: Optional[float] = None) -> "RequestTimer":
        """A timer for one admitted request, from ``arrival`` (default: now)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTimer(self, self.clock() if arrival is None else arrival)

    def rejected(self, status: int) -> None:
        self._rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one request as its outputs arrive: ``on_tokens`` per delivery, ``on_finish`` once."""

    def __init__(self, metrics: ServingMetrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.num_output_tokens = 0
        self.finished = False

    def on_tokens(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        m = self.metrics
        now = m.clock()
        if self.first_token_time is None:
            self.first_token_time = now
            m.ttft.observe(now - self.arrival)
            num_intervals = num_new_tokens - 1   # tokens after the first in the same delivery
            gap_start = now
        else:
            num_intervals = num_new_tokens
            gap_start = self.last_token_time
        for _ in range(num_intervals):
            m.itl.observe((now - gap_start) / num_new_tokens)
        self.last_token_time = now
        self.num_output_tokens += num_new_tokens
        m.generation_tokens.inc(num_new_tokens)

    def on_finish(self, finish_reason: Optional[str]) -> None:
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        now = m.clock()
        m.e2e.observe(now - self.arrival)
        if self.num_output_tokens > 1:
            m.tpot.observe((self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1))
        m._finished.labels(m.model_name, finish_reason or "unknown").inc()
