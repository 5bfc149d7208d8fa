"""The frame around every unary RPC of both services: in-flight accounting, the shutdown refusal, the
request_id cap, failures turned into statuses, metrics and the access log.

A service gives its own `classify` (its exceptions -> status code and details, RpcFailure's own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from serving.grpc_server import InflightCalls, RpcFailure, request_id_problem


class RpcFrame:
    """`metrics` has requests / errors (method, code), latency (method) and inflight; `is_stopping()`
    says whether the server is shutting down (new calls: UNAVAILABLE, naming `service`);
    `count_items(response)`, if given, puts the items of each answer in the access log."""

    def __init__(
        self,
        service: str,
        *,
        metrics: Any,
        inflight: InflightCalls,
        classify: Callable[[BaseException], tuple[grpc.StatusCode, str]],
        is_stopping: Callable[[], bool],
        max_request_id_chars: int,
        access_log: bool,
        log: logging.Logger,
        access: logging.Logger,
        count_items: Callable[[Any], int] | None = None,
    ):
        self.service = service
        self.metrics = metrics
        self.inflight = inflight
        self.classify = classify
        self.is_stopping = is_stopping
        self.max_request_id_chars = max_request_id_chars
        self.access_log = access_log
        self.log = log
        self.access = access
        self.count_items = count_items

    @classmethod
    def for_server(cls, service: str, server: Any, *, classify, log, access, count_items=None) -> RpcFrame:
        """The frame of a server object with `metrics`, `inflight`, `stopping` and `config`
        (`max_request_id_chars`, `access_log`): both services' servers."""
        return cls(
            service,
            metrics=server.metrics,
            inflight=server.inflight,
            classify=classify,
            is_stopping=lambda: server.stopping,
            max_request_id_chars=server.config.max_request_id_chars,
            access_log=server.config.access_log,
            log=log,
            access=access,
            count_items=count_items,
        )

    def refuse_if_stopping(self) -> None:
        if self.is_stopping():
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the {self.service} is shutting down; retry on another replica")

    async def unary(self, method: str, context, request_id: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """`await work()` as the call's answer; any exception becomes the status `classify` gives it."""
        started = time.perf_counter()
        self.metrics.inflight.inc()
        self.inflight.started()
        code, details = grpc.StatusCode.OK, ""
        items = 0
        try:
            problem = request_id_problem(request_id, self.max_request_id_chars)
            if problem:
                request_id = request_id[: self.max_request_id_chars]  # logged; never whole
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, problem)
            self.refuse_if_stopping()
            response = await work()
            items = self.count_items(response) if self.count_items else 0
            return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            code, details = self.classify(exc)
            if code == grpc.StatusCode.INTERNAL:
                self.log.exception("internal error in %s", method, extra={"method": method, "request_id": request_id})
        finally:
            self.metrics.inflight.dec()
            self.inflight.finished()
            self.record(method, code, time.perf_counter() - started, request_id, context, details, items)
        await context.abort(code, details)

    def record(self, method: str, code: grpc.StatusCode, elapsed: float, request_id: str, context, details: str, items: int = 0) -> None:
        """Metrics, the warning of a failed call (CANCELLED and INTERNAL are logged where they happen) and the access log."""
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(elapsed)
        if code != grpc.StatusCode.OK:
            self.metrics.errors.labels(method, code.name).inc()
            if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL):
                self.log.warning(
                    "%s failed: %s %s", method, code.name, details, extra={"method": method, "code": code.name, "request_id": request_id}
                )
        if self.access_log:
            entry = {"method": method, "code": code.name, "ms": round(elapsed * 1000, 3), "request_id": request_id, "peer": context.peer()}
            if self.count_items:
                entry["items"] = items
            self.access.info(method, extra=entry)
