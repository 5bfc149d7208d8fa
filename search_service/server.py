"""The gRPC server: teran.v1.SearchService + grpc.health.v1 + reflection, on grpc.aio.

Lifecycle (as the encoder's): the port opens with health NOT_SERVING, Milvus is opened (existing
collections and their model are read back), health turns SERVING. On stop (SIGTERM) health turns
NOT_SERVING, new RPCs get UNAVAILABLE, in-flight RPCs get `shutdown_grace_s`, then Milvus closes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from search_service import cache as rerank_cache
from search_service.cache import RerankCache
from search_service.checks import check_unit_rows, parse_metadata
from search_service.config import SearchConfig, parse_ranking
from search_service.deadlines import DeadlinePassed, within
from search_service.logs import get_logger
from search_service.metrics import Metrics
from search_service.ranking import Ranking, explain, rerank_scores, stack_concepts
from search_service.sparse import load_codebook
from search_service.store import (
    CAPTIONS,
    ID_FORBIDDEN,
    IMAGES,
    BadFilter,
    Item,
    MilvusStore,
    ModelInfo,
    ModelMismatch,
    StoreError,
    WriteFailed,
)
from serving.grpc_server import (
    InflightCalls,
    RpcFailure,
    add_health_and_reflection,
    bind_port,
    create_server,
    hide_cause,
    request_id_problem,
    without_cause,
)
from serving.rpc import RpcFrame
from teran.errors import TeranInputError
from teran_api._proto import common_pb2, search_pb2, search_pb2_grpc
from teran_api.encoder_client import AsyncEncoderClient, EncoderError, RegionFeatures
from teran_api.tensors import FLOAT16, FLOAT32, from_tensor, to_tensor

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
log = get_logger("server")
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)
access = get_logger("access")
MODALITY: dict[int, str] = {search_pb2.IMAGE: IMAGES, search_pb2.CAPTION: CAPTIONS}
MODALITY_ENUM = {IMAGES: search_pb2.IMAGE, CAPTIONS: search_pb2.CAPTION}
FIRST_STAGE = {
    search_pb2.DENSE: "dense",
    search_pb2.SCALAR_QUANTIZATION: "sq",
    search_pb2.DEEP_PERMUTATION: "dp",
    search_pb2.BAG_OF_CONCEPTS: "boc",
}
FIRST_STAGE_FLAGS = {"sq": "--sparse-surrogates sq", "dp": "--sparse-surrogates dp", "boc": "--boc-codebook PATH"}
FIRST_STAGE_ENUM = {v: k for k, v in FIRST_STAGE.items()}
_ENCODER_FIELD = re.compile(r"\b(captions|images)\[(\d+)\]")


def invalid(details: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, details)


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, exc.details
    if isinstance(exc, BadFilter):
        return grpc.StatusCode.INVALID_ARGUMENT, f"filter: {exc}"
    if isinstance(exc, TeranInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, DeadlinePassed) or isinstance(exc.__cause__, DeadlinePassed):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc.__cause__ if isinstance(exc.__cause__, DeadlinePassed) else exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, hide_cause(f"{without_cause(exc)} (retry: indexing is idempotent)", exc, log)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def model_ref(model: ModelInfo | None) -> common_pb2.ModelRef:
    if model is None:
        return common_pb2.ModelRef()
    return common_pb2.ModelRef(name=model.name, version=model.version, dimension=model.dimension)


class Query:
    """An encoded query or item: global [D], concepts [N, D] float32, labels, boxes, model."""

    def __init__(self, modality, global_vector, concepts, labels, boxes, model):
        self.modality = modality
        self.global_vector = global_vector
        self.concepts = concepts
        self.labels = labels
        self.boxes = boxes
        self.model = model


# --------------------------------------------------------------------------- servicer


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, server: SearchServer):
        self._server = server
        self.config: SearchConfig = server.config
        self.metrics = server.metrics
        self.frame = RpcFrame.for_server("search service", server, classify=classify, log=log, access=access)
        self._model_rankings: dict[tuple[str, int], Ranking] = {}  # (name, version) -> the encoder model's ranking

    @property
    def store(self) -> MilvusStore:
        store = self._server.store
        if store is None or not self._server.ready:
            state = "shutting down" if self._server.stopping else "opening Milvus"
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the search service is {state}; retry (watch grpc.health.v1)")
        return store

    async def _db(self, fn, *args):
        """`fn(*args)` on a Milvus worker, its Milvus calls bounded by this request's deadline."""
        return await asyncio.get_running_loop().run_in_executor(self._server.milvus_pool, within, REQUEST_DEADLINE.get(), fn, *args)

    # ------------------------------------------------------------------ plumbing

    async def _unary(self, method: str, context, request_id: str, work):
        remaining = context.time_remaining()
        REQUEST_DEADLINE.set(None if remaining is None else time.monotonic() + remaining)  # this call's task only
        return await self.frame.unary(method, context, request_id, work)

    # ------------------------------------------------------------------ validation

    def _check_id(self, value: str, where: str) -> None:
        if not value:
            raise invalid(f"{where}: empty id")
        limit = self.store.max_id_length
        if len(value.encode("utf-8")) > limit:
            raise invalid(f"{where}: id of {len(value.encode('utf-8'))} bytes exceeds the limit of {limit} (--max-id-length)")
        if ID_FORBIDDEN.search(value):
            raise invalid(f"{where}: id {value!r} contains a double quote, backslash or control character")

    def _metadata(self, text: str, where: str) -> dict:
        limit = self.config.max_metadata_bytes
        if len(text.encode("utf-8")) > limit:
            raise invalid(f"{where}: {len(text.encode('utf-8'))} bytes exceeds the limit of {limit} (--max-metadata-bytes)")
        if not text.strip():
            return {}
        try:
            return parse_metadata(text, where)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    def _ids(self, ids, where: str = "ids") -> list[str]:
        ids = list(ids)
        if not ids:
            raise invalid(f"{where}: empty; give 1..{self.config.max_ids} ids")
        if len(ids) > self.config.max_ids:
            raise invalid(f"{where}: {len(ids)} ids exceeds the limit of {self.config.max_ids} per request (--max-ids)")
        for i, value in enumerate(ids):
            self._check_id(value, f"{where}[{i}]")
        return list(dict.fromkeys(ids))

    @staticmethod
    def _modality(value: int, where: str = "modality") -> str:
        if value not in MODALITY:
            raise invalid(f"{where}: set IMAGE or CAPTION")
        return MODALITY[value]

    def _vectors(self, v, where: str) -> Query:
        modality = self._modality(v.modality, f"{where}.modality")
        limit = self.config.max_concepts
        global_vector = from_tensor(v.global_vector, f"{where}.global_vector", ndim=1, max_elements=65536)
        dim = global_vector.shape[0]
        if dim == 0:
            raise invalid(f"{where}.global_vector: empty")
        if len(v.concepts.shape) == 2 and v.concepts.shape[0] > limit:
            raise invalid(f"{where}.concepts: {v.concepts.shape[0]} concept vectors exceeds the limit of {limit} (--max-concepts)")
        concepts = from_tensor(v.concepts, f"{where}.concepts", ndim=2, max_elements=limit * max(dim, 1))
        if not 1 <= concepts.shape[0] <= limit:
            raise invalid(f"{where}.concepts: {concepts.shape[0]} concept vectors; give 1..{limit} (--max-concepts)")
        if v.HasField("model") and v.model.dimension and v.model.dimension != dim:
            raise invalid(f"{where}.global_vector: {dim} values, but model.dimension is {v.model.dimension}")
        if concepts.shape[1] != dim:
            raise invalid(f"{where}.concepts.shape: {list(concepts.shape)}; the global vector has dimension {dim}")
        try:
            check_unit_rows(global_vector, f"{where}.global_vector", self.config.vector_norm_tolerance)
            check_unit_rows(concepts, f"{where}.concepts", self.config.vector_norm_tolerance)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        boxes = None
        labels: list[str] = []
        if modality == IMAGES:
            if v.HasField("boxes"):
                boxes = from_tensor(v.boxes, f"{where}.boxes", ndim=2, max_elements=4 * (limit + 1))
                if boxes.shape != (concepts.shape[0], 4):
                    raise invalid(f"{where}.boxes.shape: {list(boxes.shape)}, expected [{concepts.shape[0]}, 4]")
            if v.word_pieces:
                raise invalid(f"{where}.word_pieces: only for CAPTION vectors")
        else:
            if v.HasField("boxes"):
                raise invalid(f"{where}.boxes: only for IMAGE vectors")
            labels = list(v.word_pieces) or [f"#{i}" for i in range(concepts.shape[0])]
            if len(labels) != concepts.shape[0]:
                raise invalid(f"{where}.word_pieces: {len(labels)} labels for {concepts.shape[0]} concept vectors")
        if v.HasField("model") and (v.model.name or v.model.version):
            model = ModelInfo(v.model.name, int(v.model.version), dim)
        else:
            model = None  # filled in by _default_model
        return Query(modality, global_vector, concepts, labels, boxes, model)

    def _check_concepts(self, query: Query, where: str) -> None:
        limit = self.config.max_concepts
        if query.concepts.shape[0] == 0:
            raise invalid(f"{where}: the encoder returned no concept vectors (no word pieces / regions)")
        if query.concepts.shape[0] > limit:
            raise invalid(f"{where}: {query.concepts.shape[0]} concept vectors exceeds the limit of {limit} (--max-concepts)")

    async def _default_model(self, dim: int) -> ModelInfo:
        """The model of vectors sent without a ModelRef: the collections', else the encoder's, else the configured one."""
        store = self.store
        if store.model is not None:
            return ModelInfo(store.model.name, store.model.version, dim)
        encoder = self._server.encoder
        if encoder is not None:
            try:
                info = await encoder.model_info(timeout=self.config.encoder_timeout_s)
                return ModelInfo(info.model.name, info.model.version, dim)
            except EncoderError:
                pass
        return ModelInfo(self.config.model_name, self.config.model_version, dim)

    async def _ranking(self, model: ModelInfo) -> Ranking:
        """The re-rank per --ranking. `model`: the collections' model. With --ranking model it is the
        encoder model's (blend weight and hub penalty); a model the encoder does not serve, or no
        encoder, ranks by MrSw."""
        ranking = parse_ranking(self.config.ranking)
        if ranking != "model":
            return Ranking(cast(float | None, ranking))  # a weight, or None for MrSw
        return await self._model_ranking(model)

    async def _model_ranking(self, model: ModelInfo) -> Ranking:
        """The encoder's ranking for `model` (from its manifest), fetched once per model."""
        encoder = self._server.encoder
        if encoder is None:
            return Ranking()
        key = (model.name, model.version)
        if key not in self._model_rankings:
            timeout = self.config.encoder_timeout_s
            try:
                info = await encoder.model_info(timeout=timeout)
                same = (info.model.name, info.model.version) == key
                hub = None
                if same and info.hub_penalty_weight is not None:
                    served, hub = await encoder.hub_reference(timeout=timeout)
                    if (served.name, served.version, hub.dimension) != (*key, model.dimension):
                        raise RpcFailure(
                            grpc.StatusCode.UNAVAILABLE,
                            f"the encoder's hub reference is for {served.name} v{served.version} (dimension {hub.dimension}), "
                            f"not the collections' {model.describe()}: it is changing models; retry",
                        )
            except EncoderError as exc:
                raise self._encoder_failure(exc, []) from None
            except ValueError as exc:  # a malformed reference
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"the encoder's hub reference is unusable: {exc}") from None
            self._model_rankings[key] = Ranking(info.blend_weight if same else None, hub)
        return self._model_rankings[key]

    async def _hub_statistics(self, modality: str, items: list[Item]) -> None:
        """Set each item's hub statistic from the encoder model's reference, where the collections
        store one (0 stays when the model has no reference, or there is no encoder)."""
        store = self.store
        if not items or not store.hub_field:
            return
        hub = (await self._model_ranking(store.known_model)).hub
        if hub is None:
            return
        vectors = np.stack([item.global_vector for item in items])
        values = await asyncio.get_running_loop().run_in_executor(None, hub.statistic, vectors, modality == IMAGES)
        for item, value in zip(items, values.tolist(), strict=True):
            item.hub = value

    # ------------------------------------------------------------------ encoder

    def _encoder(self, where: str) -> AsyncEncoderClient:
        if self._server.encoder is None:
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{where}: raw images and captions need an encoder; set --encoder-address (or send vectors)",
            )
        return self._server.encoder

    def _encoder_failure(self, exc: EncoderError, positions: list[str]) -> RpcFailure:
        details = _ENCODER_FIELD.sub(lambda m: positions[int(m.group(2))] if int(m.group(2)) < len(positions) else m.group(0), exc.details)
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            return invalid(details)
        if exc.code in ENCODER_AUTH_CODES:  # our configuration, not the client's request: retrying cannot help
            self._server.encoder_refused(exc)
            return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, encoder_refusal(exc))
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return RpcFailure(exc.code, f"encoder overloaded: {details}")
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, hide_cause(f"encoder call failed ({exc.code.name}); retry", details, log))

    async def _encode(self, kind: str, inputs: list, positions: list[str]) -> list[Query]:
        """Encode captions (kind 'captions') or images in chunks; positions name each input for errors."""
        encoder = self._encoder(positions[0])
        out: list[Query] = []
        step = self.config.encoder_batch
        timeout = self.config.encoder_timeout_s
        for start in range(0, len(inputs), step):
            chunk, names = inputs[start : start + step], positions[start : start + step]
            results: Sequence[Any]
            r: Any  # a CaptionEncoding or an ImageEncoding, by kind
            try:
                if kind == CAPTIONS:
                    results = await encoder.encode_captions(chunk, timeout=timeout)
                else:
                    results = await encoder.encode_images(chunk, timeout=timeout)
            except EncoderError as exc:
                raise self._encoder_failure(exc, names) from None
            for r in results:
                model = ModelInfo(r.model.name, r.model.version, r.model.dimension)
                concepts = np.asarray(r.concepts, dtype=np.float32)
                if kind == CAPTIONS:
                    out.append(Query(CAPTIONS, np.asarray(r.global_vector, np.float32), concepts, list(r.word_pieces), None, model))
                else:
                    out.append(Query(IMAGES, np.asarray(r.global_vector, np.float32), concepts, [], np.asarray(r.boxes, np.float32), model))
        return out

    @staticmethod
    def _region_input(regions, where: str) -> RegionFeatures:
        features = from_tensor(regions.features, f"{where}.features", ndim=2, max_elements=1 << 24)
        boxes = from_tensor(regions.boxes, f"{where}.boxes", ndim=2, max_elements=1 << 16)
        return RegionFeatures(features, boxes, int(regions.image_width), int(regions.image_height))

    # ------------------------------------------------------------------ Index

    async def _index(self, request, prefix: str = "") -> tuple[int, int]:
        store = self.store
        items = request.items
        limit = self.config.max_index_items
        if not items:
            raise invalid(f"{prefix}items: empty; give 1..{limit} items")
        if len(items) > limit:
            raise invalid(f"{prefix}items: {len(items)} items exceeds the limit of {limit} per request (--max-index-items)")
        seen: dict[tuple[str, str], int] = {}
        entries: list[tuple[str, dict, Query | None]] = []
        raw: dict[str, list] = {CAPTIONS: [], IMAGES: []}
        for i, item in enumerate(items):
            where = f"{prefix}items[{i}]"
            self._check_id(item.id, f"{where}.id")
            metadata = self._metadata(item.metadata_json, f"{where}.metadata_json")
            which = item.WhichOneof("content")
            query = None
            if which == "caption":
                if not item.caption.strip():
                    raise invalid(f"{where}.caption: empty")
                modality = CAPTIONS
                raw[CAPTIONS].append((i, item.caption, f"{where}.caption"))
            elif which == "image":
                if not item.image:
                    raise invalid(f"{where}.image: empty")
                modality = IMAGES
                raw[IMAGES].append((i, item.image, f"{where}.image"))
            elif which == "regions":
                modality = IMAGES
                raw[IMAGES].append((i, self._region_input(item.regions, f"{where}.regions"), f"{where}.regions"))
            elif which == "vectors":
                query = self._vectors(item.vectors, f"{where}.vectors")
                modality = query.modality
            else:
                raise invalid(f"{where}: no content; set caption, image, regions or vectors")
            key = (modality, item.id)
            if key in seen:
                raise invalid(f"{where}.id: {item.id!r} repeats items[{seen[key]}] (ids are unique per modality within a request)")
            seen[key] = i
            entries.append((modality, metadata, query))
        encoded: dict[int, Query] = {}
        for kind in (CAPTIONS, IMAGES):
            if raw[kind]:
                results = await self._encode(kind, [x[1] for x in raw[kind]], [x[2] for x in raw[kind]])
                for (i, _value, where), result in zip(raw[kind], results, strict=True):
                    self._check_concepts(result, where)
                    encoded[i] = result
        # Every item's model must match the collections (created on first use) before anything is stored.
        batches: dict[str, list[Item]] = {IMAGES: [], CAPTIONS: []}
        for i, (modality, metadata, query) in enumerate(entries):
            query = encoded.get(i, query)
            assert query is not None  # raw items were encoded above
            if query.model is None:
                query.model = await self._default_model(query.global_vector.shape[0])
            if store.model is None:
                await self._db(store.ensure, query.model)
            try:
                store.check_model(query.model, what=f"{prefix}items[{i}]: the vectors")
            except ModelMismatch as exc:
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            batches[modality].append(
                Item(items[i].id, query.global_vector, query.concepts, metadata, labels=query.labels, boxes=query.boxes)
            )
        for modality, batch in batches.items():
            await self._hub_statistics(modality, batch)
        stored: list[str] = []  # ids acknowledged so far, for the error if a later write fails
        for modality, batch in batches.items():
            if not batch:
                continue
            try:
                await self._db(store.upsert, modality, batch)
            except WriteFailed as exc:
                stored += [f"{modality}/{item.id}" for item in batch[: exc.stored]]
                raise self._write_failure(prefix, exc, stored) from None
            stored += [f"{modality}/{item.id}" for item in batch]
            self.metrics.items.labels(modality).inc(len(batch))
            await self._db(self._server.cache_written, modality, batch)
        return len(batches[IMAGES]), len(batches[CAPTIONS])

    @staticmethod
    def _write_failure(prefix: str, exc: WriteFailed, stored: list[str]) -> RpcFailure:
        """Says exactly what an Index stored before Milvus failed. A refusal of the data itself is permanent
        (INVALID_ARGUMENT); anything else (Milvus unreachable, timeouts) may be retried (UNAVAILABLE)."""
        if not stored:
            done = "nothing of this request was stored"
        else:
            shown = ", ".join(stored[:5]) + (f", ... ({len(stored)} in all)" if len(stored) > 5 else "")
            done = f"{len(stored)} items were stored before it (modality/id): {shown}"
        if exc.permanent:
            return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}items: {exc}; {done}; fix the data, retrying fails the same way")
        details = hide_cause(f"{without_cause(exc)}; {done} (retry: indexing is idempotent)", exc, log)
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, details)

    async def Index(self, request, context):
        async def work():
            images, captions = await self._index(request)
            return search_pb2.IndexResponse(
                indexed=images + captions,
                images=images,
                captions=captions,
                model=model_ref(self.store.model),
                request_id=request.request_id,
            )

        return await self._unary("Index", context, request.request_id, work)

    async def StreamIndex(self, request_iterator, context):
        totals = [0, 0]
        messages = 0

        def failed(exc: Exception) -> RpcFailure:
            """The stream's answer when message `messages` fails: its status, and what the earlier ones stored."""
            code, details = classify(exc)
            done = f"; messages 0..{messages - 1} ({totals[0] + totals[1]} items) were stored" if messages else ""
            return RpcFailure(code, details + done)

        async def work():
            nonlocal messages
            request_id = ""
            incoming = aiter(request_iterator)
            while True:
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                except RpcFailure as exc:  # bytes that do not parse (MalformedRequestInterceptor)
                    raise failed(invalid(f"stream message {messages}: {exc.details}")) from exc
                try:
                    problem = request_id_problem(request.request_id, self.config.max_request_id_chars)
                    if problem:
                        raise invalid(f"stream message {messages}: {problem}")
                    request_id = request.request_id or request_id
                    images, captions = await self._index(request, prefix=f"stream message {messages}: ")
                except Exception as exc:  # noqa: BLE001
                    raise failed(exc) from exc
                totals[0] += images
                totals[1] += captions
                messages += 1
            return search_pb2.IndexResponse(
                indexed=sum(totals), images=totals[0], captions=totals[1], model=model_ref(self.store.model), request_id=request_id
            )

        return await self._unary("StreamIndex", context, "", work)

    # ------------------------------------------------------------------ Delete / Get / Stats

    async def Delete(self, request, context):
        async def work():
            modality = self._modality(request.modality)
            ids = self._ids(request.ids)
            deleted, missing = await self._db(self.store.delete, modality, ids)
            self._server.cache_deleted(modality, ids)
            return search_pb2.DeleteResponse(deleted=deleted, not_found=missing)

        return await self._unary("Delete", context, "", work)

    async def Get(self, request, context):
        async def work():
            modality = self._modality(request.modality)
            ids = list(request.ids)
            self._ids(ids)
            store = self.store
            found = await self._db(store.get, modality, list(dict.fromkeys(ids)), request.include_vectors)
            response = search_pb2.GetResponse()
            for value in ids:
                item = response.items.add(id=value)
                stored = found.get(value)
                if stored is None:
                    continue
                item.found = True
                item.metadata_json = json.dumps(stored.metadata, ensure_ascii=False)
                item.num_concepts = stored.num_concepts
                item.word_pieces.extend(stored.labels)
                if stored.boxes is not None:
                    item.boxes.CopyFrom(to_tensor(stored.boxes, FLOAT32))
                if request.include_vectors:
                    item.global_vector.CopyFrom(to_tensor(stored.global_vector, FLOAT32))
                    item.concepts.CopyFrom(to_tensor(stored.concepts, FLOAT16))
                name, _, version = stored.model.rpartition("@")
                item.model.CopyFrom(
                    common_pb2.ModelRef(name=name, version=int(version or 0), dimension=store.model.dimension if store.model else 0)
                )
            return response

        return await self._unary("Get", context, "", work)

    async def Stats(self, request, context):
        async def work():
            store = self.store
            images = await self._db(store.count, IMAGES)
            captions = await self._db(store.count, CAPTIONS)
            cfg = self.config
            limits = {
                name: int(getattr(cfg, name))
                for name in (
                    "max_top_k", "max_index_items", "max_ids", "max_metadata_bytes", "max_filter_chars",
                    "max_rerank_multiplier", "max_candidates", "rerank_multiplier", "max_message_bytes",
                )
            }  # fmt: skip
            limits["max_concepts"] = store.max_concepts
            limits["max_id_length"] = store.max_id_length
            return search_pb2.StatsResponse(
                images=images,
                captions=captions,
                model=model_ref(store.model),
                backend=store.backend,
                server_version=store.server_version,
                uri=store.safe_uri,
                index_type=store.index_type,
                concept_encoding=f"fp16 base64 in {store.chunks} VARCHAR field(s)",
                sparse_vectors_supported=store.sparse_supported,
                encoder_configured=self._server.encoder is not None,
                limits=limits,
                first_stages=[search_pb2.DENSE, *[FIRST_STAGE_ENUM[k] for k in store.surrogates]],
            )

        return await self._unary("Stats", context, "", work)

    # ------------------------------------------------------------------ Search

    async def _query(self, request) -> Query:
        which = request.WhichOneof("query")
        if which == "caption":
            if not request.caption.strip():
                raise invalid("caption: empty query")
            query = (await self._encode(CAPTIONS, [request.caption], ["caption"]))[0]
        elif which == "image":
            if not request.image:
                raise invalid("image: empty query")
            query = (await self._encode(IMAGES, [request.image], ["image"]))[0]
        elif which == "regions":
            query = (await self._encode(IMAGES, [self._region_input(request.regions, "regions")], ["regions"]))[0]
        elif which == "vectors":
            query = self._vectors(request.vectors, "vectors")
            if query.model is None:
                query.model = await self._default_model(query.global_vector.shape[0])
        else:
            raise invalid("query: empty; set caption, image, regions or vectors")
        if query.concepts.shape[0] == 0:
            raise invalid(f"{which}: the query has no concept vectors (no word pieces / regions)")
        return query

    async def Search(self, request, context):
        async def work():
            cfg = self.config
            store = self.store
            top_k = request.top_k or 10
            if not 1 <= top_k <= cfg.max_top_k:
                raise invalid(f"top_k: {request.top_k}; give 1..{cfg.max_top_k} (--max-top-k)")
            multiplier = request.rerank_multiplier or cfg.rerank_multiplier
            if not 1 <= multiplier <= cfg.max_rerank_multiplier:
                raise invalid(
                    f"rerank_multiplier: {request.rerank_multiplier}; give 1..{cfg.max_rerank_multiplier} (--max-rerank-multiplier)"
                )
            if request.first_stage not in FIRST_STAGE:
                raise invalid(f"first_stage: unknown value {request.first_stage}")
            first_stage = FIRST_STAGE[request.first_stage]
            if first_stage != "dense" and store.model is not None and first_stage not in store.surrogates:
                allowed = ", ".join(search_pb2.FirstStage.Name(FIRST_STAGE_ENUM[k]) for k in ("dense", *store.surrogates))
                backend = f"{store.backend} {store.server_version}".strip()
                raise RpcFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"first_stage {search_pb2.FirstStage.Name(request.first_stage)}: the collections have no {first_stage}_vector "
                    f"field; allowed here: {allowed}. It needs {FIRST_STAGE_FLAGS[first_stage]} when the collections are created, "
                    f"on a backend with sparse vectors (milvus-lite 3.x, Milvus >= 2.4); this backend, {backend}, "
                    f"{'has' if store.sparse_supported else 'has no'} sparse vectors",
                )
            expr = request.filter.strip()
            if len(expr) > cfg.max_filter_chars:
                raise invalid(f"filter: {len(expr)} characters exceeds the limit of {cfg.max_filter_chars} (--max-filter-chars)")
            started = time.perf_counter()
            query = await self._query(request)
            self.metrics.stage.labels("encode").observe(time.perf_counter() - started)
            store.check_model(query.model, what="the query's vectors")
            target = IMAGES if query.modality == CAPTIONS else CAPTIONS
            response = search_pb2.SearchResponse(
                target=MODALITY_ENUM[target],
                model=model_ref(store.model),
                request_id=request.request_id,
                reranked=not request.disable_rerank,
            )
            if query.modality == CAPTIONS:
                response.query_word_pieces.extend(query.labels)
            if expr:
                await self._db(store.validate_filter, target, expr)
            rerank = not request.disable_rerank
            n = min(multiplier * top_k, cfg.max_candidates) if rerank else top_k
            ranking = await self._ranking(store.model) if rerank and store.model is not None else Ranking()
            if not store.hub_field:  # collections of schema format < 3 hold no hub statistics
                ranking = Ranking(ranking.blend_weight)
            response.ranking = ranking.label if rerank else "first stage"
            # The blend needs each candidate's exact global cosine: the dense first stage's score on raw-vector indexes.
            need_globals = ranking.blend_weight is not None and not (first_stage == "dense" and store.dense_scores_exact)
            started = time.perf_counter()
            need_concepts = rerank or not request.skip_explanation
            cache = self._server.usable_cache()
            candidates = await self._db(
                store.search,
                target,
                query.global_vector,
                n,
                expr,
                first_stage,
                need_concepts and cache is None,
                query.concepts,
                need_globals,
            )
            self.metrics.stage.labels("first_stage").observe(time.perf_counter() - started)
            if need_concepts and candidates:
                started = time.perf_counter()
                if cache is not None:
                    block, counts, candidates = await self._db(self._server.cached_concepts, cache, target, candidates)
                else:
                    block, counts = stack_concepts([c.concepts for c in candidates], store.model.dimension)
                self.metrics.stage.labels("concepts").observe(time.perf_counter() - started)
            self.metrics.candidates.observe(len(candidates))
            response.candidates = len(candidates)
            if not candidates:
                return response
            order = list(range(len(candidates)))
            final = np.array([c.score for c in candidates], dtype=np.float32)
            if rerank:
                started = time.perf_counter()
                if need_globals:
                    global_cosines = np.stack([c.global_vector for c in candidates]) @ query.global_vector.astype(np.float32)
                else:
                    global_cosines = final
                final = await asyncio.get_running_loop().run_in_executor(
                    None,
                    rerank_scores,
                    query.concepts,
                    query.modality == CAPTIONS,
                    block,
                    counts,
                    global_cosines,
                    ranking,
                    np.array([c.hub for c in candidates], dtype=np.float32),
                    cfg.rerank_chunk,
                )
                self.metrics.stage.labels("rerank").observe(time.perf_counter() - started)
                order.sort(key=lambda i: (-float(final[i]), i))
            for i in order[:top_k]:
                c = candidates[i]
                hit = response.hits.add(
                    id=c.id,
                    score=float(final[i]),
                    first_stage_score=c.score,
                    first_stage_rank=i,
                    metadata_json=json.dumps(c.metadata, ensure_ascii=False),
                )
                if request.skip_explanation:
                    continue
                concepts = block[i, : counts[i]]
                if query.modality == CAPTIONS:
                    labels = query.labels
                    terms = explain(concepts, c.boxes, query.concepts, labels)
                else:
                    labels = c.labels
                    terms = explain(query.concepts, query.boxes, concepts, labels)
                for t in terms:
                    hit.alignment.add(
                        word_index=t.word_index,
                        word_piece=labels[t.word_index] if t.word_index < len(labels) else "",
                        word=t.word,
                        piece_indices=t.piece_indices,
                        region_index=t.region_index,
                        box=t.box,
                        similarity=t.similarity,
                    )
            return response

        return await self._unary("Search", context, request.request_id, work)


