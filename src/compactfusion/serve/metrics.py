"""Prometheus metrics of one server (its own registry: no module-level state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
RATIO_BUCKETS = (1, 1.5, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "compactfusion_"
        self.latency = Histogram(p + "request_latency_seconds", "time from admission to answer", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.queue_time = Histogram(p + "queue_time_seconds", "time a request waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting", registry=r)
        self.in_flight = Gauge(p + "in_flight", "requests in the running generation", registry=r)
        self.requests = Counter(p + "requests", "answered requests by outcome", ["outcome"], registry=r)
        self.bytes_sent = Counter(p + "bytes_sent", "bytes sent between ranks (all ranks)", registry=r)
        self.bytes_uncompressed = Counter(p + "bytes_uncompressed", "the same traffic uncompressed", registry=r)
        self.ratio = Histogram(p + "compression_ratio", "compression ratio per request", buckets=RATIO_BUCKETS,
                               registry=r)
        self.link_s = Counter(p + "modeled_link_seconds", "modelled link time (slowest rank)", registry=r)
        self.batch_size = Histogram(p + "batch_requests", "requests per pipeline call", buckets=(1, 2, 4, 8, 16),
                                    registry=r)
        self.healthy = Gauge(p + "healthy", "1 while every rank answers", registry=r)
        for outcome in ("completed", "failed", "rejected"):
            self.requests.labels(outcome)

    def observe_usage(self, usage: dict) -> None:
        self.bytes_sent.inc(usage["bytes_sent"])
        self.bytes_uncompressed.inc(usage["bytes_uncompressed"])
        self.link_s.inc(usage["modeled_link_s"])
        self.ratio.observe(usage["compression_ratio"])
        self.latency.observe(usage["queue_time_s"] + usage["wall_time_s"])
        self.queue_time.observe(usage["queue_time_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
