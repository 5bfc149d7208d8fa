"""Prometheus metrics of one encoder server (own registry, served on a separate HTTP port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; return the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
