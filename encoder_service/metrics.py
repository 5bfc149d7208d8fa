"""Prometheus metrics of one encoder server (own registry, served on a separate HTTP port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from serving.metrics import LATENCY_BUCKETS, MetricsServer

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(MetricsServer):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter(
            "teran_encoder_requests",
            "RPCs (stream messages count once per stream) by method and final status code",
            ["method", "code"],
            registry=r,
        )
        self.errors = Counter(
            "teran_encoder_errors", "RPCs that ended with a status other than OK, by method and code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "teran_encoder_request_seconds",
            "RPC latency (unary) or per-message latency (streams)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("teran_encoder_items", "captions / images encoded", ["kind"], registry=r)
        self.inflight = Gauge("teran_encoder_inflight_requests", "RPCs being served", registry=r)
        self.inflight_bytes = Gauge(
            "teran_encoder_inflight_bytes", "request bytes held by calls in flight (--max-inflight-bytes)", registry=r
        )
        self.batch_size = Histogram("teran_encoder_batch_size", "items per model run", ["graph"], buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram(
            "teran_encoder_inference_seconds", "model run time per batch", ["graph"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "teran_encoder_queue_wait_seconds", "time items wait before their batch runs", ["graph"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("teran_encoder_queue_depth", "items waiting for a batch", ["graph"], registry=r)
        self.rejected = Counter(
            "teran_encoder_rejected_items", "items refused because the queue was full (RESOURCE_EXHAUSTED)", ["graph"], registry=r
        )
        self.expired = Counter(
            "teran_encoder_expired_items",
            "items dropped before running because their deadline passed or the call was cancelled",
            ["graph"],
            registry=r,
        )
        self.ready = Gauge("teran_encoder_ready", "1 when the model is loaded, warmed up and serving", registry=r)
        self.model = Info("teran_encoder_model", "the model served", registry=r)