# --------------------------------------------------------------------------- server


ENCODER_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
ENCODER_RECHECK_S = 5.0  # how often a service whose encoder refused its credentials asks again


def encoder_refusal(exc: EncoderError) -> str:
    return (
        f"the encoder refused this search service's credentials ({exc.code.name}: {exc.details}): check --encoder-token "
        "(TERAN_SEARCH_ENCODER_TOKEN) and the encoder's --auth-token; requests that need the encoder fail until it accepts them"
    )


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
        self._cache_full_logged = False
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

    def usable_cache(self) -> RerankCache | None:
        """The cache, if enabled and the collections carry stamps (schema format 2)."""
        store = self.store
        if self.cache is None or store is None or store.model is None or not store.stamped:
            return None
        return self.cache

    def _cache_gauges(self) -> None:
        cache = self.cache
        if cache is None:
            return
        for modality in (IMAGES, CAPTIONS):
            self.metrics.cache_items.labels(modality).set(cache.items(modality))
        self.metrics.cache_bytes.set(cache.bytes())
        self.metrics.cache_full.set(1 if cache.full else 0)
        if cache.full and not self._cache_full_logged:
            self._cache_full_logged = True
            log.warning(
                "rerank cache full: items beyond --rerank-cache-mb are not cached; their concepts are fetched from Milvus per search",
                extra={"limit_mib": self.config.rerank_cache_mb, "items": cache.items(), "mib": round(cache.bytes() / 2**20, 1)},
            )
        elif not cache.full:
            self._cache_full_logged = False

    def cache_written(self, modality: str, items: list[Item]) -> None:
        """After Milvus acknowledged an upsert: cache the new versions (their stamps were set by the upsert)."""
        cache = self.usable_cache()
        if cache is None:
            return
        for item in items:
            if not cache.put(modality, item.id, item.stamp, item.concepts):
                cache.remove(modality, [item.id])  # an older version must not linger (it would only miss, but holds memory)
        self._cache_gauges()

    def cache_deleted(self, modality: str, ids: list[str]) -> None:
        if self.cache is not None:
            self.cache.remove(modality, ids)
            self._cache_gauges()

    def cached_concepts(self, cache: RerankCache, modality: str, candidates: list):
        """(block [C, L, D] fp16, counts [C], candidates): hits from the cache, misses (absent or stale stamp) from Milvus.
        A candidate deleted since the first stage is dropped; one rewritten since takes the new version's fields."""
        store = self.store
        if store is None:
            raise StoreError("the search service is not connected to Milvus")
        dim = store.known_model.dimension
        gathered = cache.gather(
            modality, [c.id for c in candidates], [c.stamp for c in candidates], [c.num_concepts for c in candidates], dim
        )
        block, counts = gathered.block, gathered.counts
        self.metrics.cache_lookups.labels("hit").inc(len(candidates) - len(gathered.missing))
        if not gathered.missing:
            return block, counts, candidates
        self.metrics.cache_lookups.labels("miss").inc(len(gathered.missing))
        fetched = store.concepts(modality, [candidates[i].id for i in gathered.missing])
        keep = np.ones(len(candidates), dtype=bool)
        for i in gathered.missing:
            c = candidates[i]
            row = fetched.get(c.id)
            if row is None:
                keep[i] = False
                continue
            if row.stamp != c.stamp:  # rewritten between the first stage and now: serve the new version whole
                c.metadata, c.labels, c.boxes, c.num_concepts, c.model, c.stamp = (
                    row.metadata,
                    row.labels,
                    row.boxes,
                    row.num_concepts,
                    row.model,
                    row.stamp,
                )
            assert row.concepts is not None  # store.concepts() always fetches them
            count = row.concepts.shape[0]
            if count > block.shape[1]:
                block = np.pad(block, ((0, 0), (0, count - block.shape[1]), (0, 0)))
            block[i, :count] = row.concepts
            counts[i] = count
            cache.put(modality, c.id, row.stamp, row.concepts)
        self._cache_gauges()
        if not keep.all():
            candidates = [c for c, k in zip(candidates, keep, strict=True) if k]
            block, counts = block[keep], counts[keep]
        return block, counts, candidates

    def _cache_worker(self) -> None:
        """Startup load, then (if --rerank-cache-refresh-s) periodic reconciliation with Milvus."""
        cache, cfg = self.cache, self.config
        if cache is None:
            return
        try:
            if self.usable_cache() is not None:
                started = time.perf_counter()
                cache.state = "loading"
                self.metrics.cache_loading.set(1)
                log.info("rerank cache loading from Milvus", extra={"limit_mib": cfg.rerank_cache_mb})
                counts = rerank_cache.load(cache, self.store, (IMAGES, CAPTIONS), log, self._cache_stop, on_progress=self._cache_gauges)
                self._cache_gauges()
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
            if self.usable_cache() is None:
                continue
            try:
                result = rerank_cache.refresh(cache, self.store, (IMAGES, CAPTIONS), self._cache_stop)
                self._cache_gauges()
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
        store = MilvusStore(
            cfg.milvus_uri,
            cfg.milvus_token,
            prefix=cfg.collection_prefix,
            index_type=cfg.index_type,
            index_params=cfg.index_params,
            search_params=cfg.search_params,
            consistency_level=cfg.consistency_level,
            max_concepts=cfg.max_concepts,
            max_id_length=cfg.max_id_length,
            flush_on_index=cfg.flush_on_index,
            timeout=cfg.milvus_timeout_s,
            sparse_surrogates=cfg.sparse_surrogates,
            sparse_params={
                "sq_scale": cfg.sq_scale,
                "dp_keep": cfg.dp_keep,
                "boc_top": cfg.boc_top,
                "boc_keep": cfg.boc_keep,
                "boc_temperature": cfg.boc_temperature,
            },
            boc_codebook=load_codebook(cfg.boc_codebook) if cfg.boc_codebook is not None else None,
        )
        await asyncio.get_running_loop().run_in_executor(self.milvus_pool, store.open)
        self.store = store
        if self.cache is not None:
            if store.model is not None and not store.stamped:
                log.warning(
                    "rerank cache disabled: the collections predate row stamps (schema format 1), so entries could not be "
                    "validated; concepts come with each search. Re-index into new collections (--collection-prefix) to use it"
                )
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


class ServerThread:
    """Run a SearchServer on its own event loop in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, config: SearchConfig, *, timeout: float = 120.0):
        self.server = SearchServer(config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="search-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("search server did not start in time")
        if self._error is not None:
            self._thread.join(10)
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            try:
                await self.server.start()
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc
                self._ready.set()
                await self.server.stop(0)
                return
            self._ready.set()
            await self.server.wait()

        self.loop.run_until_complete(main())
        self.loop.close()

    @property
    def port(self) -> int:
        if self.server.port is None:
            raise RuntimeError("the search server is not listening")
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = 5.0) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(None if grace is None else grace + 30)
            self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
