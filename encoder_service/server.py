"""The gRPC server: teran.v1.EncoderService + grpc.health.v1 + reflection, on grpc.aio.

Lifecycle: the port opens first with health NOT_SERVING, then the backend loads and every
graph is warmed up, then health turns SERVING. On stop (SIGTERM) health turns NOT_SERVING,
new RPCs are refused, in-flight RPCs get `shutdown_grace_s` to finish, then the batchers and
the backend close.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from encoder_service.backends import Backend, BackendError
from encoder_service.batching import DeadlineExpired, Overloaded
from encoder_service.config import EncoderConfig
from encoder_service.logs import get_logger
from encoder_service.metrics import Metrics
from encoder_service.model import EncoderModel, InvalidInput, RegionInput
from serving.budget import ByteBudget
from serving.failures import hide_cause
from serving.grpc_server import (
    InflightCalls,
    RpcFailure,
    add_health_and_reflection,
    bind_port,
    create_server,
    request_id_problem,
)
from serving.rpc import RpcFrame
from serving.server_thread import ServerThread as BackgroundServer
from teran.errors import TeranInputError
from teran_api._proto import common_pb2, encoder_pb2, encoder_pb2_grpc
from teran_api.tensors import FLOAT16, FLOAT32, dtype_code, fill_tensor, from_tensor, to_tensor

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
log = get_logger("server")
access = get_logger("access")


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, exc.details
    if isinstance(exc, InvalidInput | TeranInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, BackendError):  # its text names the backend's address: that stays in the log
        if exc.unavailable:
            return grpc.StatusCode.UNAVAILABLE, hide_cause(f"the {exc.backend} backend is unavailable; retry", exc, log)
        return grpc.StatusCode.INTERNAL, hide_cause(f"the {exc.backend} backend failed", exc, log)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


# --------------------------------------------------------------------------- servicer


async def _first_message(requests: AsyncIterator):
    """The first message of a request stream, or None when the client sent none."""
    async for request in requests:
        return request
    return None


def _budgeted_unary_handlers(servicer: EncoderServicer) -> grpc.GenericRpcHandler:
    """EncodeCaptions and EncodeImages as client-streaming handlers (same wire format as unary), so
    that their request is read after the byte budget is reserved. Added before the generated
    handlers, which therefore never serve these two methods."""
    handlers: dict[str, tuple[Callable, Any, Any]] = {
        "EncodeCaptions": (servicer.EncodeCaptions, encoder_pb2.EncodeCaptionsRequest, encoder_pb2.EncodeCaptionsResponse),
        "EncodeImages": (servicer.EncodeImages, encoder_pb2.EncodeImagesRequest, encoder_pb2.EncodeImagesResponse),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            name: grpc.stream_unary_rpc_method_handler(
                behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )
            for name, (behaviour, request, response) in handlers.items()
        },
    )


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, server: EncoderServer):
        self._server = server
        self.metrics = server.metrics
        self.frame = RpcFrame.for_server(
            "encoder",
            server,
            classify=_classify,
            log=log,
            access=access,
            count_items=lambda response: len(getattr(response, "captions", None) or getattr(response, "images", None) or ()),
        )
        self._ref: common_pb2.ModelRef | None = None
        self._ref_for: EncoderModel | None = None

    @property
    def model(self) -> EncoderModel:
        model = self._server.model
        if model is None or not model.ready:
            state = "shutting down" if self._server.stopping else "loading and warming up the model"
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the encoder is {state}; retry (watch grpc.health.v1)")
        return model

    def _model_ref(self) -> common_pb2.ModelRef:
        model = self.model
        if self._ref_for is not model:  # built once per model, not per response
            m = model.manifest
            self._ref = common_pb2.ModelRef(name=m.model_name, version=m.model_version, dimension=m.joint_dim)
            self._ref_for = model
        assert self._ref is not None
        return self._ref

    def _check_request_id(self, request_id: str) -> None:
        problem = request_id_problem(request_id, self._server.config.max_request_id_chars)
        if problem:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, problem)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _budgeted_unary(self, method: str, requests: AsyncIterator, context, work: Callable[[object], Awaitable]):
        """A unary encode call whose one request message is read only once its bytes fit the budget.

        These methods are registered as client-streaming (the wire format of a unary call is the same),
        because grpc reads a unary request whole before any handler runs: 64 callers of 22 MB would sit
        in memory before the first refusal. What the largest allowed message would cost is reserved
        before the read, waiting up to --max-inflight-wait-ms for room (else RESOURCE_EXHAUSTED); once
        the size is known the rest is returned."""
        budget = self._server.budget
        reserve = self._reservation()
        held = 0
        if not self._server.stopping and await budget.take_within(reserve, self._server.config.max_inflight_wait_ms / 1000):
            held = reserve
        request = None
        reserved = held > 0
        try:
            failure: RpcFailure | None = None
            if reserved:
                try:
                    request = await _first_message(requests)
                except RpcFailure as exc:  # an unparseable message (MalformedRequestInterceptor)
                    failure = exc
                if request is not None:
                    size = self._charge(request, reserve)
                    budget.release(held - size)
                    held = size

            async def run():
                if failure is not None:
                    raise failure
                if not reserved:
                    raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, self._over_budget(reserve))
                if request is None:
                    raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the call carried no request message")
                return await work(request)

            return await self.frame.unary(method, context, getattr(request, "request_id", ""), run)
        finally:
            if held:
                budget.release(held)

    # A request held in flight costs about twice its wire size: the parsed message, and the image bytes
    # (or caption strings) taken out of it for the decoders and batchers. The budget counts both.
    HELD_COPIES = 2

    def _reservation(self) -> int:
        """Bytes reserved before a request message is read: what the largest allowed message would cost."""
        return min(self.HELD_COPIES * self._server.config.max_message_bytes, self._server.budget.limit)

    def _charge(self, request, reserve: int) -> int:
        """What a read request holds of its reservation (the rest is returned)."""
        return min(self.HELD_COPIES * request.ByteSize(), reserve)

    def _over_budget(self, size: int) -> str:
        budget = self._server.budget
        return (
            f"the encoder holds {budget.used} request bytes in flight; this {size}-byte request would pass the limit of "
            f"{budget.limit} (--max-inflight-bytes; waited {self._server.config.max_inflight_wait_ms:g} ms, --max-inflight-wait-ms): "
            "retry with backoff"
        )

    # ------------------------------------------------------------------ captions

    async def _captions(self, request, deadline, field: str = "captions") -> encoder_pb2.EncodeCaptionsResponse:
        self._check_request_id(request.request_id)
        model = self.model
        dtype = self._dtype(request.output_dtype, "output_dtype")
        results = await model.encode_captions(list(request.captions), deadline, field)
        response = encoder_pb2.EncodeCaptionsResponse(model=self._model_ref(), request_id=request.request_id)
        for r in results:
            item = response.captions.add()
            fill_tensor(item.global_vector, r.global_vec, dtype)
            if not request.global_only:
                fill_tensor(item.concepts, r.concepts, dtype)
                item.word_pieces.extend(r.word_pieces)
                item.token_positions.extend(r.token_positions)
            item.num_tokens = r.num_tokens
        return response

    async def EncodeCaptions(self, requests, context):  # registered client-streaming: see _budgeted_unary
        work = lambda request: self._captions(request, self._deadline(context))  # noqa: E731
        return await self._budgeted_unary("EncodeCaptions", requests, context, work)

    # ------------------------------------------------------------------ images

    @staticmethod
    def _dtype(value: int, field: str) -> int:
        try:
            return dtype_code(value)
        except ValueError:
            raise InvalidInput(f"{field}: unknown dtype code {value}; use FLOAT32 or FLOAT16") from None

    def _image_inputs(self, request, field: str) -> list:
        model = self.model
        limit = model.config.max_items
        if len(request.images) > limit:
            raise InvalidInput(f"{field}: {len(request.images)} images exceeds the limit of {limit} per request (--max-items)")
        items: list = []
        for index, image in enumerate(request.images):
            which = image.WhichOneof("source")
            where = f"{field}[{index}]"
            if which == "encoded":
                items.append(image.encoded)
            elif which == "regions":
                r = image.regions
                cap = model.max_regions * model.region_dim
                features = from_tensor(r.features, f"{where}.regions.features", ndim=2, max_elements=cap)
                boxes = from_tensor(r.boxes, f"{where}.regions.boxes", ndim=2, max_elements=model.max_regions * 4)
                items.append(RegionInput(features, boxes, int(r.image_width), int(r.image_height)))
            else:
                items.append(None)
        return items

    async def _images(self, request, deadline, field: str = "images") -> encoder_pb2.EncodeImagesResponse:
        self._check_request_id(request.request_id)
        model = self.model
        dtype = self._dtype(request.output_dtype, "output_dtype")
        results = await model.encode_images(self._image_inputs(request, field), deadline, field)
        response = encoder_pb2.EncodeImagesResponse(model=self._model_ref(), request_id=request.request_id)
        for r in results:
            item = response.images.add()
            fill_tensor(item.global_vector, r.global_vec, dtype)
            if not request.global_only:
                fill_tensor(item.concepts, r.concepts, dtype)
                fill_tensor(item.boxes, r.boxes, FLOAT32)
            item.image_width, item.image_height = r.width, r.height
        return response

    async def EncodeImages(self, requests, context):  # registered client-streaming: see _budgeted_unary
        work = lambda request: self._images(request, self._deadline(context))  # noqa: E731
        return await self._budgeted_unary("EncodeImages", requests, context, work)

    # ------------------------------------------------------------------ streams

    async def _stream(self, method: str, request_iterator: AsyncIterator, context, work) -> AsyncIterator:
        """Process up to max_stream_inflight messages concurrently; yield responses in order."""
        started = time.perf_counter()
        self.metrics.inflight.inc()
        self._server.inflight.started()
        code, details, count = grpc.StatusCode.OK, "", 0
        if self._server.stopping:
            self.metrics.inflight.dec()
            self._server.inflight.finished()
            self.frame.record(method, grpc.StatusCode.UNAVAILABLE, 0.0, "", context, "shutting down")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the encoder is shutting down; retry on another replica")
        inflight = max(1, self._server.config.max_stream_inflight)
        queue: asyncio.Queue = asyncio.Queue(maxsize=inflight)
        deadline = self._deadline(context)
        end = object()

        budget = self._server.budget
        # The next message may be as large as --max-message-bytes: that much is reserved before it is
        # read (a message waiting for the budget would already sit in memory), the rest returned once
        # its size is known. While the budget is spent the stream is not read: flow control holds the client.
        reserve = self._reservation()
        held: dict[asyncio.Future, int] = {}  # request bytes of each message in work, until it is answered

        async def reader() -> None:
            index = 0
            messages = request_iterator.__aiter__()
            try:
                while True:
                    await budget.take(reserve)
                    try:
                        request = await messages.__anext__()
                    except BaseException:  # end of the stream, or it broke
                        budget.release(reserve)
                        raise
                    size = self._charge(request, reserve)
                    budget.release(reserve - size)
                    task = asyncio.ensure_future(work(request, deadline, index))
                    held[task] = size  # released once answered
                    try:
                        await queue.put(task)
                    except asyncio.CancelledError:  # never queued: nobody else will release its bytes
                        task.cancel()
                        budget.release(held.pop(task, 0))
                        raise
                    index += 1
            except StopAsyncIteration:
                await queue.put(end)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the stream broke (client went away)
                await queue.put(exc)

        reader_task = asyncio.ensure_future(reader())
        failure = None
        try:
            while True:
                entry = await queue.get()
                if entry is end:
                    break
                if isinstance(entry, BaseException):
                    raise entry
                message_started = time.perf_counter()
                try:
                    response = await entry
                finally:
                    budget.release(held.pop(entry, 0))
                self.metrics.latency.labels(method).observe(time.perf_counter() - message_started)
                count += 1
                yield response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            code, details = _classify(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", method, extra={"method": method})
            failure = (code, details)
        finally:
            reader_task.cancel()
            while not queue.empty():
                entry = queue.get_nowait()
                if isinstance(entry, asyncio.Future):
                    entry.cancel()
                    budget.release(held.pop(entry, 0))
            self.metrics.inflight.dec()
            self._server.inflight.finished()
            self.frame.record(method, code, time.perf_counter() - started, "", context, details, count)
        if failure:
            await context.abort(*failure)

    async def StreamEncodeCaptions(self, request_iterator, context):
        async def work(request, deadline, index):
            try:
                return await self._captions(request, deadline, "captions")
            except InvalidInput as exc:
                raise InvalidInput(f"stream message {index}: {exc}") from None

        async for response in self._stream("StreamEncodeCaptions", request_iterator, context, work):
            yield response

    async def StreamEncodeImages(self, request_iterator, context):
        async def work(request, deadline, index):
            try:
                return await self._images(request, deadline, "images")
            except TeranInputError as exc:
                raise InvalidInput(f"stream message {index}: {exc}") from None

        async for response in self._stream("StreamEncodeImages", request_iterator, context, work):
            yield response

    # ------------------------------------------------------------------ info

    async def GetModelInfo(self, request, context):
        async def work():
            info = self.model.info()
            ref = common_pb2.ModelRef(name=info.pop("name"), version=info.pop("version"), dimension=info.pop("dimension"))
            return encoder_pb2.ModelInfo(model=ref, **info)

        return await self.frame.unary("GetModelInfo", context, "", work)

    async def GetHubReference(self, request, context):
        async def work():
            reference = self.model.hub_reference
            if reference is None:
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {self.model.manifest.model_name} has no hub penalty (its manifest.json has no hub_penalty)",
                )
            m = self.model.manifest
            return encoder_pb2.HubReference(
                model=common_pb2.ModelRef(name=m.model_name, version=m.model_version, dimension=m.joint_dim),
                k=reference.k,
                weight=reference.weight,
                image_reference=to_tensor(reference.images, FLOAT16),
                caption_reference=to_tensor(reference.captions, FLOAT16),
            )

        return await self.frame.unary("GetHubReference", context, "", work)


# --------------------------------------------------------------------------- server


class EncoderServer:
    """One encoder server (gRPC + metrics HTTP). Use `await start()`, `await stop()`."""

    def __init__(self, config: EncoderConfig, *, backend: Backend | None = None):
        self.config = config
        self.metrics = Metrics()
        self.backend = backend
        self.model: EncoderModel | None = None
        self.stopping = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health = health.aio.HealthServicer()
        self.listening = threading.Event()  # set once the port is open (health NOT_SERVING until ready)
        self.inflight = InflightCalls()
        # request bytes held at once (--max-inflight-bytes), shown by teran_encoder_inflight_bytes
        self.budget = ByteBudget(config.max_inflight_bytes, self.metrics.inflight_bytes)
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()  # start() makes a fresh one on the serving loop

    async def start(self, warmup: bool = True) -> None:
        cfg = self.config
        self._stopped = asyncio.Event()
        self.inflight.reset()
        model = EncoderModel(
            cfg, backend=self.backend, metrics=self.metrics, active_calls=lambda: self.inflight.count
        )  # fail fast on the manifest
        self._server = create_server(cfg, self.metrics, log)
        servicer = EncoderServicer(self)
        self._server.add_generic_rpc_handlers((_budgeted_unary_handlers(servicer),))
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, self._server)
        await add_health_and_reflection(self._server, self.health, SERVICE_NAME)
        self.port = bind_port(self._server, cfg)
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        await self._server.start()
        self.listening.set()
        log.info(
            "listening",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "tls": bool(cfg.tls_cert),
                "auth": bool(cfg.auth_tokens),
                "model_dir": str(cfg.model_dir),
            },
        )
        self.model = model
        await model.start(warmup=warmup)
        m = model.manifest
        self.metrics.model.info(
            {"name": m.model_name, "version": str(m.model_version), "backend": model.backend.describe(), "dimension": str(m.joint_dim)}
        )
        if not self.stopping:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.ready.set(1)
            log.info("serving", extra={"port": self.port, "load_s": round(model.load_seconds, 3)})

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
            # New encoder RPCs are refused (UNAVAILABLE) from now on; in-flight ones get `grace`
            # seconds. Long-lived health Watch streams do not hold the shutdown up.
            await self.inflight.drain_and_stop(self._server, grace, log)
        if self.model is not None:
            await self.model.close()
        self.metrics.close()
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


class ServerThread(BackgroundServer):
    """An EncoderServer on its own event loop in a background thread (tests, benchmarks, embedding).

    The constructor returns once the model is warm (`wait="ready"`) or once the port is open
    (`wait="listening"`; then call `wait_ready()`)."""

    def __init__(
        self, config: EncoderConfig, *, backend: Backend | None = None, warmup: bool = True, wait: str = "ready", timeout: float = 120.0
    ):
        server = EncoderServer(config, backend=backend)
        super().__init__(server, start_kwargs={"warmup": warmup}, wait=wait, timeout=timeout, name="encoder server")
        self.server: EncoderServer = server
