"""The HTTP adapter of the search page: routes, bearer tokens, TLS, body limits and JSON errors over
`webui.gateway.Gateway` (standard library `http.server`, one thread per connection).

Routes:
    GET  /                       the search page (webui/static/)
    POST /api/v1/search          {"text": ..., "top_k", "filter", "rerank_multiplier", "rerank", "explain"}
    POST /api/v1/search/image    the photo's bytes as the body; the same options as URL parameters
    GET  /api/v1/stats           items stored, model, the search service's limits
    GET  /photos/ID              a photo of --images-dir
    GET  /healthz, /readyz       liveness; readiness (the search service answers Stats), no token needed

Limits are checked before a body is read: no Content-Length (or a chunked body) is HTTP 411, a body
over --max-upload-bytes / --max-json-bytes is 413, more than --max-inflight-requests API calls at
once is 429. Every refusal is JSON: {"error": {"code": "INVALID_ARGUMENT", "message": "..."}}.

Prometheus metrics (`webui.metrics`) are served on their own plain HTTP port, --metrics-port
(-1: none), bound to --metrics-host.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from teran_api.search_client import SearchClient
from webui.config import WebConfig
from webui.gateway import PHOTO_TYPES, ApiError, Gateway, invalid
from webui.metrics import Metrics, route_of

STATIC = Path(__file__).with_name("static")
PAGES = {"/": "index.html", "/static/app.js": "app.js", "/static/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# The page loads only its own script, style and photos (blob: for photos fetched with a token and for
# the query photo's preview); nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
READY_TIMEOUT_S = 3.0


class WebServer:
    """The gateway's HTTP server. `start`/`stop`/`wait`/`stopping` are what `serving.runner` drives;
    `serve_background`/`shutdown` do the same without asyncio (the demo, tests)."""

    def __init__(self, config: WebConfig, log=None, client: SearchClient | None = None):
        self.config = config
        self.log = log or logging.getLogger("webui")
        self.client = client or SearchClient(
            config.search_address,
            token=config.search_token or None,
            timeout=config.search_timeout_s,
            tls=config.search_tls,
            root_cert=config.search_root_cert,
            client_cert=config.search_client_cert,
            client_key=config.search_client_key,
        )
        self.gateway = Gateway(self.client, config.search_address, config.images_dir, config.default_top_k)
        self.pages = {route: (STATIC / name).read_bytes() for route, name in PAGES.items()}
        self.inflight = threading.BoundedSemaphore(config.max_inflight_requests)
        self.metrics = Metrics()
        self.metrics_port: int | None = None  # bound once serving (--metrics-port >= 0)
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.draining = False
        self._stopped = threading.Event()

    @property
    def tls(self) -> bool:
        return self.config.tls_cert is not None

    @property
    def stopping(self) -> bool:
        return self.draining

    @property
    def url(self) -> str:
        assert self.httpd is not None, "not started"
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{'https' if self.tls else 'http'}://{host}:{self.httpd.server_address[1]}/"

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        if self.config.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(str(self.config.tls_client_ca))
        return context

    def serve_background(self) -> str:
        """Bind the metrics port (--metrics-port >= 0) and the page's, serve on daemon threads, return the
        page's URL. On failure nothing stays bound."""
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        httpd = None
        try:
            httpd = ThreadingHTTPServer((self.config.host, self.config.port), RequestHandler)
            httpd.daemon_threads = True
            if self.tls:
                # the handshake runs on the connection's own thread (first read), under the read timeout
                httpd.socket = self._tls_context().wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            if httpd is not None:
                httpd.server_close()
            self.metrics.close()
            self.metrics_port = None
            raise
        httpd.app = self  # type: ignore[attr-defined]
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, name="webui-http", daemon=True)
        self.thread.start()
        self.log.info(
            "serving",
            extra={"url": self.url, "metrics_port": self.metrics_port, "search_address": self.config.search_address, "tls": self.tls,
                   "auth": bool(self.config.auth_tokens)},
        )  # fmt: skip
        return self.url

    def shutdown(self, grace: float | None = None) -> None:
        """Refuse new API calls (readyz turns 503), let in-flight ones finish for `grace` seconds, close."""
        if self._stopped.is_set():
            return
        self.draining = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        acquired = 0
        while acquired < self.config.max_inflight_requests and time.monotonic() < deadline:
            if self.inflight.acquire(timeout=max(0.0, deadline - time.monotonic())):
                acquired += 1
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        self.client.close()
        self.metrics.close()
        self._stopped.set()
        self.log.info("stopped")

    async def start(self) -> None:
        self.serve_background()

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.to_thread(self.shutdown, grace)

    async def wait(self) -> None:
        await asyncio.to_thread(self._stopped.wait)

    def authorized(self, header: str | None) -> bool:
        if not self.config.auth_tokens:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return any(hmac.compare_digest(token.strip().encode(), t.encode()) for t in self.config.auth_tokens)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has a Content-Length
    in_request = False  # handle_request is answering (else a refusal comes from http.server's own parsing)
    server_version = "teran-webui"
    sys_version = ""

    @property
    def app(self) -> WebServer:
        return self.server.app  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.app.config.read_timeout_s)  # bounds a slow client's handshake, headers and body

    # --- responses

    def send_bytes(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.status = status

    def send_json(self, status: int, value: dict, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(value).encode(), "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def send_api_error(self, error: ApiError, headers: dict | None = None) -> None:
        self.send_json(error.http_status, error.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long) as JSON too."""
        self.close_connection = True
        started = time.perf_counter()
        if not self.in_request:
            self.status = 0  # not the previous request's on this connection
        names = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 414: "OUT_OF_RANGE",
                 431: "OUT_OF_RANGE", 501: "UNIMPLEMENTED", 505: "UNIMPLEMENTED"}  # fmt: skip
        try:
            self.send_api_error(ApiError(code, names.get(code, "UNKNOWN"), message or self.responses.get(code, ("error",))[0]))
        except (BrokenPipeError, ConnectionResetError):  # the client is gone
            pass
        finally:
            if not self.in_request:  # refused before routing: no route to name
                self.count("other", started)

    def count(self, route: str, started: float) -> None:
        """Record an answered request in the metrics ("aborted": the client left before its response was written)."""
        metrics = self.app.metrics
        metrics.requests.labels(route, str(self.status) if self.status else "aborted").inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)

    def refusal(self, reason: str, error: ApiError) -> ApiError:
        """`error`, counted as a refusal for `reason` (one of webui.metrics.REFUSALS)."""
        self.app.metrics.refused.labels(reason).inc()
        return error

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        self.app.log.debug(format % args)

    # --- requests

    def do_GET(self) -> None:
        self.handle_request("GET")

    def do_HEAD(self) -> None:
        self.handle_request("GET")

    def do_POST(self) -> None:
        self.handle_request("POST")

    def do_PUT(self) -> None:
        self.handle_request("PUT")

    def do_DELETE(self) -> None:
        self.handle_request("DELETE")

    def handle_request(self, method: str) -> None:
        started = time.perf_counter()
        self.status = 0
        self.body_read = False
        self.in_request = True
        url = urlsplit(self.path)
        path = url.path
        self.app.metrics.inflight.inc()
        try:
            self.answer(method, path, url.query)
        finally:
            self.in_request = False
            self.app.metrics.inflight.dec()
            self.count(route_of(path), started)
        if self.app.config.access_log:
            self.app.log.info(
                "request",
                extra={"method": self.command, "path": path, "status": self.status, "ms": round((time.perf_counter() - started) * 1000, 1)},
            )

    def answer(self, method: str, path: str, query: str) -> None:
        """Route the request; answer an error as JSON."""
        try:
            self.route(method, path, dict(parse_qsl(query, keep_blank_values=True)))
        except ApiError as error:
            if not self.body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                self.close_connection = True  # the unread body would be taken for the next request
            headers = {"WWW-Authenticate": 'Bearer realm="teran"'} if error.http_status == 401 else None
            self.send_api_error(error, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            self.app.log.exception("request failed", extra={"path": path})
            self.close_connection = True
            self.send_api_error(ApiError(500, "INTERNAL", "the gateway failed on this request; see its log"))

    def route(self, method: str, path: str, params: dict) -> None:
        if path in self.app.pages:
            self.allow(method, "GET")
            page = self.app.pages[path]
            self.send_bytes(200, page, CONTENT_TYPES[Path(PAGES[path]).suffix], {"Cache-Control": "no-cache"})
        elif path == "/healthz":
            self.allow(method, "GET")
            self.send_json(200, {"status": "ok"})
        elif path == "/readyz":
            self.allow(method, "GET")
            self.readiness()
        elif path.startswith("/photos/"):
            self.allow(method, "GET")
            self.check_token()
            self.photo(unquote(path[len("/photos/") :]))
        elif path in ("/api/v1/search", "/api/v1/search/image", "/api/v1/stats"):
            self.allow(method, "GET" if path.endswith("stats") else "POST")
            self.check_token()
            self.api(path, params)
        else:
            raise ApiError(404, "NOT_FOUND", f"no such page or API: {path} (the API is under /api/v1/; the page is at /)")

    def allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, "UNIMPLEMENTED", f"{method} is not allowed here; use {allowed}")

    def check_token(self) -> None:
        if not self.app.authorized(self.headers.get("Authorization")):
            message = "missing or wrong bearer token: send `Authorization: Bearer TOKEN`"
            raise self.refusal("unauthenticated", ApiError(401, "UNAUTHENTICATED", message))

    def readiness(self) -> None:
        if self.app.draining:
            self.send_json(503, {"status": "shutting down"})
            return
        try:
            self.app.client.stats(timeout=READY_TIMEOUT_S)
        except Exception as error:  # any failure: not ready
            self.send_json(503, {"status": "search service unavailable", "detail": str(error).splitlines()[0][:300]})
            return
        self.send_json(200, {"status": "ready"})

    def photo(self, photo_id: str) -> None:
        path = self.app.gateway.photo_path(photo_id)
        if path is None:
            raise ApiError(404, "NOT_FOUND", f"no photo {photo_id!r} (photos are served from --images-dir when it is set)")
        self.send_bytes(200, path.read_bytes(), PHOTO_TYPES[path.suffix.lower()], {"Cache-Control": "private, max-age=3600"})

    def api(self, path: str, params: dict) -> None:
        if self.app.draining:
            self.close_connection = True
            raise self.refusal("draining", ApiError(503, "UNAVAILABLE", "the gateway is shutting down; retry on another replica"))
        if not self.app.inflight.acquire(blocking=False):
            limit = self.app.config.max_inflight_requests
            raise self.refusal("busy", ApiError(429, "RESOURCE_EXHAUSTED", f"too many requests in flight (limit {limit}); retry"))
        try:
            if path == "/api/v1/stats":
                self.send_json(200, self.app.gateway.stats())
            elif path == "/api/v1/search":
                self.send_json(200, self.app.gateway.search_caption(self.json_body()))
            else:
                photo = self.read_body(self.app.config.max_upload_bytes, "--max-upload-bytes")
                self.send_json(200, self.app.gateway.search_photo(photo, params))
        finally:
            self.app.inflight.release()

    def read_body(self, limit: int, limit_flag: str) -> bytes:
        """The request body, refused before it is read when it has no length or is over `limit`."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # its body cannot be skipped
            message = "send the body with a Content-Length (chunked bodies are not accepted)"
            raise self.refusal("no_length", ApiError(411, "INVALID_ARGUMENT", message))
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.strip().isdigit():
            raise self.refusal("no_length", ApiError(411, "INVALID_ARGUMENT", "a Content-Length header is required"))
        length = int(length_text)
        if length > limit:
            message = f"the body is {length} bytes; at most {limit} are accepted ({limit_flag})"
            raise self.refusal("too_large", ApiError(413, "RESOURCE_EXHAUSTED", message))
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            timeout = self.app.config.read_timeout_s
            message = f"the body did not arrive within {timeout} s (--read-timeout-s)"
            raise self.refusal("slow_body", ApiError(408, "DEADLINE_EXCEEDED", message)) from None
        self.body_read = True
        if len(body) != length:
            self.close_connection = True
            raise invalid(f"the body ended after {len(body)} of {length} bytes")
        return body

    def json_body(self):
        body = self.read_body(self.app.config.max_json_bytes, "--max-json-bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise invalid(f"the body is not valid JSON ({error})") from None
