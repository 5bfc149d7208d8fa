"""Prometheus metrics plumbing shared by the services: own registry, served on a separate HTTP port."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsServer:
    """Base of a service's `Metrics`: subclasses register their metrics on `self.registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: Any = None  # the prometheus_client HTTP server once serving

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; return the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
