"""Typed Python clients for teran.v1.EncoderService (sync and asyncio), returning numpy arrays.

    from teran_api.encoder_client import EncoderClient, RegionFeatures
    with EncoderClient("localhost:50051", token="...") as client:
        captions = client.encode_captions(["a dog runs on the beach"])
        captions[0].global_vector      # float32 [D]
        captions[0].concepts           # float32 [W, D], one row per word piece
        images = client.encode_images([open("dog.jpg", "rb").read()])

Every call raises EncoderError (with `.code`, a grpc.StatusCode, and `.details`) on failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.grpc_server import channel_credentials
from teran.hubness import HubReference
from teran_api._proto import encoder_pb2, encoder_pb2_grpc
from teran_api.tensors import FLOAT16, FLOAT32, decode, dtype_code, fill_tensor
from teran_api.types import ModelRef, RegionFeatures

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "teran.v1.EncoderService"


class EncoderError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class CaptionEncoding:
    global_vector: np.ndarray  # [D]
    concepts: np.ndarray | None  # [W, D] (None with global_only)
    word_pieces: list[str]
    token_positions: list[int]
    num_tokens: int
    model: ModelRef


@dataclass
class ImageEncoding:
    global_vector: np.ndarray  # [D]
    concepts: np.ndarray | None  # [R, D]
    boxes: np.ndarray | None  # [R, 4] normalised x1, y1, x2, y2
    width: int
    height: int
    model: ModelRef


@dataclass
class ModelInfo:
    model: ModelRef
    backend: str
    backend_detail: str
    precision: str
    alignment_mode: str
    concept_mode: str
    checkpoint_kind: str
    checkpoint_sha256: str
    region_dim: int
    region_count: int  # exact rows of RegionFeatures.features, 0: any count up to limits["max_regions"]
    accepts_encoded_images: bool
    limits: dict[str, int]
    blend_weight: float | None = None  # the model's ranking blend (None: rank by alignment_mode)
    hub_penalty_weight: float | None = None  # the ranking's hub penalty (None: none; reference: hub_reference())


ImageLike = bytes | RegionFeatures


# --------------------------------------------------------------------------- conversions


def caption_request(
    captions: Sequence[str], dtype="float32", global_only: bool = False, request_id: str = ""
) -> encoder_pb2.EncodeCaptionsRequest:
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not one string")
    return encoder_pb2.EncodeCaptionsRequest(
        captions=list(captions), output_dtype=dtype_code(dtype), global_only=global_only, request_id=request_id
    )


def image_request(
    images: Sequence[ImageLike], dtype="float32", global_only: bool = False, request_id: str = ""
) -> encoder_pb2.EncodeImagesRequest:
    request = encoder_pb2.EncodeImagesRequest(output_dtype=dtype_code(dtype), global_only=global_only, request_id=request_id)
    for image in images:
        item = request.images.add()
        if isinstance(image, RegionFeatures):
            features = np.asarray(image.features)
            fill_tensor(item.regions.features, features, FLOAT16 if features.dtype == np.float16 else FLOAT32)
            fill_tensor(item.regions.boxes, np.asarray(image.boxes), FLOAT32)
            item.regions.image_width, item.regions.image_height = int(image.width), int(image.height)
        elif isinstance(image, bytes | bytearray | memoryview):
            item.encoded = bytes(image)
        elif isinstance(image, str | Path):
            item.encoded = Path(image).read_bytes()
        else:
            raise TypeError(f"images must be encoded bytes, a file path or RegionFeatures, not {type(image).__name__}")
    return request


def _model(ref) -> ModelRef:
    return ModelRef(ref.name, int(ref.version), int(ref.dimension))


def parse_captions(response: encoder_pb2.EncodeCaptionsResponse) -> list[CaptionEncoding]:
    model = _model(response.model)
    return [
        CaptionEncoding(
            global_vector=decode(c.global_vector),
            concepts=decode(c.concepts) if c.HasField("concepts") else None,
            word_pieces=list(c.word_pieces),
            token_positions=list(c.token_positions),
            num_tokens=c.num_tokens,
            model=model,
        )
        for c in response.captions
    ]


def parse_images(response: encoder_pb2.EncodeImagesResponse) -> list[ImageEncoding]:
    model = _model(response.model)
    return [
        ImageEncoding(
            global_vector=decode(i.global_vector),
            concepts=decode(i.concepts) if i.HasField("concepts") else None,
            boxes=decode(i.boxes) if i.HasField("boxes") else None,
            width=i.image_width,
            height=i.image_height,
            model=model,
        )
        for i in response.images
    ]


def parse_info(info: encoder_pb2.ModelInfo) -> ModelInfo:
    limits = {
        name: getattr(info, name)
        for name in (
            "max_items", "max_tokens", "max_caption_chars", "max_regions", "max_image_bytes",
            "max_image_pixels", "max_image_side", "max_message_bytes", "max_batch", "image_size",
        )
    }  # fmt: skip
    return ModelInfo(
        model=_model(info.model),
        backend=info.backend,
        backend_detail=info.backend_detail,
        precision=info.precision,
        alignment_mode=info.alignment_mode,
        concept_mode=info.concept_mode,
        checkpoint_kind=info.checkpoint_kind,
        checkpoint_sha256=info.checkpoint_sha256,
        region_dim=info.region_dim,
        region_count=info.region_count,
        accepts_encoded_images=info.accepts_encoded_images,
        limits=limits,
        blend_weight=info.blend_weight if info.HasField("blend_weight") else None,
        hub_penalty_weight=info.hub_penalty_weight if info.HasField("hub_penalty_weight") else None,
    )


def parse_hub_reference(reply: encoder_pb2.HubReference) -> tuple[ModelRef, HubReference]:
    return _model(reply.model), HubReference(decode(reply.image_reference), decode(reply.caption_reference), reply.k, reply.weight)


def _error(exc: grpc.RpcError) -> EncoderError:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return EncoderError(code, details or "")


def _options(max_message_bytes: int, server_name: str | None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # With a DNS name of a headless Service, spread calls over every encoder pod.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


# --------------------------------------------------------------------------- sync


class EncoderClient:
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_cert: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        credentials = channel_credentials(tls, root_cert, client_cert, client_key)
        options = _options(max_message_bytes, server_name)
        self.channel = grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target, options)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def encode_captions(
        self, captions: Sequence[str], *, dtype="float32", global_only: bool = False, request_id: str = "", timeout: float | None = None
    ) -> list[CaptionEncoding]:
        return parse_captions(self._call(self.stub.EncodeCaptions, caption_request(captions, dtype, global_only, request_id), timeout))

    def encode_images(
        self, images: Sequence[ImageLike], *, dtype="float32", global_only: bool = False, request_id: str = "", timeout: float | None = None
    ) -> list[ImageEncoding]:
        return parse_images(self._call(self.stub.EncodeImages, image_request(images, dtype, global_only, request_id), timeout))

    def stream_encode_captions(
        self, batches: Iterable[Sequence[str]], *, dtype="float32", global_only: bool = False, timeout: float | None = None
    ) -> Iterator[list[CaptionEncoding]]:
        """One result list per batch of `batches`, in order (a generator; batches are sent as they are consumed)."""
        requests = (caption_request(batch, dtype, global_only) for batch in batches)
        try:
            for response in self.stub.StreamEncodeCaptions(requests, timeout=timeout, metadata=self.metadata):
                yield parse_captions(response)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def stream_encode_images(
        self, batches: Iterable[Sequence[ImageLike]], *, dtype="float32", global_only: bool = False, timeout: float | None = None
    ) -> Iterator[list[ImageEncoding]]:
        requests = (image_request(batch, dtype, global_only) for batch in batches)
        try:
            for response in self.stub.StreamEncodeImages(requests, timeout=timeout, metadata=self.metadata):
                yield parse_images(response)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return parse_info(self._call(self.stub.GetModelInfo, encoder_pb2.GetModelInfoRequest(), timeout))

    def hub_reference(self, *, timeout: float | None = None) -> tuple[ModelRef, HubReference]:
        """The model's hub penalty reference (EncoderError FAILED_PRECONDITION when it has none)."""
        return parse_hub_reference(self._call(self.stub.GetHubReference, encoder_pb2.GetHubReferenceRequest(), timeout))

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... (raises EncoderError if the server cannot be reached)."""
        response = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        import time

        end = time.monotonic() + timeout
        last = "unreachable"
        while time.monotonic() < end:
            try:
                last = self.health(timeout=min(5.0, max(0.1, end - time.monotonic())))
                if last == "SERVING":
                    return
            except EncoderError as exc:
                last = exc.code.name
            time.sleep(0.05)
        raise TimeoutError(f"encoder not SERVING after {timeout}s (last status {last})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- asyncio


class AsyncEncoderClient:
    """grpc.aio client with the same methods as EncoderClient (coroutines / async iterators)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_cert: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        credentials = channel_credentials(tls, root_cert, client_cert, client_key)
        options = _options(max_message_bytes, server_name)
        self.channel = grpc.aio.secure_channel(target, credentials, options) if credentials else grpc.aio.insecure_channel(target, options)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    async def encode_captions(
        self, captions: Sequence[str], *, dtype="float32", global_only: bool = False, request_id: str = "", timeout: float | None = None
    ) -> list[CaptionEncoding]:
        return parse_captions(
            await self._call(self.stub.EncodeCaptions, caption_request(captions, dtype, global_only, request_id), timeout)
        )

    async def encode_images(
        self, images: Sequence[ImageLike], *, dtype="float32", global_only: bool = False, request_id: str = "", timeout: float | None = None
    ) -> list[ImageEncoding]:
        return parse_images(await self._call(self.stub.EncodeImages, image_request(images, dtype, global_only, request_id), timeout))

    async def stream_encode_captions(
        self,
        batches: Iterable[Sequence[str]] | AsyncIterable[Sequence[str]],
        *,
        dtype="float32",
        global_only: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[list[CaptionEncoding]]:
        async def requests():
            if hasattr(batches, "__aiter__"):
                async for batch in batches:
                    yield caption_request(batch, dtype, global_only)
            else:
                for batch in batches:
                    yield caption_request(batch, dtype, global_only)

        try:
            async for response in self.stub.StreamEncodeCaptions(requests(), timeout=timeout, metadata=self.metadata):
                yield parse_captions(response)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    async def stream_encode_images(
        self,
        batches: Iterable[Sequence[ImageLike]] | AsyncIterable[Sequence[ImageLike]],
        *,
        dtype="float32",
        global_only: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[list[ImageEncoding]]:
        async def requests():
            if hasattr(batches, "__aiter__"):
                async for batch in batches:
                    yield image_request(batch, dtype, global_only)
            else:
                for batch in batches:
                    yield image_request(batch, dtype, global_only)

        try:
            async for response in self.stub.StreamEncodeImages(requests(), timeout=timeout, metadata=self.metadata):
                yield parse_images(response)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return parse_info(await self._call(self.stub.GetModelInfo, encoder_pb2.GetModelInfoRequest(), timeout))

    async def hub_reference(self, *, timeout: float | None = None) -> tuple[ModelRef, HubReference]:
        """The model's hub penalty reference (EncoderError FAILED_PRECONDITION when it has none)."""
        return parse_hub_reference(await self._call(self.stub.GetHubReference, encoder_pb2.GetHubReferenceRequest(), timeout))

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        response = await self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncEncoderClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
