"""Prometheus metrics of one search server (own registry, served on a separate HTTP port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from serving.metrics import LATENCY_BUCKETS, MetricsServer

CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 16384)


class Metrics(MetricsServer):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("teran_search_requests", "RPCs by method and final status code", ["method", "code"], registry=r)
        self.errors = Counter("teran_search_errors", "RPCs that ended with a status other than OK", ["method", "code"], registry=r)
        self.latency = Histogram("teran_search_request_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram(
            "teran_search_stage_seconds",
            "time per search stage (encode, first_stage, rerank)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram("teran_search_candidates", "first-stage candidates per query", buckets=CANDIDATE_BUCKETS, registry=r)
        self.items = Counter("teran_search_indexed_items", "items upserted", ["modality"], registry=r)
        self.inflight = Gauge("teran_search_inflight_requests", "RPCs being served", registry=r)
        self.ready = Gauge("teran_search_ready", "1 when Milvus is open and the service is serving", registry=r)
        self.info = Info("teran_search_backend", "storage backend", registry=r)
