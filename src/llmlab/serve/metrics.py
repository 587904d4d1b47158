"""Prometheus metrics of the server (exposition format: https://prometheus.io/docs/instrumenting/exposition_formats/).

Everything lives on a private ``CollectorRegistry``, so a process (or a test) can build several apps.
Two kinds of numbers:
- read from ``engine.stats()`` at scrape time (``EngineCollector``): queue and KV-cache gauges, the prefix
  cache hit rate, and the engine's own running totals (preemptions, prompt / generated tokens, finished
  sequences by reason) exposed as counters, plus generated tokens per second since the previous scrape;
- observed at the HTTP edge (``ServerMetrics``): requests by endpoint and status, time to first token,
  inter-token latency, end-to-end latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmlab.serve.outputs import EngineStats

PREFIX = "llmlab"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets in seconds, from a fast GPU token (~5 ms) to a long CPU generation.
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCollector:
    """Reads ``stats()`` at each scrape; the engine's totals only grow, so they are Prometheus counters."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats
        self._last: tuple[float, int] | None = None  # (time, generated tokens) at the previous scrape
        self._rate = 0.0

    def _tokens_per_second(self, generated: int) -> float:
        now = time.monotonic()
        if self._last is None or generated < self._last[1]:
            self._last = (now, generated)
        elif now - self._last[0] >= 1.0:  # scrapes closer than a second keep the last rate (no 0/0 noise)
            self._rate = (generated - self._last[1]) / (now - self._last[0])
            self._last = (now, generated)
        return self._rate

    def collect(self):
        s = self.stats()
        for name, doc, value in (
            ("requests_waiting", "requests queued for admission", s.waiting),
            ("requests_running", "sequences running", s.running),
            ("kv_blocks_total", "KV cache blocks", s.kv_blocks_total),
            ("kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            ("kv_blocks_free", "KV cache blocks free", s.kv_blocks_free),
            ("kv_cache_usage_ratio", "fraction of KV blocks in use",
             s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
            ("prefix_cache_hit_rate", "prompt blocks found in the prefix cache / looked up", s.prefix_hit_rate),
            ("generation_tokens_per_second", "generated tokens per second since the previous scrape",
             self._tokens_per_second(s.generated_tokens)),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        for name, doc, value in (
            ("preemptions", "sequences preempted for lack of KV blocks", s.preemptions),
            ("prompt_tokens", "prompt tokens computed (not served from the prefix cache)", s.prompt_tokens),
            ("generation_tokens", "tokens generated", s.generated_tokens),
            ("prefix_cache_queries", "prompt blocks looked up in the prefix cache", s.prefix_queries),
            ("prefix_cache_hits", "prompt blocks found in the prefix cache", s.prefix_hits),
            ("engine_steps", "engine iterations", s.steps),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        finished = CounterMetricFamily(f"{PREFIX}_sequences_finished", "finished sequences by reason",
                                       labels=["reason"])
        for reason, count in sorted(s.finished.items()):
            finished.add_metric([reason], count)
        yield finished


class ServerMetrics:
    """The registry, the engine collector and the edge's own counters and histograms."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=_TOKEN_BUCKETS + (10.0, 30.0), registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between a request's outputs, per token",
                             buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "request arrival to its last token",
                             buckets=_REQUEST_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one generation request: ``token(n)`` at each output carrying n new tokens, ``done()``."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def token(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.ttft.observe(now - self.start)
            self.first = False
        else:
            gap = (now - self.last) / n  # an output can carry several tokens (n > 1 samples, drafts)
            for _ in range(min(n, 64)):
                self.metrics.itl.observe(gap)
        self.last = now

    def done(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
