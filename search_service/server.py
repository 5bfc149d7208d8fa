"""The gRPC server: teran.v1.SearchService + grpc.health.v1 + reflection, on grpc.aio.

Lifecycle (as the encoder's): the port opens with health NOT_SERVING, Milvus is opened (existing
collections and their model are read back), health turns SERVING. On stop (SIGTERM) health turns
NOT_SERVING, new RPCs get UNAVAILABLE, in-flight RPCs get `shutdown_grace_s`, then Milvus closes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2

from search_service import cache as rerank_cache
from search_service.cache import RerankCache
from search_service.concept_source import ConceptSource
from search_service.config import SearchConfig
from search_service.deadlines import DeadlinePassed
from search_service.errors import InvalidRequest, Overloaded, PreconditionFailed, Unavailable
from search_service.filters import BadFilter
from search_service.layout import CAPTIONS, IMAGES, ModelMismatch
from search_service.logs import get_logger
from search_service.metrics import Metrics
from search_service.milvus_calls import StoreError
from search_service.searcher import ENCODER_AUTH_CODES, Searcher, open_store
from search_service.store import MilvusStore
from serving.failures import hide_cause, without_cause
from serving.grpc_server import InflightCalls, RpcFailure, add_health_and_reflection, bind_port, create_server, request_id_problem
from serving.rpc import RpcFrame
from serving.server_thread import ServerThread as BackgroundServer
from teran.errors import TeranInputError
from teran_api import search_messages as messages
from teran_api._proto import search_pb2, search_pb2_grpc
from teran_api.encoder_client import AsyncEncoderClient, EncoderError

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
log = get_logger("server")
access = get_logger("access")


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, exc.details
    if isinstance(exc, BadFilter):
        return grpc.StatusCode.INVALID_ARGUMENT, f"filter: {exc}"
    if isinstance(exc, TeranInputError):  # InvalidRequest, and errors decoding the request
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelMismatch | PreconditionFailed):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlinePassed) or isinstance(exc.__cause__, DeadlinePassed):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc.__cause__ if isinstance(exc.__cause__, DeadlinePassed) else exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, hide_cause(f"{without_cause(exc)} (retry: indexing is idempotent)", exc, log)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


# --------------------------------------------------------------------------- servicer


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Converts messages to and from the Searcher's values; the RpcFrame does the rest."""

    def __init__(self, server: SearchServer):
        self._server = server
        self.config: SearchConfig = server.config
        self.frame = RpcFrame.for_server("search service", server, classify=classify, log=log, access=access)

    @property
    def searcher(self) -> Searcher:
        searcher = self._server.searcher
        if searcher is None or not self._server.ready:
            state = "shutting down" if self._server.stopping else "opening Milvus"
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the search service is {state}; retry (watch grpc.health.v1)")
        return searcher

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _index(self, request, deadline: float | None, prefix: str = ""):
        searcher = self.searcher
        searcher.check_item_count(len(request.items), prefix)  # before any item is decoded
        items = messages.index_items_from_proto(request, self.config.max_concepts, prefix)
        return await searcher.index(items, prefix=prefix, request_id=request.request_id, deadline=deadline)

    async def Index(self, request, context):
        async def work():
            return messages.index_result_to_proto(await self._index(request, self._deadline(context)))

        return await self.frame.unary("Index", context, request.request_id, work)

    async def StreamIndex(self, request_iterator, context):
        totals = [0, 0]
        count = 0  # messages stored

        def failed(exc: Exception) -> RpcFailure:
            """The stream's answer when message `count` fails: its status, and what the earlier ones stored."""
            code, details = classify(exc)
            done = f"; messages 0..{count - 1} ({totals[0] + totals[1]} items) were stored" if count else ""
            return RpcFailure(code, details + done)

        async def work():
            nonlocal count
            deadline = self._deadline(context)
            request_id = ""
            incoming = aiter(request_iterator)
            while True:
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                except RpcFailure as exc:  # bytes that do not parse (MalformedRequestInterceptor)
                    raise failed(InvalidRequest(f"stream message {count}: {exc.details}")) from exc
                try:
                    problem = request_id_problem(request.request_id, self.config.max_request_id_chars)
                    if problem:
                        raise InvalidRequest(f"stream message {count}: {problem}")
                    request_id = request.request_id or request_id
                    result = await self._index(request, deadline, prefix=f"stream message {count}: ")
                except Exception as exc:  # noqa: BLE001
                    raise failed(exc) from exc
                totals[0] += result.images
                totals[1] += result.captions
                count += 1
            model = messages.model_to_proto(self.searcher.store.model)
            return search_pb2.IndexResponse(indexed=sum(totals), images=totals[0], captions=totals[1], model=model, request_id=request_id)

        return await self.frame.unary("StreamIndex", context, "", work)

    async def Delete(self, request, context):
        async def work():
            modality = messages.modality_from_proto(request.modality)
            result = await self.searcher.delete(modality, list(request.ids), deadline=self._deadline(context))
            return messages.delete_result_to_proto(result)

        return await self.frame.unary("Delete", context, "", work)

    async def Get(self, request, context):
        async def work():
            modality = messages.modality_from_proto(request.modality)
            found = await self.searcher.get(modality, list(request.ids), request.include_vectors, deadline=self._deadline(context))
            return messages.stored_items_to_proto(found)

        return await self.frame.unary("Get", context, "", work)

    async def Stats(self, request, context):
        async def work():
            return messages.stats_to_proto(await self.searcher.stats(deadline=self._deadline(context)))

        return await self.frame.unary("Stats", context, "", work)

    async def Search(self, request, context):
        async def work():
            searcher = self.searcher
            query = messages.search_query_from_proto(request, self.config.max_concepts)
            return messages.search_result_to_proto(await searcher.search(query, deadline=self._deadline(context)))

        return await self.frame.unary("Search", context, request.request_id, work)


