"""The search service's work, without gRPC: index, search, get, delete and stats over the Milvus
store, the encoder client and the re-rank cache. Takes and returns `teran_api.types` values and
raises `search_service.errors` (or the store's errors); `search_service.server` only converts.

Every Milvus call runs on the Milvus worker pool, bounded by the request's deadline (`deadline`:
time.monotonic(), None for none).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, cast

import grpc  # only for the encoder client's status codes
import numpy as np

from search_service.checks import check_unit_rows, parse_metadata
from search_service.concept_codes import load_codec
from search_service.concept_source import ConceptSource
from search_service.config import SearchConfig, parse_ranking
from search_service.deadlines import within
from search_service.errors import InvalidRequest, Overloaded, PreconditionFailed, Unavailable
from search_service.filters import ID_FORBIDDEN
from search_service.layout import CAPTIONS, IMAGES
from search_service.logs import get_logger
from search_service.metrics import Metrics
from search_service.milvus_calls import WriteFailed
from search_service.ranking import Ranking, coded_query, explain, rerank_scores, stack_codes, stack_concepts
from search_service.sparse import load_codebook
from search_service.store import Item, MilvusStore
from serving.failures import hide_cause, without_cause
from teran_api.encoder_client import AsyncEncoderClient, EncoderError
from teran_api.search_messages import first_stage_name
from teran_api.types import (
    DeleteResult,
    FirstStage,
    IndexItem,
    IndexResult,
    Modality,
    ModelRef,
    RegionFeatures,
    SearchHit,
    SearchQuery,
    SearchResult,
    Stats,
    StoredItem,
    Vectors,
)

log = get_logger("server")
STORE_MODALITY = {Modality.IMAGE: IMAGES, Modality.CAPTION: CAPTIONS}
API_MODALITY = {IMAGES: Modality.IMAGE, CAPTIONS: Modality.CAPTION}
FIRST_STAGE_FLAGS = {"sq": "--sparse-surrogates sq", "dp": "--sparse-surrogates dp", "boc": "--boc-codebook PATH"}
ENCODER_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
STATS_LIMITS = (
    "max_top_k", "max_index_items", "max_ids", "max_metadata_bytes", "max_filter_chars",
    "max_rerank_multiplier", "max_candidates", "rerank_multiplier", "max_message_bytes",
)  # fmt: skip
_ENCODER_FIELD = re.compile(r"\b(captions|images)\[(\d+)\]")
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("search_deadline", default=None)


def encoder_refusal(exc: EncoderError) -> str:
    return (
        f"the encoder refused this search service's credentials ({exc.code.name}: {exc.details}): check --encoder-token "
        "(TERAN_SEARCH_ENCODER_TOKEN) and the encoder's --auth-token; requests that need the encoder fail until it accepts them"
    )


def open_store(cfg: SearchConfig) -> MilvusStore:
    """The Milvus store the settings describe, opened: collections created or checked (blocking)."""
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
        concept_codec=load_codec(cfg.concept_codec) if cfg.concept_codec is not None else None,
    )
    store.open()
    return store


@dataclass
class Query:
    """An encoded query or item: global [D], concepts [N, D] float32, labels (captions), boxes (images), model."""

    modality: str  # IMAGES or CAPTIONS
    global_vector: np.ndarray
    concepts: np.ndarray
    labels: list[str]
    boxes: np.ndarray | None
    model: ModelRef | None


class Searcher:
    """`on_encoder_refused(exc)`: told when the encoder refuses this service's credentials."""

    def __init__(
        self,
        config: SearchConfig,
        store: MilvusStore,
        milvus_pool: Executor,
        *,
        encoder: AsyncEncoderClient | None = None,
        concepts: ConceptSource | None = None,
        metrics: Metrics | None = None,
        on_encoder_refused: Callable[[EncoderError], None] | None = None,
    ):
        self.config = config
        self.store = store
        self.milvus_pool = milvus_pool
        self.encoder = encoder
        self.metrics = metrics or Metrics()
        self.concept_source = concepts or ConceptSource(store, None, self.metrics, 0, log)
        self.on_encoder_refused = on_encoder_refused
        self._model_rankings: dict[tuple[str, int], Ranking] = {}  # (name, version) -> the encoder model's ranking

    async def _db(self, fn, *args):
        """`fn(*args)` on a Milvus worker, its Milvus calls bounded by this request's deadline."""
        return await asyncio.get_running_loop().run_in_executor(self.milvus_pool, within, _deadline.get(), fn, *args)

    # ------------------------------------------------------------------ validation

    def _check_id(self, value: str, where: str) -> None:
        if not value:
            raise InvalidRequest(f"{where}: empty id")
        limit = self.store.max_id_length
        if len(value.encode("utf-8")) > limit:
            raise InvalidRequest(f"{where}: id of {len(value.encode('utf-8'))} bytes exceeds the limit of {limit} (--max-id-length)")
        if ID_FORBIDDEN.search(value):
            raise InvalidRequest(f"{where}: id {value!r} contains a double quote, backslash or control character")

    def _metadata(self, text: str, where: str) -> dict:
        limit = self.config.max_metadata_bytes
        if len(text.encode("utf-8")) > limit:
            raise InvalidRequest(f"{where}: {len(text.encode('utf-8'))} bytes exceeds the limit of {limit} (--max-metadata-bytes)")
        if not text.strip():
            return {}
        try:
            return parse_metadata(text, where)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def _ids(self, ids: Sequence[str], where: str = "ids") -> list[str]:
        if not ids:
            raise InvalidRequest(f"{where}: empty; give 1..{self.config.max_ids} ids")
        if len(ids) > self.config.max_ids:
            raise InvalidRequest(f"{where}: {len(ids)} ids exceeds the limit of {self.config.max_ids} per request (--max-ids)")
        for i, value in enumerate(ids):
            self._check_id(value, f"{where}[{i}]")
        return list(dict.fromkeys(ids))

    @staticmethod
    def _modality(value: Modality | None, where: str = "modality") -> str:
        if value is None:
            raise InvalidRequest(f"{where}: set IMAGE or CAPTION")
        return STORE_MODALITY[Modality(value)]

    def _vectors(self, v: Vectors, where: str) -> Query:
        modality = self._modality(v.modality, f"{where}.modality")
        limit = self.config.max_concepts
        global_vector, concepts = np.asarray(v.global_vector, np.float32), np.asarray(v.concepts, np.float32)
        dim = global_vector.shape[0]
        if not 1 <= concepts.shape[0] <= limit:
            raise InvalidRequest(f"{where}.concepts: {concepts.shape[0]} concept vectors; give 1..{limit} (--max-concepts)")
        if v.model is not None and v.model.dimension and v.model.dimension != dim:
            raise InvalidRequest(f"{where}.global_vector: {dim} values, but model.dimension is {v.model.dimension}")
        if concepts.shape[1] != dim:
            raise InvalidRequest(f"{where}.concepts.shape: {list(concepts.shape)}; the global vector has dimension {dim}")
        try:
            check_unit_rows(global_vector, f"{where}.global_vector", self.config.vector_norm_tolerance)
            check_unit_rows(concepts, f"{where}.concepts", self.config.vector_norm_tolerance)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        boxes = None
        labels: list[str] = []
        if modality == IMAGES:
            if v.boxes is not None:
                boxes = np.asarray(v.boxes, np.float32)
                if boxes.shape != (concepts.shape[0], 4):
                    raise InvalidRequest(f"{where}.boxes.shape: {list(boxes.shape)}, expected [{concepts.shape[0]}, 4]")
            if v.word_pieces:
                raise InvalidRequest(f"{where}.word_pieces: only for CAPTION vectors")
        else:
            if v.boxes is not None:
                raise InvalidRequest(f"{where}.boxes: only for IMAGE vectors")
            labels = list(v.word_pieces) or [f"#{i}" for i in range(concepts.shape[0])]
            if len(labels) != concepts.shape[0]:
                raise InvalidRequest(f"{where}.word_pieces: {len(labels)} labels for {concepts.shape[0]} concept vectors")
        model = None  # filled in by _default_model
        if v.model is not None and (v.model.name or v.model.version):
            model = ModelRef(v.model.name, int(v.model.version), dim)
        return Query(modality, global_vector, concepts, labels, boxes, model)

    def _check_concepts(self, query: Query, where: str) -> None:
        limit = self.config.max_concepts
        if query.concepts.shape[0] == 0:
            raise InvalidRequest(f"{where}: the encoder returned no concept vectors (no word pieces / regions)")
        if query.concepts.shape[0] > limit:
            raise InvalidRequest(f"{where}: {query.concepts.shape[0]} concept vectors exceeds the limit of {limit} (--max-concepts)")

    # ------------------------------------------------------------------ models and rankings

    async def _default_model(self, dim: int) -> ModelRef:
        """The model of vectors sent without a ModelRef: the collections', else the encoder's, else the configured one."""
        store = self.store
        if store.model is not None:
            return ModelRef(store.model.name, store.model.version, dim)
        if self.encoder is not None:
            try:
                info = await self.encoder.model_info(timeout=self.config.encoder_timeout_s)
                return ModelRef(info.model.name, info.model.version, dim)
            except EncoderError:
                pass
        return ModelRef(self.config.model_name, self.config.model_version, dim)

    async def _ranking(self, model: ModelRef) -> Ranking:
        """The re-rank per --ranking. `model`: the collections' model. With --ranking model it is the
        encoder model's (blend weight and hub penalty); a model the encoder does not serve, or no
        encoder, ranks by MrSw."""
        ranking = parse_ranking(self.config.ranking)
        if ranking != "model":
            return Ranking(cast(float | None, ranking))  # a weight, or None for MrSw
        return await self._model_ranking(model)

    async def _model_ranking(self, model: ModelRef) -> Ranking:
        """The encoder's ranking for `model` (from its manifest), fetched once per model."""
        encoder = self.encoder
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
                        raise Unavailable(
                            f"the encoder's hub reference is for {served.name} v{served.version} (dimension {hub.dimension}), "
                            f"not the collections' {model.describe()}: it is changing models; retry"
                        )
            except EncoderError as exc:
                raise self._encoder_failure(exc, []) from None
            except ValueError as exc:  # a malformed reference
                raise PreconditionFailed(f"the encoder's hub reference is unusable: {exc}") from None
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

    def _require_encoder(self, where: str) -> AsyncEncoderClient:
        if self.encoder is None:
            raise PreconditionFailed(f"{where}: raw images and captions need an encoder; set --encoder-address (or send vectors)")
        return self.encoder

    def _encoder_failure(self, exc: EncoderError, positions: list[str]) -> Exception:
        details = _ENCODER_FIELD.sub(lambda m: positions[int(m.group(2))] if int(m.group(2)) < len(positions) else m.group(0), exc.details)
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details)
        if exc.code in ENCODER_AUTH_CODES:  # our configuration, not the client's request: retrying cannot help
            if self.on_encoder_refused is not None:
                self.on_encoder_refused(exc)
            return PreconditionFailed(encoder_refusal(exc))
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"encoder overloaded: {details}")
        return Unavailable(hide_cause(f"encoder call failed ({exc.code.name}); retry", details, log))

    async def _encode(self, kind: str, inputs: list, positions: list[str]) -> list[Query]:
        """Encode captions (kind CAPTIONS) or images in chunks; positions name each input for errors."""
        encoder = self._require_encoder(positions[0])
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
                model = ModelRef(r.model.name, r.model.version, r.model.dimension)
                concepts = np.asarray(r.concepts, dtype=np.float32)
                if kind == CAPTIONS:
                    out.append(Query(CAPTIONS, np.asarray(r.global_vector, np.float32), concepts, list(r.word_pieces), None, model))
                else:
                    out.append(Query(IMAGES, np.asarray(r.global_vector, np.float32), concepts, [], np.asarray(r.boxes, np.float32), model))
        return out

    # ------------------------------------------------------------------ index

    def check_item_count(self, count: int, prefix: str = "") -> None:
        """An Index request's item count; the gRPC edge checks it before decoding any item."""
        limit = self.config.max_index_items
        if not count:
            raise InvalidRequest(f"{prefix}items: empty; give 1..{limit} items")
        if count > limit:
            raise InvalidRequest(f"{prefix}items: {count} items exceeds the limit of {limit} per request (--max-index-items)")

    async def index(
        self, items: Sequence[IndexItem], *, prefix: str = "", request_id: str = "", deadline: float | None = None
    ) -> IndexResult:
        """Store the items (upserts): all of them are checked, encoded and matched to the collections'
        model before anything is written. `prefix` starts every error's field path."""
        _deadline.set(deadline)
        store = self.store
        self.check_item_count(len(items), prefix)
        seen: dict[tuple[str, str], int] = {}
        entries: list[tuple[str, dict, Query | None]] = []
        raw: dict[str, list] = {CAPTIONS: [], IMAGES: []}
        for i, item in enumerate(items):
            where = f"{prefix}items[{i}]"
            self._check_id(item.id, f"{where}.id")
            metadata = self._metadata(item.metadata_json, f"{where}.metadata_json")
            content = item.content
            query = None
            if isinstance(content, str):
                if not content.strip():
                    raise InvalidRequest(f"{where}.caption: empty")
                modality = CAPTIONS
                raw[CAPTIONS].append((i, content, f"{where}.caption"))
            elif isinstance(content, bytes):
                if not content:
                    raise InvalidRequest(f"{where}.image: empty")
                modality = IMAGES
                raw[IMAGES].append((i, content, f"{where}.image"))
            elif isinstance(content, RegionFeatures):
                modality = IMAGES
                raw[IMAGES].append((i, content, f"{where}.regions"))
            elif isinstance(content, Vectors):
                query = self._vectors(content, f"{where}.vectors")
                modality = query.modality
            else:
                raise InvalidRequest(f"{where}: no content; set caption, image, regions or vectors")
            key = (modality, item.id)
            if key in seen:
                raise InvalidRequest(f"{where}.id: {item.id!r} repeats items[{seen[key]}] (ids are unique per modality within a request)")
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
            store.check_model(query.model, what=f"{prefix}items[{i}]: the vectors")
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
            await self._db(self.concept_source.written, modality, batch)
        images, captions = len(batches[IMAGES]), len(batches[CAPTIONS])
        return IndexResult(images + captions, images, captions, store.model, request_id)

    @staticmethod
    def _write_failure(prefix: str, exc: WriteFailed, stored: list[str]) -> Exception:
        """Says exactly what an Index stored before Milvus failed. A refusal of the data itself is permanent
        (InvalidRequest); anything else (Milvus unreachable, timeouts) may be retried (Unavailable)."""
        if not stored:
            done = "nothing of this request was stored"
        else:
            shown = ", ".join(stored[:5]) + (f", ... ({len(stored)} in all)" if len(stored) > 5 else "")
            done = f"{len(stored)} items were stored before it (modality/id): {shown}"
        if exc.permanent:
            return InvalidRequest(f"{prefix}items: {exc}; {done}; fix the data, retrying fails the same way")
        return Unavailable(hide_cause(f"{without_cause(exc)}; {done} (retry: indexing is idempotent)", exc, log))

    # ------------------------------------------------------------------ delete / get / stats

    async def delete(self, modality: Modality | None, ids: Sequence[str], *, deadline: float | None = None) -> DeleteResult:
        _deadline.set(deadline)
        kind = self._modality(modality)
        unique = self._ids(ids)
        deleted, missing = await self._db(self.store.delete, kind, unique)
        self.concept_source.deleted(kind, unique)
        return DeleteResult(deleted, missing)

    async def get(
        self, modality: Modality | None, ids: Sequence[str], include_vectors: bool = False, *, deadline: float | None = None
    ) -> list[StoredItem]:
        """One entry per requested id, in order (a repeated id repeats its entry)."""
        _deadline.set(deadline)
        kind = self._modality(modality)
        store = self.store
        found = await self._db(store.get, kind, self._ids(ids), include_vectors)
        dimension = store.model.dimension if store.model else 0
        out = []
        for value in ids:
            stored = found.get(value)
            if stored is None:
                out.append(StoredItem(value, found=False))
                continue
            name, _, version = stored.model.rpartition("@")
            out.append(
                StoredItem(
                    value,
                    found=True,
                    metadata=stored.metadata,
                    num_concepts=stored.num_concepts,
                    word_pieces=list(stored.labels),
                    boxes=stored.boxes,
                    global_vector=stored.global_vector if include_vectors else None,
                    concepts=stored.concepts if include_vectors else None,
                    model=ModelRef(name, int(version or 0), dimension),
                )
            )
        return out

    async def stats(self, *, deadline: float | None = None) -> Stats:
        _deadline.set(deadline)
        store, cfg = self.store, self.config
        images = await self._db(store.count, IMAGES)
        captions = await self._db(store.count, CAPTIONS)
        limits = {name: int(getattr(cfg, name)) for name in STATS_LIMITS}
        limits["max_concepts"] = store.max_concepts
        limits["max_id_length"] = store.max_id_length
        return Stats(
            images=images,
            captions=captions,
            model=store.model,
            backend=store.backend,
            server_version=store.server_version,
            uri=store.safe_uri,
            index_type=store.index_type,
            concept_encoding=store.layout.concepts.describe(store.chunks),
            sparse_vectors_supported=store.sparse_supported,
            encoder_configured=self.encoder is not None,
            limits=limits,
            first_stages=[FirstStage.DENSE, *[FirstStage(k) for k in store.surrogates]],
        )

    # ------------------------------------------------------------------ search

    async def _query(self, request: SearchQuery) -> Query:
        content = request.query
        if isinstance(content, str):
            which = "caption"
            if not content.strip():
                raise InvalidRequest("caption: empty query")
            query = (await self._encode(CAPTIONS, [content], ["caption"]))[0]
        elif isinstance(content, bytes):
            which = "image"
            if not content:
                raise InvalidRequest("image: empty query")
            query = (await self._encode(IMAGES, [content], ["image"]))[0]
        elif isinstance(content, RegionFeatures):
            which = "regions"
            query = (await self._encode(IMAGES, [content], ["regions"]))[0]
        elif isinstance(content, Vectors):
            which = "vectors"
            query = self._vectors(content, "vectors")
            if query.model is None:
                query.model = await self._default_model(query.global_vector.shape[0])
        else:
            raise InvalidRequest("query: empty; set caption, image, regions or vectors")
        if query.concepts.shape[0] == 0:
            raise InvalidRequest(f"{which}: the query has no concept vectors (no word pieces / regions)")
        return query

    def _check_first_stage(self, stage: FirstStage) -> str:
        store = self.store
        first_stage = FirstStage(stage).value
        if first_stage != "dense" and store.model is not None and first_stage not in store.surrogates:
            allowed = ", ".join(first_stage_name(FirstStage(k)) for k in ("dense", *store.surrogates))
            backend = f"{store.backend} {store.server_version}".strip()
            raise PreconditionFailed(
                f"first_stage {first_stage_name(FirstStage(stage))}: the collections have no {first_stage}_vector "
                f"field; allowed here: {allowed}. It needs {FIRST_STAGE_FLAGS[first_stage]} when the collections are created, "
                f"on a backend with sparse vectors (milvus-lite 3.x, Milvus >= 2.4); this backend, {backend}, "
                f"{'has' if store.sparse_supported else 'has no'} sparse vectors"
            )
        return first_stage

    def _observe(self, stage: str, started: float) -> None:
        self.metrics.stage.labels(stage).observe(time.perf_counter() - started)

    async def search(self, request: SearchQuery, *, deadline: float | None = None) -> SearchResult:
        """The top_k items of the other modality: first stage, then the re-rank, each hit explained."""
        _deadline.set(deadline)
        cfg, store = self.config, self.store
        top_k = request.top_k or 10
        if not 1 <= top_k <= cfg.max_top_k:
            raise InvalidRequest(f"top_k: {request.top_k}; give 1..{cfg.max_top_k} (--max-top-k)")
        multiplier = request.rerank_multiplier or cfg.rerank_multiplier
        if not 1 <= multiplier <= cfg.max_rerank_multiplier:
            raise InvalidRequest(
                f"rerank_multiplier: {request.rerank_multiplier}; give 1..{cfg.max_rerank_multiplier} (--max-rerank-multiplier)"
            )
        first_stage = self._check_first_stage(request.first_stage)
        expr = request.filter.strip()
        if len(expr) > cfg.max_filter_chars:
            raise InvalidRequest(f"filter: {len(expr)} characters exceeds the limit of {cfg.max_filter_chars} (--max-filter-chars)")
        started = time.perf_counter()
        query = await self._query(request)
        self._observe("encode", started)
        assert query.model is not None  # set by the encoder, the request or _default_model
        store.check_model(query.model, what="the query's vectors")
        target = IMAGES if query.modality == CAPTIONS else CAPTIONS
        rerank = not request.disable_rerank
        result = SearchResult(
            hits=[],
            target=API_MODALITY[target],
            candidates=0,
            reranked=rerank,
            ranking="",
            model=store.model,
            query_word_pieces=query.labels if query.modality == CAPTIONS else [],
            request_id=request.request_id,
        )
        if expr:
            await self._db(store.validate_filter, expr)
        n = min(multiplier * top_k, cfg.max_candidates) if rerank else top_k
        ranking = await self._ranking(store.model) if rerank and store.model is not None else Ranking()
        if not store.hub_field:  # collections of schema format < 3 hold no hub statistics
            ranking = Ranking(ranking.blend_weight)
        result.ranking = ranking.label if rerank else "first stage"
        # The blend needs each candidate's exact global cosine: the dense first stage's score on raw-vector indexes.
        need_globals = ranking.blend_weight is not None and not (first_stage == "dense" and store.dense_scores_exact)
        need_concepts = rerank or not request.skip_explanation
        cache = self.concept_source.usable()
        started = time.perf_counter()
        candidates = await self._db(
            store.search, target, query.global_vector, n, expr, first_stage, need_concepts and cache is None, query.concepts, need_globals
        )
        self._observe("first_stage", started)
        query_concepts = query.concepts  # as the block: decoded concepts, or in the codec's principal basis
        if need_concepts and candidates:
            started = time.perf_counter()
            codec = store.layout.codec
            if cache is not None:
                block, counts, candidates = await self._db(self.concept_source.gather, cache, target, candidates)
            elif codec is not None:
                images = query.modality == CAPTIONS
                block, counts = stack_codes(codec, [c.codes for c in candidates], [c.num_concepts for c in candidates], images)
                query_concepts = coded_query(codec, query.concepts, images)
            else:
                block, counts = stack_concepts([c.concepts for c in candidates], store.known_model.dimension)
            self._observe("concepts", started)
        self.metrics.candidates.observe(len(candidates))
        result.candidates = len(candidates)
        if not candidates:
            return result
        order = list(range(len(candidates)))
        final = np.array([c.score for c in candidates], dtype=np.float32)
        if rerank:
            started = time.perf_counter()
            if need_globals:
                global_cosines = np.stack([c.global_vector for c in candidates]) @ query.global_vector.astype(np.float32)
            else:
                global_cosines = final
            hubs = np.array([c.hub for c in candidates], dtype=np.float32)
            final = await asyncio.get_running_loop().run_in_executor(
                None,
                rerank_scores,
                query_concepts,
                query.modality == CAPTIONS,
                block,
                counts,
                global_cosines,
                ranking,
                hubs,
                cfg.rerank_chunk,
            )
            self._observe("rerank", started)
            order.sort(key=lambda i: (-float(final[i]), i))
        for i in order[:top_k]:
            c = candidates[i]
            hit = SearchHit(c.id, float(final[i]), c.score, i, c.metadata)
            if not request.skip_explanation:
                concepts = block[i, : counts[i]]
                if query.modality == CAPTIONS:
                    hit.alignment = explain(concepts, c.boxes, query_concepts, query.labels)
                else:
                    hit.alignment = explain(query_concepts, query.boxes, concepts, c.labels)
            result.hits.append(hit)
        return result
