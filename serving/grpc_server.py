"""gRPC server plumbing shared by the services: options, bearer-token auth, health, reflection, ports."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_EXEMPT = ("/grpc.health.v1.Health/",)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


def channel_credentials(tls: bool, root_cert: bytes | str | Path | None = None, client_cert=None, client_key=None):
    """Client credentials: None (plaintext) unless `tls` or a `root_cert` is given; the system CA
    bundle without a root_cert; a client certificate and key (paths or PEM bytes) for mutual TLS."""
    if not tls and root_cert is None:
        return None

    def read(value):
        if value is None or isinstance(value, bytes):
            return value
        return Path(value).read_bytes()

    return grpc.ssl_channel_credentials(read(root_cert), read(client_key), read(client_cert))


def count_refusal(metrics, method: str, code: str) -> None:
    """A call an interceptor refused before the service saw it, in the service's requests / errors counters."""
    if metrics:
        metrics.requests.labels(method, code).inc()
        metrics.errors.labels(method, code).inc()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except grpc.health.v1 needs metadata `authorization: Bearer <token>`.

    `metrics` (optional) has `requests` and `errors` counters labelled (method, code); refused
    calls are logged on `log`.
    """

    def __init__(self, tokens: list[str], metrics=None, exempt: tuple[str, ...] = HEALTH_EXEMPT, log: logging.Logger | None = None):
        self._tokens = [t.encode() for t in tokens]
        self._metrics = metrics
        self._exempt = exempt
        self._log = log or logging.getLogger(__name__)

    def _allowed(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                given = value[7:].strip().encode()
                ok = False
                for token in self._tokens:  # compare against all: constant time per token
                    ok |= hmac.compare_digest(given, token)
                return ok
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._exempt) or self._allowed(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        message = "missing or invalid bearer token: send metadata `authorization: Bearer <token>`"
        metrics = self._metrics
        log = self._log
        name = method.rsplit("/", 1)[-1]

        async def deny(_request, context):
            count_refusal(metrics, name, "UNAUTHENTICATED")
            log.warning("unauthenticated call", extra={"method": name, "peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


class _Unparseable:
    """Stands in for a request whose bytes are not a message of the method's type."""

    def __init__(self, error: Exception):
        self.error = error


class RpcFailure(Exception):
    """Raised in a handler: answer the call with `code` and `details` (each service's classify maps it)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT saying so (grpc
    itself answers UNKNOWN with an internal exception name for unary calls, INTERNAL for streams).
    Applies to the methods under `prefix`. A unary call is refused here (counted in `metrics`,
    requests / errors by method and code); in a request stream, reading the bad message raises
    RpcFailure in the handler, which answers and counts it like its other failures (an abort from
    the reading side could race the handler's own writes)."""

    def __init__(self, prefix: str, metrics=None, log: logging.Logger | None = None):
        self._prefix = prefix
        self._metrics = metrics
        self._log = log or logging.getLogger(__name__)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(self._prefix):
            return handler
        parse_message = handler.request_deserializer
        name = method.rsplit("/", 1)[-1]
        metrics, log = self._metrics, self._log

        def parse(data: bytes):
            try:
                return parse_message(data)
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and whatever else a parser raises
                return _Unparseable(exc)

        def problem_text(problem: _Unparseable, context) -> str:
            log.warning("unparseable request", extra={"method": name, "peer": context.peer(), "error": str(problem.error)})
            return (
                f"{name}: the request bytes are not a valid teran.v1 protobuf message for this method "
                f"({type(problem.error).__name__}: {problem.error})"
            )

        async def refuse(problem: _Unparseable, context) -> None:
            count_refusal(metrics, name, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem_text(problem, context))

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, _Unparseable):
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, problem_text(request, context))
                yield request

        kwargs = {"request_deserializer": parse, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Unparseable):
                    await refuse(request, context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests, context):
                return await inner_su(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            inner_ss = handler.stream_stream

            async def stream_stream(requests, context):
                async for response in inner_ss(checked(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
        return handler  # shapes these services do not use: left as they are


def request_id_problem(request_id: str, limit: int) -> str | None:
    """What is wrong with a client's request_id (None: nothing). Checked before any work, so that an
    over-long id is refused (INVALID_ARGUMENT) and never logged or echoed whole."""
    if len(request_id) > limit:
        return f"request_id: {len(request_id)} characters exceeds the limit of {limit} (--max-request-id-chars)"
    return None


def create_server(cfg, metrics=None, log: logging.Logger | None = None, api_prefix: str = "/teran.v1.") -> grpc.aio.Server:
    """A grpc.aio server from the common settings (max_message_bytes, max_concurrent_rpcs, auth_tokens);
    unparseable requests to the methods under `api_prefix` get INVALID_ARGUMENT."""
    interceptors: list[grpc.aio.ServerInterceptor] = [BearerTokenInterceptor(cfg.auth_tokens, metrics, log=log)] if cfg.auth_tokens else []
    interceptors.append(MalformedRequestInterceptor(api_prefix, metrics, log))
    return grpc.aio.server(
        # No BDP probing: it grows each stream's HTTP/2 window to megabytes, so the transport buffers the
        # messages of streams the service is not reading (8.3 GB under 64 streams of 22 MB messages,
        # 3.2 GB without; reports/reliability.json). Request bytes in flight are the service's to bound.
        options=[*channel_options(cfg.max_message_bytes), ("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0)],
        interceptors=interceptors,
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )


async def add_health_and_reflection(server: grpc.aio.Server, health_servicer, service_name: str) -> None:
    """Serve grpc.health.v1 and reflection; health is NOT_SERVING (overall and `service_name`) until set."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    for service in ("", service_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def bind_port(server: grpc.aio.Server, cfg) -> int:
    """Listen on cfg.host:cfg.port (TLS when the config has tls_cert set); return the bound port."""
    address = f"{cfg.host}:{cfg.port}"
    tls_cert = getattr(cfg, "tls_cert", None)
    if tls_cert:
        client_ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls_key.read_bytes(), tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot listen on {address}")
    return port


class InflightCalls:
    """Counts service RPCs in flight (health watches are not counted) so that a graceful stop
    can let them finish, bounded by a grace period. `reset()` must run inside the event loop."""

    SETTLE_S = 0.2  # how long "no RPC in flight" must last before the server stops

    def __init__(self):
        self.count = 0
        self._idle = asyncio.Event()  # bound to a loop at first use; reset() makes a fresh one

    def reset(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.count += 1
        self._idle.clear()

    def finished(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drain_and_stop(self, server: grpc.aio.Server, grace: float, log: logging.Logger) -> None:
        """Wait up to `grace` seconds for in-flight RPCs, then stop `server` (cancelling what is left)."""
        started = time.monotonic()
        if self.count:
            log.info("waiting for in-flight RPCs", extra={"inflight": self.count})
        # Idle must hold for a moment: calls already on the wire when shutdown began still reach
        # their handlers, which answer UNAVAILABLE (retryable) instead of being cancelled by stop().
        while True:
            if self.count:
                try:
                    await asyncio.wait_for(self._idle.wait(), max(0.0, grace - (time.monotonic() - started)))
                except TimeoutError:
                    log.warning("grace period over; cancelling in-flight RPCs", extra={"inflight": self.count})
                    break
            left = grace - (time.monotonic() - started)
            if left <= 0:
                break
            await asyncio.sleep(min(self.SETTLE_S, left))
            if self.count == 0:
                break
        await server.stop(max(0.0, min(0.5, grace - (time.monotonic() - started))))
