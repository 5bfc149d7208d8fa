"""Prometheus metrics of the search page gateway (own registry, served on a separate HTTP port: --metrics-port).

Requests are labelled by route, one of a fixed set (`ROUTES`), never by the raw path: a client cannot
grow the label set by asking for made-up paths.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from serving.metrics import LATENCY_BUCKETS, MetricsServer

API_ROUTES = {"/api/v1/search": "search", "/api/v1/search/image": "search_image", "/api/v1/stats": "stats"}
ROUTES = ("page", "static", "search", "search_image", "stats", "photo", "healthz", "readyz", "other")
# why a request was refused before the search service was asked (its HTTP status says the same, more coarsely)
REFUSALS = ("unauthenticated", "too_large", "no_length", "slow_body", "busy", "draining")


def route_of(path: str) -> str:
    """The `route` label of a request path: one of ROUTES."""
    if path == "/":
        return "page"
    if path in ("/static/app.js", "/static/style.css"):
        return "static"
    if path in API_ROUTES:
        return API_ROUTES[path]
    if path.startswith("/photos/"):
        return "photo"
    if path in ("/healthz", "/readyz"):
        return path[1:]
    return "other"


class Metrics(MetricsServer):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("teran_web_requests", "HTTP requests by route and status code", ["route", "code"], registry=r)
        self.latency = Histogram(
            "teran_web_request_seconds", "HTTP request latency, until the response is written", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inflight = Gauge("teran_web_inflight_requests", "HTTP requests being served", registry=r)
        self.refused = Counter(
            "teran_web_refused_requests",
            "requests refused by the gateway's own limits and checks: unauthenticated (401), too_large (413), "
            "no_length (411), slow_body (408), busy (429: --max-inflight-requests), draining (503: shutting down)",
            ["reason"],
            registry=r,
        )
        for route in ROUTES:  # every route's series exists from the start (rates need no first request)
            self.latency.labels(route)
        for reason in REFUSALS:
            self.refused.labels(reason)
