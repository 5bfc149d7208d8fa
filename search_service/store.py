"""Milvus storage of indexed items (the one system of record), through pymilvus.MilvusClient: writes
(upsert, delete), reads (get, scan, count), filter checks and the first-stage search.

The collections' schema and layout are search_service.layout's, the stored form of vectors
search_service.codec's; every failed Milvus call becomes a StoreError through
search_service.milvus_calls.milvus_call.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search_service.codec import decode_boxes, encode_boxes
from search_service.concept_codes import ConceptCodec
from search_service.deadlines import DeadlineBoundClient
from search_service.filters import BadFilter, check_filter_names, id_filter
from search_service.layout import IMAGES, MODALITIES, CodebookMismatch, CodecMismatch, Layout
from search_service.milvus_calls import StoreError, WriteFailed, is_not_loaded, milvus_call, refuses_data
from search_service.sparse import BOC, item_boc, surrogate
from teran_api.types import ModelRef


@dataclass
class Item:
    """One item to store; concepts float32/float16 [N, D]; boxes [N, 4] (images) or None."""

    id: str
    global_vector: np.ndarray
    concepts: np.ndarray
    metadata: dict
    labels: list[str] = field(default_factory=list)
    boxes: np.ndarray | None = None
    stamp: int = 0  # set by MilvusStore.upsert
    hub: float = 0.0  # hub statistic (teran.hubness), stored where the collections have the field


@dataclass
class Stored:
    id: str
    metadata: dict
    num_concepts: int
    labels: list[str]
    boxes: np.ndarray | None
    model: str
    global_vector: np.ndarray | None = None
    concepts: np.ndarray | None = None  # float16 [N, D]
    codes: np.ndarray | None = None  # collections that store codes, search results: ConceptFormat.codes
    score: float = 0.0  # first-stage score (search results)
    stamp: int = 0  # the row's version (0: collections without stamps)
    hub: float = 0.0  # the row's hub statistic (0: none stored)


class MilvusStore:
    """Blocking store (call it from worker threads). Thread-safe."""

    def __init__(
        self,
        uri: str,
        token: str = "",
        *,
        prefix: str = "teran",
        index_type: str = "auto",
        index_params: dict | None = None,
        search_params: dict | None = None,
        consistency_level: str = "Strong",
        max_concepts: int = 128,
        max_id_length: int = 512,
        flush_on_index: bool = False,
        timeout: float = 30.0,
        sparse_surrogates: list[str] | tuple[str, ...] = (),
        sparse_params: dict | None = None,
        boc_codebook: np.ndarray | None = None,
        concept_codec: ConceptCodec | None = None,
    ):
        self.uri = uri
        self.token = token
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
        self.index_type = "HNSW" if index_type == "auto" else index_type
        default_params = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}}
        self.index_params = dict(index_params or default_params.get(self.index_type, {}))
        self.search_params = dict(search_params or {})
        self.consistency_level = consistency_level
        self.flush_on_index = flush_on_index
        self.timeout = timeout
        self.layout = Layout(
            prefix,
            index_type=self.index_type,
            index_params=self.index_params,
            max_concepts=max_concepts,
            max_id_length=max_id_length,
            sparse_surrogates=sparse_surrogates,
            sparse_params=sparse_params,
            boc_codebook=boc_codebook,
            concept_codec=concept_codec,
        )
        self.client: Any = None  # pymilvus.MilvusClient once open()
        self.server_version = ""
        self._lock = threading.Lock()
        # milvus-lite 3.x applies concurrent writes to one collection without a lock: two at once
        # interleave in its write-ahead log, and a crash then loses everything after the damage.
        # One writer at a time per process (the lite file's LOCK already means one process).
        self._lite_write_lock = threading.Lock() if self.is_lite else contextlib.nullcontext()
        self._valid_filters: dict[str, None] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        from pymilvus import MilvusClient

        with milvus_call(f"cannot open Milvus at {self.safe_uri}", passing=(CodebookMismatch, CodecMismatch)):
            self.client = DeadlineBoundClient(MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout), self.timeout)
            self.server_version = str(self.client.get_server_version())
            self.layout.read_back(self.client, self.sparse_supported)

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            finally:
                self.client = None

    @property
    def safe_uri(self) -> str:
        return re.sub(r"//[^@/]*@", "//***@", self.uri)

    @property
    def backend(self) -> str:
        return "milvus-lite" if self.is_lite else "milvus"

    @property
    def sparse_supported(self) -> bool:
        if self.is_lite:
            return True  # milvus-lite 3.x stores SPARSE_FLOAT_VECTOR
        match = re.search(r"(\d+)\.(\d+)", self.server_version)
        return match is not None and (int(match.group(1)), int(match.group(2))) >= (2, 4)

    @property
    def dense_scores_exact(self) -> bool:
        """The dense first stage's scores are the exact cosines of the global vectors (indexes on raw vectors)."""
        return self.index_type in ("FLAT", "HNSW", "IVF_FLAT")

    # ------------------------------------------------------------------ the collections' layout (search_service.layout)

    def name(self, modality: str) -> str:
        return self.layout.name(modality)

    @property
    def model(self) -> ModelRef | None:
        """The collections' model; None while they do not exist (nothing indexed)."""
        return self.layout.model

    @property
    def known_model(self) -> ModelRef:
        return self.layout.known_model

    @property
    def codebook(self) -> np.ndarray | None:
        return self.layout.codebook

    @property
    def chunks(self) -> int:
        return self.layout.chunks

    @property
    def surrogates(self) -> list[str]:
        return self.layout.surrogates

    @property
    def sparse_params(self) -> dict:
        return self.layout.sparse_params

    @property
    def stamped(self) -> bool:
        return self.layout.stamped

    @property
    def hub_field(self) -> bool:
        return self.layout.hub_field

    @property
    def max_concepts(self) -> int:
        return self.layout.max_concepts

    @property
    def max_id_length(self) -> int:
        return self.layout.max_id_length

    def ensure(self, model: ModelRef) -> ModelRef:
        """Create the collections for `model` if there are none; else check the model matches."""
        with self._lock:
            if self.model is None:
                self.layout.create(self.client, model, self.sparse_supported)
        self.check_model(model)
        return self.known_model

    def check_model(self, model: ModelRef, *, what: str = "vectors") -> None:
        self.layout.check_model(model, what=what)

    # ------------------------------------------------------------------ writes

    def _row(self, item: Item, modality: str, concept_fields: list[str]) -> dict:
        return {
            "id": item.id,
            "global_vector": np.asarray(item.global_vector, dtype=np.float32).tolist(),
            **{f"concepts_{k}": part for k, part in enumerate(concept_fields)},
            "num_concepts": int(item.concepts.shape[0]),
            "labels": {"word_pieces": list(item.labels)},
            "boxes": encode_boxes(item.boxes),
            "metadata": item.metadata,
            "model": f"{self.known_model.name}@{self.known_model.version}",
            **({"stamp": item.stamp} if self.stamped else {}),
            **({"hub": float(item.hub)} if self.hub_field else {}),
            **{f"{k}_vector": surrogate(k, item.global_vector, self.sparse_params) for k in self.surrogates if k != BOC},
            **({"boc_vector": self._boc(item.concepts, modality == IMAGES)} if BOC in self.surrogates else {}),
        }

    def _boc(self, concepts: np.ndarray, image: bool) -> dict[int, float]:
        return item_boc(concepts, image, self.layout.known_codebook, self.sparse_params)

    def upsert(self, modality: str, items: list[Item], max_batch_bytes: int = 16 * 1024 * 1024) -> int:
        """Upsert; returns once Milvus has acknowledged every row (then a crash loses nothing)."""
        if not items:
            return 0
        for item in items:
            item.stamp = secrets.randbits(63)  # a new version, unique across replicas with overwhelming probability
        fields = self.layout.concepts.encode_many([item.concepts for item in items], self.chunks, modality == IMAGES)
        rows = [self._row(item, modality, concept_fields) for item, concept_fields in zip(items, fields, strict=True)]
        name = self.name(modality)
        stored = 0

        def failed(message: str, cause: Exception) -> WriteFailed:
            return WriteFailed(message, stored, refuses_data(cause))  # `stored`: the rows acknowledged when it failed

        with milvus_call(f"Milvus upsert into {name} failed", error=failed), self._lite_write_lock:
            batch: list[dict] = []
            size = 0
            for row in rows:
                row_bytes = sum(len(row[f"concepts_{k}"]) for k in range(self.chunks)) + 4 * len(row["global_vector"]) + 1024
                if batch and size + row_bytes > max_batch_bytes:
                    self.client.upsert(name, batch)
                    stored += len(batch)
                    batch, size = [], 0
                batch.append(row)
                size += row_bytes
            if batch:
                self.client.upsert(name, batch)
                stored += len(batch)
            if self.flush_on_index:
                self.client.flush(name)
        return len(rows)

    def delete(self, modality: str, ids: list[str]) -> tuple[int, list[str]]:
        if self.model is None:
            return 0, list(ids)
        name = self.name(modality)
        with milvus_call(f"Milvus delete from {name} failed"):
            existing = {r["id"] for r in self.client.query(name, filter=id_filter(ids), output_fields=["id"], consistency_level="Strong")}
            present = [i for i in ids if i in existing]
            if present:
                with self._lite_write_lock:
                    self.client.delete(name, filter=id_filter(present))
                    if self.flush_on_index:
                        self.client.flush(name)
        return len(present), [i for i in ids if i not in existing]

    # ------------------------------------------------------------------ reads

    def _read(self) -> dict:
        return {"consistency_level": self.consistency_level}

    def _reading(self, name: str, what: str, call: Callable[[], Any]) -> Any:
        """`call()`, a read of collection `name`; after a Milvus restart the collections are released
        ("collection not loaded"): load it again and retry once, so reads recover by themselves."""
        failure = f"Milvus {what} on {name} failed"
        with milvus_call(failure):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001
                if not is_not_loaded(exc):
                    raise
        with milvus_call(f"{failure} after loading it again"):
            self.client.load_collection(name)
            return call()

    def ping(self) -> None:
        """Raise StoreError unless Milvus answers (readiness)."""
        with milvus_call(f"Milvus at {self.safe_uri} does not answer"):
            self.client.get_server_version(timeout=min(self.timeout, 5.0))

    def reload(self) -> None:
        """Load the collections into memory again (Milvus releases them when it restarts)."""
        names = [self.name(m) for m in MODALITIES] + [self.layout.meta_name]
        with milvus_call(f"cannot load the collections in Milvus at {self.safe_uri}"):
            for name in names:
                if self.client.has_collection(name):
                    self.client.load_collection(name)

    def dense_search_params(self, limit: int) -> dict:
        """The dense first stage's index parameters for `limit` candidates (HNSW searches at least `limit` deep)."""
        params = dict(self.search_params)
        if self.index_type == "HNSW":
            params["ef"] = max(int(params.get("ef", 64)), limit)
        return params

    def _fields(self, concepts: bool, global_vector: bool) -> list[str]:
        names = ["id", "num_concepts", "labels", "boxes", "metadata", "model"] + (["stamp"] if self.stamped else [])
        names += ["hub"] if self.hub_field else []
        if concepts:
            names += [f"concepts_{k}" for k in range(self.chunks)]
        if global_vector:
            names.append("global_vector")
        return names

    def _stored(self, row: dict, image: bool, vectors: bool, as_codes: bool = False) -> Stored:
        """`vectors`: with the concepts, decoded; or with `as_codes`, as their codes where the collections store codes."""
        count = int(row["num_concepts"])
        item = Stored(
            id=row["id"],
            metadata=row.get("metadata") or {},
            num_concepts=count,
            labels=list((row.get("labels") or {}).get("word_pieces", [])),
            boxes=decode_boxes(row.get("boxes") or "", count),
            model=row.get("model", ""),
            stamp=int(row.get("stamp") or 0),
            hub=float(row.get("hub") or 0.0),
        )
        if "global_vector" in row:
            item.global_vector = np.asarray(row["global_vector"], dtype=np.float32)
        if vectors and as_codes and self.layout.codec is not None:
            item.codes = self.layout.concepts.codes([row[f"concepts_{k}"] for k in range(self.chunks)], count, image)
        elif vectors:
            item.concepts = self._concepts(row, image)
        return item

    def get(self, modality: str, ids: list[str], vectors: bool = False) -> dict[str, Stored]:
        if self.model is None or not ids:
            return {}
        name = self.name(modality)
        fields = self._fields(vectors, vectors)
        rows = self._reading(name, "query", lambda: self.client.query(name, filter=id_filter(ids), output_fields=fields, **self._read()))
        return {row["id"]: self._stored(row, modality == IMAGES, vectors) for row in rows}

    def concepts(self, modality: str, ids: list[str]) -> dict[str, Stored]:
        """The rows still stored among `ids`, with concepts (no global vector): the re-rank cache's misses."""
        if self.model is None or not ids:
            return {}
        name = self.name(modality)
        fields = self._fields(True, False)
        rows = self._reading(name, "query", lambda: self.client.query(name, filter=id_filter(ids), output_fields=fields, **self._read()))
        return {row["id"]: self._stored(row, modality == IMAGES, True) for row in rows}

    def _concepts(self, row: dict, image: bool) -> np.ndarray:
        """A row's concept vectors, float16 [N, D]."""
        parts = [row[f"concepts_{k}"] for k in range(self.chunks)]
        return self.layout.concepts.decode(parts, int(row["num_concepts"]), self.known_model.dimension, image)

    def scan(self, modality: str, concepts: bool, batch_size: int = 0, batch_bytes: int = 16 * 2**20):
        """Every stored row, in batches (pymilvus query iterator): lists of (id, stamp, concepts float16 [N, D] or None).
        batch_size 0: sized to about `batch_bytes` per batch from a sample of rows (each iterator call costs ~0.2 s on
        Milvus 2.3, so 256-row batches of small items would take 13 min per million rows)."""
        if self.model is None:
            return
        name = self.name(modality)
        fields = ["id", *(["stamp"] if self.stamped else [])]
        if concepts:
            fields += ["num_concepts", *[f"concepts_{k}" for k in range(self.chunks)]]
        if not batch_size:
            batch_size = 16384
            if concepts:
                with milvus_call(f"Milvus query on {name} failed"):
                    sample = self.client.query(name, filter="", output_fields=fields, limit=64, **self._read())
                if sample:
                    row_bytes = sum(len(r[f"concepts_{k}"]) for r in sample for k in range(self.chunks)) / len(sample) + 256
                    batch_size = int(min(16384, max(64, batch_bytes // row_bytes)))
        failure = f"Milvus query iterator on {name} failed"
        with milvus_call(failure):
            iterator = self.client.query_iterator(name, batch_size=batch_size, filter="", output_fields=fields, **self._read())
        try:
            while True:
                with milvus_call(failure):
                    rows = iterator.next()
                if not rows:
                    return
                image = modality == IMAGES
                yield [(row["id"], int(row.get("stamp") or 0), self._concepts(row, image) if concepts else None) for row in rows]
        finally:
            iterator.close()

    def count(self, modality: str) -> int:
        if self.model is None:
            return 0
        name = self.name(modality)
        rows = self._reading(name, "count", lambda: self.client.query(name, filter="", output_fields=["count(*)"], **self._read()))
        return int(rows[0]["count(*)"])

    def validate_filter(self, expr: str) -> None:
        """Raise BadFilter unless Milvus accepts `expr` (checked once per expression, then cached)."""
        check_filter_names(expr)
        if expr in self._valid_filters:
            return
        from pymilvus.exceptions import MilvusException, MilvusUnavailableException

        # Tried as a search on PREFIX_filter_check (id and metadata as in the data collections, never written;
        # created and loaded, again after a Milvus restart, by _filter_check_collection): a search parses its
        # filter always, where milvus-lite parses a query's only over rows, so a query on an empty or emptied
        # collection would let e.g. `id in ["a", 1]` through to fail later as a backend error.
        check = self._filter_check_collection()
        try:
            self.client.search(check, data=[[0.0, 0.0]], anns_field="v", limit=1, filter=expr, search_params={"metric_type": "L2"})
        except MilvusUnavailableException as exc:
            raise StoreError(f"Milvus unavailable: {exc}") from exc
        except MilvusException as exc:
            raise BadFilter(getattr(exc, "message", None) or str(exc)) from None
        if len(self._valid_filters) > 4096:
            self._valid_filters.clear()
        self._valid_filters[expr] = None

    def _filter_check_collection(self) -> str:
        """PREFIX_filter_check (see Layout.create_filter_check), where filters are tried while no data collection exists."""
        name = self.layout.filter_check_name
        with self._lock, milvus_call(f"cannot prepare {name} to check the filter"):
            self.layout.create_filter_check(self.client)
        return name

    def search(
        self,
        modality: str,
        vector: np.ndarray,
        limit: int,
        expr: str = "",
        first_stage: str = "dense",
        concepts: bool = True,
        query_concepts: np.ndarray | None = None,
        global_vectors: bool = False,
    ) -> list[Stored]:
        """First stage: the `limit` best by inner product (dense global vector, a sparse surrogate of it, or the BoC of the
        query's concept vectors `query_concepts`: pooled as the other modality's, i.e. as a caption when searching images).
        `concepts` / `global_vectors`: also return the hits' concept / global vectors."""
        if self.model is None:
            return []
        if first_stage == "dense":
            params = self.dense_search_params(limit)
            data, field = [np.asarray(vector, dtype=np.float32).tolist()], "global_vector"
        elif first_stage == BOC:
            if self.codebook is None:
                raise ValueError("the collections have no BoC codebook")
            if query_concepts is None:
                raise ValueError("a BAG_OF_CONCEPTS search needs the query's concept vectors")
            params = {}
            data, field = [self._boc(query_concepts, modality != IMAGES)], "boc_vector"
        else:
            params = {}
            data, field = [surrogate(first_stage, vector, self.sparse_params)], f"{first_stage}_vector"
        name = self.name(modality)
        fields = self._fields(concepts, global_vectors)
        result = self._reading(
            name,
            "search",
            lambda: self.client.search(
                name,
                data=data,
                anns_field=field,
                limit=limit,
                filter=expr,
                output_fields=fields,
                search_params={"metric_type": "IP", "params": params},
                **self._read(),
            ),
        )
        hits = []
        for hit in result[0]:
            entity = dict(hit["entity"])
            entity.setdefault("id", hit["id"])
            stored = self._stored(entity, modality == IMAGES, concepts, as_codes=True)
            stored.score = float(hit["distance"])
            hits.append(stored)
        return hits