# --------------------------------------------------------------------------- server


ENCODER_RECHECK_S = 5.0  # how often a service whose encoder refused its credentials asks again


class SearchServer:
    """One search server (gRPC + metrics HTTP). Use `await start()`, `await stop()`.

    Readiness follows the encoder's credentials too: while the encoder refuses `--encoder-token`
    (UNAUTHENTICATED / PERMISSION_DENIED), health is NOT_SERVING (a misconfigured replica leaves the
    load balancer) and is checked again every ENCODER_RECHECK_S."""

    def __init__(self, config: SearchConfig):
        self.config = config
        self.metrics = Metrics()
        self.store: MilvusStore | None = None
        self.encoder: AsyncEncoderClient | None = None
        self.milvus_pool = ThreadPoolExecutor(max_workers=config.milvus_workers, thread_name_prefix="milvus")
        self.ready = False
        self.stopping = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health = health.aio.HealthServicer()
        self.listening = threading.Event()
        self.inflight = InflightCalls()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()  # start() makes a fresh one on the serving loop
        self.cache: RerankCache | None = RerankCache(int(config.rerank_cache_mb * 2**20)) if config.rerank_cache_mb > 0 else None
        self._cache_stop = threading.Event()
        self._cache_thread: threading.Thread | None = None
        self.concepts: ConceptSource | None = None  # the cache (or Milvus) as the re-rank's source, once Milvus is open
        self.searcher: Searcher | None = None  # once Milvus is open
        self.metrics.cache_limit.set(config.rerank_cache_mb * 2**20)
        self._encoder_watch: asyncio.Task | None = None  # re-checks refused encoder credentials
        self._encoder_probe: asyncio.Task | None = None
        self._milvus_watch: asyncio.Task | None = None
        self._watch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus-health")  # never queued behind requests
        self._milvus_ok = True
        self._encoder_ok = True

    # ------------------------------------------------------------------ encoder credentials

    def encoder_refused(self, exc: EncoderError) -> None:
        """The encoder refused our credentials: NOT_SERVING until it accepts them (checked in the background)."""
        if self.stopping or (self._encoder_watch is not None and not self._encoder_watch.done()):
            return
        log.error(
            "encoder refused credentials", extra={"code": exc.code.name, "details": exc.details, "encoder": self.config.encoder_address}
        )
        self._encoder_watch = asyncio.get_running_loop().create_task(self._watch_encoder())

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _refresh_health(self) -> None:
        """SERVING while Milvus answers and the encoder accepts our credentials (after start, before stop)."""
        if self.stopping or not self.ready:
            return
        serving = self._milvus_ok and self._encoder_ok
        await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(1 if serving else 0)

    async def _watch_milvus(self) -> None:
        """Readiness follows Milvus: NOT_SERVING while it does not answer; when it answers again the
        collections are loaded again (a restarted Milvus releases them) before SERVING."""
        loop = asyncio.get_running_loop()
        store = self.store
        if store is None:
            return
        while not self.stopping:
            await asyncio.sleep(self.config.milvus_health_interval_s)
            try:
                await loop.run_in_executor(self._watch_pool, store.ping)
                if not self._milvus_ok:
                    await loop.run_in_executor(self._watch_pool, store.reload)
                    log.info("milvus answers again: collections loaded, health follows", extra={"uri": store.safe_uri})
                    self._milvus_ok = True
                    await self._refresh_health()
            except StoreError as exc:
                if self._milvus_ok:
                    log.error("milvus does not answer: health NOT_SERVING until it does", extra={"error": str(exc)})
                    self._milvus_ok = False
                    await self._refresh_health()

    async def _watch_encoder(self) -> None:
        self._encoder_ok = False
        await self._refresh_health()
        while not self.stopping:
            await asyncio.sleep(ENCODER_RECHECK_S)
            if self.stopping or self.encoder is None:
                return
            if await self._encoder_refusal() is not None:
                continue  # still refused
            if not self.stopping:  # accepted (or failing for another reason, which readiness does not follow)
                log.info("encoder accepts credentials again", extra={"encoder": self.config.encoder_address})
                self._encoder_ok = True
                await self._refresh_health()
            return

    async def _encoder_refusal(self) -> EncoderError | None:
        """Ask the encoder (GetModelInfo): its error when it refuses our credentials, else None (answers,
        or fails for another reason, which readiness does not follow)."""
        if self.encoder is None:
            return None
        try:
            await self.encoder.model_info(timeout=self.config.encoder_timeout_s)
        except EncoderError as exc:
            if exc.code in ENCODER_AUTH_CODES:
                return exc
        return None

    async def _probe_encoder(self) -> None:
        """At start: find a refused token now rather than at the first request."""
        refusal = await self._encoder_refusal()
        if refusal is not None:
            self.encoder_refused(refusal)

    # ------------------------------------------------------------------ re-rank cache

    def _usable_cache(self) -> RerankCache | None:
        return None if self.concepts is None else self.concepts.usable()

    def _update_cache_gauges(self) -> None:
        if self.concepts is not None:
            self.concepts.update_gauges()

    def _cache_worker(self) -> None:
        """Startup load, then (if --rerank-cache-refresh-s) periodic reconciliation with Milvus."""
        cache, cfg = self.cache, self.config
        if cache is None:
            return
        try:
            if self._usable_cache() is not None:
                started = time.perf_counter()
                cache.state = "loading"
                self.metrics.cache_loading.set(1)
                log.info("rerank cache loading from Milvus", extra={"limit_mib": cfg.rerank_cache_mb})
                counts = rerank_cache.load(
                    cache, self.store, (IMAGES, CAPTIONS), log, self._cache_stop, on_progress=self._update_cache_gauges
                )
                self._update_cache_gauges()
                log.info(
                    "rerank cache loaded",
                    extra={
                        "items": counts, "mib": round(cache.bytes() / 2**20, 1), "limit_mib": cfg.rerank_cache_mb,
                        "full": cache.full, "s": round(time.perf_counter() - started, 2),
                    },
                )  # fmt: skip
        except Exception:  # noqa: BLE001 - the cache is an optimisation: misses still go to Milvus
            log.exception("rerank cache load failed; concepts missing from the cache are fetched from Milvus")
        finally:
            cache.state = "ready"
            self.metrics.cache_loading.set(0)
            cache.loaded.set()
        while cfg.rerank_cache_refresh_s > 0 and not self._cache_stop.wait(cfg.rerank_cache_refresh_s):
            if self._usable_cache() is None:
                continue
            try:
                result = rerank_cache.refresh(cache, self.store, (IMAGES, CAPTIONS), self._cache_stop)
                self._update_cache_gauges()
                log.info("rerank cache refreshed", extra={"result": result, "mib": round(cache.bytes() / 2**20, 1)})
            except Exception:  # noqa: BLE001
                log.exception("rerank cache refresh failed; retrying after --rerank-cache-refresh-s")

    async def start(self) -> None:
        cfg = self.config
        self._stopped = asyncio.Event()
        self.inflight.reset()
        self._server = create_server(cfg, self.metrics, log)
        search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(self), self._server)
        await add_health_and_reflection(self._server, self.health, SERVICE_NAME)
        self.port = bind_port(self._server, cfg)
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        await self._server.start()
        self.listening.set()
        log.info("listening", extra={"port": self.port, "metrics_port": self.metrics_port, "auth": bool(cfg.auth_tokens)})
        store = await asyncio.get_running_loop().run_in_executor(self.milvus_pool, open_store, cfg)
        self.store = store
        self.concepts = ConceptSource(store, self.cache, self.metrics, cfg.rerank_cache_mb, log)
        if self.cache is not None:
            if store.model is not None and not store.stamped:
                log.warning(
                    "rerank cache disabled: the collections predate row stamps (schema format 1), so entries could not be "
                    "validated; concepts come with each search. Re-index into new collections (--collection-prefix) to use it"
                )
                self.cache.loaded.set()
            elif store.layout.concepts.codec is not None:
                log.info("rerank cache not used: the collections store concept codes, which come with each search's candidates")
                self.cache.loaded.set()
            else:
                self._cache_thread = threading.Thread(target=self._cache_worker, name="rerank-cache", daemon=True)
                self._cache_thread.start()
        if cfg.encoder_address:
            self.encoder = AsyncEncoderClient(
                cfg.encoder_address,
                token=cfg.encoder_token or None,
                timeout=cfg.encoder_timeout_s,
                tls=cfg.encoder_tls,
                root_cert=cfg.encoder_root_cert,
                client_cert=cfg.encoder_client_cert,
                client_key=cfg.encoder_client_key,
            )
        self.searcher = Searcher(
            cfg,
            store,
            self.milvus_pool,
            encoder=self.encoder,
            concepts=self.concepts,
            metrics=self.metrics,
            on_encoder_refused=self.encoder_refused,
        )
        self.metrics.info.info({"backend": store.backend, "server_version": store.server_version, "index_type": store.index_type})
        if not self.stopping:
            self.ready = True
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            self.metrics.ready.set(1)
            if self.encoder is not None:
                self._encoder_probe = asyncio.get_running_loop().create_task(self._probe_encoder())
            if self.config.milvus_health_interval_s > 0:
                self._milvus_watch = asyncio.get_running_loop().create_task(self._watch_milvus())
            log.info(
                "serving",
                extra={
                    "port": self.port,
                    "backend": store.backend,
                    "uri": store.safe_uri,
                    "model": store.model.describe() if store.model else None,
                    "encoder": cfg.encoder_address or None,
                },
            )

    async def stop(self, grace: float | None = None) -> None:
        if self.stopping:
            await self.wait()
            return
        self.stopping = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace})
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self.inflight.drain_and_stop(self._server, grace, log)
        self.ready = False
        for task in (self._encoder_watch, self._encoder_probe, self._milvus_watch):
            if task is not None:
                task.cancel()
        self._watch_pool.shutdown(wait=False)
        if self.encoder is not None:
            await self.encoder.close()
        self._cache_stop.set()
        if self._cache_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._cache_thread.join, 60)
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(self.milvus_pool, self.store.close)
        self.milvus_pool.shutdown(wait=False)
        self.metrics.close()
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


class ServerThread(BackgroundServer):
    """A SearchServer on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, config: SearchConfig, *, timeout: float = 120.0):
        server = SearchServer(config)
        super().__init__(server, timeout=timeout, name="search server")
        self.server: SearchServer = server
