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
        self.cache_lookups = Counter(
            "teran_search_rerank_cache_lookups", "re-rank candidates served from the cache (hit) or fetched from Milvus (miss)", ["result"],
            registry=r,
        )  # fmt: skip
        self.cache_items = Gauge("teran_search_rerank_cache_items", "items in the re-rank cache", ["modality"], registry=r)
        self.cache_bytes = Gauge("teran_search_rerank_cache_bytes", "fp16 concept bytes held by the re-rank cache", registry=r)
        self.cache_limit = Gauge("teran_search_rerank_cache_limit_bytes", "--rerank-cache-mb in bytes (0: disabled)", registry=r)
        self.cache_full = Gauge(
            "teran_search_rerank_cache_full",
            "1 when items were left out of the re-rank cache for its limit (misses go to Milvus)",
            registry=r,
        )
        self.cache_loading = Gauge("teran_search_rerank_cache_loading", "1 while the re-rank cache is loading from Milvus", registry=r)
