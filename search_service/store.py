"""Milvus storage of indexed items (the one system of record), through pymilvus.MilvusClient.

Two collections, PREFIX_images and PREFIX_captions, same schema:

    id              VARCHAR primary key (caller's id)
    global_vector   FLOAT_VECTOR[D]            dense first stage (metric IP = cosine on unit vectors)
    concepts_0..K-1 VARCHAR(65535)             concept vectors [N, D] as little-endian fp16 bytes, base64,
                                               split over K fields (K fixed by D and max_concepts)
    num_concepts    INT64                      N
    labels          JSON                       {"word_pieces": [...]}: the N word pieces (captions); [] for images
    boxes           VARCHAR                    images: [N, 4] float32 normalised boxes, base64; captions: ""
    metadata        JSON                       the caller's metadata object
    model           VARCHAR                    "name@version" of the model that produced the vectors
    stamp           INT64                      random 63-bit version, new at every write (re-rank cache validation;
                                               collections of schema format 1, before the cache, have none)
    hub             FLOAT                      the item's hub statistic r(x) for the ranking's hub penalty
                                               (teran.hubness; 0 when indexed without the model's reference;
                                               collections of schema formats 1-2 have none)
    {sq,dp}_vector  SPARSE_FLOAT_VECTOR        surrogates of the global vector (--sparse-surrogates, sparse backends)
    boc_vector      SPARSE_FLOAT_VECTOR        Bag of Concepts of the concept vectors (--boc-codebook, sparse backends)

PREFIX_filter_check (id, metadata, a 2-d vector; never written) is where filters are tried while no data
collection exists yet.

The BoC codebook is stored with the collections in PREFIX_meta: rows `boc_codebook_0..P-1` (JSON
{"data": base64 of the unit float32 [K, D] bytes, split in parts of BOC_PART_CHARS}) written before the
`collections` row, which records its shape and sha256 (`boc`); every replica reads it back from there.

The collection description (JSON) records the model (name, version, dimension), the concept
encoding and K, so a restarted service, or another replica, reads them back from Milvus.
Why VARCHAR/base64 fp16: milvus-lite 3.x has no BINARY_VECTOR or FLOAT16_VECTOR field, Milvus 2.3
no FLOAT16_VECTOR, and neither has array-of-vector fields (native MaxSim needs Milvus >= 2.6.4);
VARCHAR is portable everywhere, fp16 halves the bytes of fp32 (D=256, 49 regions: 25 KB raw,
33 KB stored), and the rounding (relative 2^-11 per component) leaves MrSw orderings intact.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search_service.deadlines import DeadlineBoundClient
from search_service.sparse import BOC, BOC_DEFAULTS, check_codebook, codebook_digest, item_boc, surrogate
from search_service.sparse import KINDS as SPARSE_KINDS

IMAGES, CAPTIONS = "images", "captions"
MODALITIES = (IMAGES, CAPTIONS)
CHUNK_CHARS = 65535  # Milvus VARCHAR max_length
CONCEPT_ENCODING = "fp16-le-base64-varchar"
SCHEMA_FORMAT = 3  # 2: rows carry `stamp`; 3: and `hub`
ID_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')
BOC_PART_CHARS = 32768  # base64 characters per codebook row in PREFIX_meta (well below Milvus's JSON limit)


class StoreError(Exception):
    """Milvus failed or cannot be reached (UNAVAILABLE; the caller may retry)."""


class WriteFailed(StoreError):
    """An upsert failed after `stored` of its rows (the first ones, in order) were acknowledged.
    `permanent`: Milvus refused the data itself (retrying the same rows fails the same way)."""

    def __init__(self, message: str, stored: int, permanent: bool):
        super().__init__(message)
        self.stored = stored
        self.permanent = permanent


class ModelMismatch(Exception):
    """Vectors from a model other than the collections' (FAILED_PRECONDITION)."""


class CodebookMismatch(ModelMismatch):
    """A BoC codebook other than the collections' (FAILED_PRECONDITION; at startup: the service does not start)."""


class BadFilter(ValueError):
    """The filter expression is invalid (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    dimension: int

    def describe(self) -> str:
        return f"{self.name} v{self.version} (dimension {self.dimension})"


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
    score: float = 0.0  # first-stage score (search results)
    stamp: int = 0  # the row's version (0: collections without stamps)
    hub: float = 0.0  # the row's hub statistic (0: none stored)


def encode_concepts(concepts: np.ndarray, chunks: int) -> list[str]:
    text = base64.b64encode(np.ascontiguousarray(concepts, dtype="<f2").tobytes()).decode("ascii")
    parts = [text[i * CHUNK_CHARS : (i + 1) * CHUNK_CHARS] for i in range(chunks)]
    if sum(map(len, parts)) != len(text):
        raise ValueError("concept vectors do not fit the collection's concept fields")
    return parts


def decode_concepts(parts: list[str], count: int, dim: int) -> np.ndarray:
    raw = base64.b64decode("".join(parts))
    return np.frombuffer(raw, dtype="<f2").reshape(count, dim)


def encode_boxes(boxes: np.ndarray | None) -> str:
    if boxes is None:
        return ""
    return base64.b64encode(np.ascontiguousarray(boxes, dtype="<f4").tobytes()).decode("ascii")


def decode_boxes(text: str, count: int) -> np.ndarray | None:
    if not text:
        return None
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(count, 4)


def concept_chunks(dimension: int, max_concepts: int) -> int:
    return max(1, math.ceil(4 * math.ceil(max_concepts * dimension * 2 / 3) / CHUNK_CHARS))


def _not_loaded(exc: Exception) -> bool:
    """Milvus says the collection is not in memory (error code 101: released, e.g. after a restart)."""
    return getattr(exc, "code", None) == 101 or "not loaded" in str(exc).lower()


def id_filter(ids: list[str]) -> str:
    return "id in [" + ", ".join(f'"{i}"' for i in ids) + "]"


# Filters may use only these names outside string literals (case-insensitive).
FILTER_NAMES = {
    "metadata", "id", "and", "or", "not", "in", "like", "true", "false", "is", "null", "exists",
    "json_contains", "json_contains_all", "json_contains_any", "array_contains", "array_contains_all",
    "array_contains_any", "array_length",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_filter_names(expr: str) -> None:
    bare = _STRING.sub(" ", expr)
    if '"' in bare or "'" in bare:
        raise BadFilter("unterminated string literal")
    for name in _NAME.findall(bare):
        if name.lower() not in FILTER_NAMES:
            raise BadFilter(f'unknown name {name!r}: a filter may use metadata["key"], id, operators and json_contains*/array_* functions')


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
    ):
        self.uri = uri
        self.token = token
        self.prefix = prefix
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix:"))
        self.index_type = "HNSW" if index_type == "auto" else index_type
        default_params = {"HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}}
        self.index_params = dict(index_params or default_params.get(self.index_type, {}))
        self.search_params = dict(search_params or {})
        self.consistency_level = consistency_level
        self.max_concepts = max_concepts
        self.max_id_length = max_id_length
        self.flush_on_index = flush_on_index
        self.timeout = timeout
        self.requested_surrogates = list(sparse_surrogates)
        self.surrogates: list[str] = []  # those the collections have
        self.sparse_params = {"sq_scale": 30.0, "dp_keep": 64, **BOC_DEFAULTS, **(sparse_params or {})}
        # BoC: the codebook given at start (None: none given); `codebook` is the collections' (None: no boc_vector)
        self.requested_codebook = None if boc_codebook is None else check_codebook(boc_codebook, "--boc-codebook")
        if self.requested_codebook is not None and BOC not in self.requested_surrogates:
            self.requested_surrogates.append(BOC)
        self.codebook: np.ndarray | None = None
        self.client: Any = None  # pymilvus.MilvusClient once open()
        self.server_version = ""
        self.model: ModelInfo | None = None
        self.chunks = 0
        self.stamped = True  # rows carry `stamp` (False for collections created before schema format 2)
        self.hub_field = True  # rows carry `hub` (False for collections created before schema format 3)
        self._lock = threading.Lock()
        # milvus-lite 3.x applies concurrent writes to one collection without a lock: two at once
        # interleave in its write-ahead log, and a crash then loses everything after the damage.
        # One writer at a time per process (the lite file's LOCK already means one process).
        self._lite_write_lock = threading.Lock() if self.is_lite else contextlib.nullcontext()
        self._valid_filters: dict[str, None] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        from pymilvus import MilvusClient

        try:
            self.client = DeadlineBoundClient(MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout), self.timeout)
            self.server_version = str(self.client.get_server_version())
            self._load_existing()
        except CodebookMismatch:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reach Milvus
            raise StoreError(f"cannot open Milvus at {self.safe_uri}: {exc}") from exc

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

    def name(self, modality: str) -> str:
        return f"{self.prefix}_{modality}"

    @property
    def known_model(self) -> ModelInfo:
        """The collections' model, where they are known to exist (`model` is None before the first Index)."""
        if self.model is None:
            raise StoreError("the collections do not exist yet (nothing indexed)")
        return self.model

    @property
    def known_codebook(self) -> np.ndarray:
        """The BoC codebook, where BoC is known to be on (`codebook` is None without it)."""
        if self.codebook is None:
            raise StoreError("the collections have no BoC codebook")
        return self.codebook

    def _info(self, model: ModelInfo | None = None) -> dict:
        m = model or self.known_model
        return {
            "format": SCHEMA_FORMAT,
            "model": {"name": m.name, "version": m.version, "dimension": m.dimension},
            "concept_encoding": CONCEPT_ENCODING,
            "concept_chunks": self.chunks,
            "max_concepts": self.max_concepts,
            "max_id_length": self.max_id_length,
            "sparse": self.surrogates,
            "sparse_params": self.sparse_params,
            "row_stamp": self.stamped,
            "row_hub": self.hub_field,
            **({"boc": self._boc_info()} if self.codebook is not None else {}),
        }

    def _boc_info(self) -> dict:
        codebook = self.known_codebook
        size, dim = codebook.shape
        parts = math.ceil(4 * math.ceil(size * dim * 4 / 3) / BOC_PART_CHARS)
        return {"codewords": size, "dimension": dim, "sha256": codebook_digest(codebook), "parts": parts}

    def _write_codebook(self) -> None:
        text = base64.b64encode(np.ascontiguousarray(self.codebook, dtype="<f4").tobytes()).decode("ascii")
        rows = [
            {"id": f"boc_codebook_{i}", "info": {"data": text[start : start + BOC_PART_CHARS]}, "v": [0.0, 0.0]}
            for i, start in enumerate(range(0, len(text), BOC_PART_CHARS))
        ]
        for start in range(0, len(rows), 16):
            self.client.upsert(self.meta_name, rows[start : start + 16])

    def _read_codebook(self, boc: dict) -> np.ndarray:
        ids = [f"boc_codebook_{i}" for i in range(int(boc["parts"]))]
        rows = self.client.query(self.meta_name, filter=id_filter(ids), output_fields=["id", "info"], consistency_level="Strong")
        parts = {r["id"]: r["info"]["data"] for r in rows}
        if len(parts) != len(ids):
            raise StoreError(f"{self.meta_name}: the BoC codebook is incomplete ({len(parts)} of {len(ids)} parts)")
        raw = base64.b64decode("".join(parts[i] for i in ids))
        codebook = np.frombuffer(raw, dtype="<f4").reshape(int(boc["codewords"]), int(boc["dimension"])).copy()
        if codebook_digest(codebook) != boc["sha256"]:
            raise StoreError(f"{self.meta_name}: the stored BoC codebook does not match its sha256")
        return codebook

    def _check_requested_codebook(self) -> None:
        """Existing collections: a codebook given at start must be theirs (they were encoded with it)."""
        given = self.requested_codebook
        if given is None:
            return
        names = f"{self.name(IMAGES)}/{self.name(CAPTIONS)}"
        if self.codebook is None:
            if not self.sparse_supported:
                return  # like sq/dp: no sparse fields on this backend, the codebook is unused
            raise CodebookMismatch(
                f"--boc-codebook was given, but the existing collections {names} were created without a BoC codebook "
                "(no boc_vector field): drop --boc-codebook, or index into new collections (--collection-prefix)"
            )
        if given.shape != self.codebook.shape or codebook_digest(given) != codebook_digest(self.codebook):
            raise CodebookMismatch(
                f"--boc-codebook ({given.shape[0]} codewords x {given.shape[1]}, sha256 {codebook_digest(given)[:12]}) differs from "
                f"the codebook stored with the collections {names} ({self.codebook.shape[0]} x {self.codebook.shape[1]}, sha256 "
                f"{codebook_digest(self.codebook)[:12]}): their boc_vector fields were encoded with the stored one. Drop "
                "--boc-codebook (the stored codebook is used), or index into new collections (--collection-prefix)"
            )

    def _load_existing(self) -> None:
        """Read the collections' model and layout back from PREFIX_meta (milvus-lite keeps no collection descriptions)."""
        info = None
        if self.client.has_collection(self.meta_name):
            self.client.load_collection(self.meta_name)
            rows = self.client.query(self.meta_name, filter='id == "collections"', output_fields=["info"], consistency_level="Strong")
            info = rows[0]["info"] if rows else None
        existing = [m for m in MODALITIES if self.client.has_collection(self.name(m))]
        if info is None:
            if not existing:
                return
            info = self._recover_info(existing)
            if info is None:
                return
            if "boc" in info:  # the codebook rows may be missing too: rewrite them (the given codebook)
                self.codebook = info["boc"]["codebook"]
                self._create_meta()
                self._write_codebook()
        model = info["model"]
        self.model = ModelInfo(str(model["name"]), int(model["version"]), int(model["dimension"]))
        self.chunks = int(info["concept_chunks"])
        self.max_concepts = int(info["max_concepts"])
        self.max_id_length = int(info.get("max_id_length", self.max_id_length))
        self.surrogates = list(info.get("sparse", []))
        self.sparse_params = dict(info.get("sparse_params", self.sparse_params))
        self.stamped = bool(info.get("row_stamp", False))
        self.hub_field = bool(info.get("row_hub", False))
        if BOC in self.surrogates:
            self.codebook = info["boc"]["codebook"] if "codebook" in info.get("boc", {}) else self._read_codebook(info["boc"])
        self._check_requested_codebook()
        for modality in existing:
            self.client.load_collection(self.name(modality))
        self._create_missing()

    def _recover_info(self, existing: list[str]) -> dict | None:
        """PREFIX_meta is missing (a crash while creating): derive the layout from the schema and a row's model,
        or drop the data collections if they are empty (nothing was acknowledged into them)."""
        for modality in existing:
            self.client.load_collection(self.name(modality))
            rows = self.client.query(self.name(modality), filter='id != ""', output_fields=["model"], limit=1, consistency_level="Strong")
            if rows:
                fields = {f["name"]: f for f in self.client.describe_collection(self.name(modality))["fields"]}
                name, _, version = rows[0]["model"].rpartition("@")
                return {
                    "model": {"name": name, "version": int(version or 0), "dimension": int(fields["global_vector"]["params"]["dim"])},
                    "concept_chunks": sum(1 for f in fields if f.startswith("concepts_")),
                    "max_concepts": self.max_concepts,
                    "max_id_length": int(fields["id"]["params"]["max_length"]),
                    "sparse": [k for k in (*SPARSE_KINDS, BOC) if f"{k}_vector" in fields],
                    "row_stamp": "stamp" in fields,
                    "row_hub": "hub" in fields,
                    **self._recover_boc(fields),
                }
        for modality in existing:
            self.client.drop_collection(self.name(modality))
        return None

    def _recover_boc(self, fields: dict) -> dict:
        """PREFIX_meta lost its `collections` row: the codebook rows (written before the collections) if there, else the
        given one (checked against the rows' later, as on any reopen)."""
        if "boc_vector" not in fields:
            return {}
        dim = int(fields["global_vector"]["params"]["dim"])
        if self.client.has_collection(self.meta_name):
            self.client.load_collection(self.meta_name)
            rows = self.client.query(
                self.meta_name, filter='id like "boc_codebook_%"', output_fields=["id", "info"], consistency_level="Strong"
            )
            text = "".join(r["info"]["data"] for r in sorted(rows, key=lambda r: int(r["id"].rsplit("_", 1)[1])))
            raw = base64.b64decode(text)
            if raw and len(raw) % (4 * dim) == 0:
                return {"boc": {"codebook": np.frombuffer(raw, dtype="<f4").reshape(-1, dim).copy()}}
        if self.requested_codebook is None:
            raise StoreError(
                f"{self.meta_name} lost the layout of collections with a boc_vector field: restart once with the "
                "--boc-codebook they were created with"
            )
        return {"boc": {"codebook": self.requested_codebook}}

    @property
    def dense_scores_exact(self) -> bool:
        """The dense first stage's scores are the exact cosines of the global vectors (indexes on raw vectors)."""
        return self.index_type in ("FLAT", "HNSW", "IVF_FLAT")

    @property
    def meta_name(self) -> str:
        return f"{self.prefix}_meta"

    def ensure(self, model: ModelInfo) -> ModelInfo:
        """Create the collections for `model` if there are none; else check the model matches."""
        with self._lock:
            if self.model is None:
                self.chunks = concept_chunks(model.dimension, self.max_concepts)
                self.surrogates = list(self.requested_surrogates) if self.sparse_supported else []
                self.codebook = self.requested_codebook if BOC in self.surrogates else None
                if self.codebook is not None and self.codebook.shape[1] != model.dimension:
                    given = self.codebook.shape[1]
                    self.surrogates, self.codebook = [], None
                    raise CodebookMismatch(
                        f"--boc-codebook has dimension {given}, but the vectors ({model.describe()}) "
                        f"have dimension {model.dimension}: build the codebook from this model's concept vectors "
                        "(python -m search_service.codebook)"
                    )
                self.stamped = self.hub_field = True
                try:
                    self._create_missing(model)
                except Exception as exc:  # noqa: BLE001
                    raise StoreError(f"cannot create collections: {exc}") from exc
                # Published only once the collections exist: writers test `model is None` without the lock.
                self.model = model
        self.check_model(model)
        return self.model

    def check_model(self, model: ModelInfo, *, what: str = "vectors") -> None:
        current = self.model
        if current is None:
            return
        if model.dimension != current.dimension:
            raise ModelMismatch(
                f"{what} have dimension {model.dimension} ({model.name} v{model.version}), but the collections "
                f"{self.name(IMAGES)}/{self.name(CAPTIONS)} hold {current.describe()} vectors: use the same model, "
                "or index into new collections (--collection-prefix)"
            )
        if (model.name, model.version) != (current.name, current.version):
            raise ModelMismatch(
                f"{what} come from model {model.describe()}, but the collections hold {current.describe()} vectors "
                "(vectors of different models are not comparable): use the same model, or new collections (--collection-prefix)"
            )

    def _create_missing(self, model: ModelInfo | None = None) -> None:
        from pymilvus import DataType, MilvusClient

        m = model or self.known_model
        if self.codebook is not None and model is not None:  # new collections: the codebook first (recovery reads it)
            self._create_meta()
            self._write_codebook()
        for modality in MODALITIES:
            name = self.name(modality)
            if self.client.has_collection(name):
                continue
            description = json.dumps({**self._info(m), "modality": modality})
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=self.max_id_length)
            schema.add_field("global_vector", DataType.FLOAT_VECTOR, dim=m.dimension)
            for k in range(self.chunks):
                schema.add_field(f"concepts_{k}", DataType.VARCHAR, max_length=CHUNK_CHARS)
            schema.add_field("num_concepts", DataType.INT64)
            schema.add_field("labels", DataType.JSON)
            schema.add_field("boxes", DataType.VARCHAR, max_length=CHUNK_CHARS)
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("model", DataType.VARCHAR, max_length=512)
            if self.stamped:
                schema.add_field("stamp", DataType.INT64)
            if self.hub_field:
                schema.add_field("hub", DataType.FLOAT)
            for kind in self.surrogates:
                schema.add_field(f"{kind}_vector", DataType.SPARSE_FLOAT_VECTOR)
            index = self.client.prepare_index_params()
            index.add_index(field_name="global_vector", index_type=self.index_type, metric_type="IP", params=self.index_params)
            for kind in self.surrogates:
                index.add_index(field_name=f"{kind}_vector", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
            self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
            self.client.load_collection(name)
        self._create_meta()
        self.client.upsert(self.meta_name, [{"id": "collections", "info": self._info(m), "v": [0.0, 0.0]}])

    def _create_meta(self) -> None:
        from pymilvus import DataType, MilvusClient

        if not self.client.has_collection(self.meta_name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description="teran search service layout")
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("info", DataType.JSON)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
            index = self.client.prepare_index_params()
            index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self.meta_name, schema=schema, index_params=index, consistency_level="Strong")
            self.client.load_collection(self.meta_name)

    # ------------------------------------------------------------------ writes

    def _row(self, item: Item, modality: str) -> dict:
        return {
            "id": item.id,
            "global_vector": np.asarray(item.global_vector, dtype=np.float32).tolist(),
            **{f"concepts_{k}": part for k, part in enumerate(encode_concepts(item.concepts, self.chunks))},
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
        return item_boc(concepts, image, self.known_codebook, self.sparse_params)

    def upsert(self, modality: str, items: list[Item], max_batch_bytes: int = 16 * 1024 * 1024) -> int:
        """Upsert; returns once Milvus has acknowledged every row (then a crash loses nothing)."""
        if not items:
            return 0
        for item in items:
            item.stamp = secrets.randbits(63)  # a new version, unique across replicas with overwhelming probability
        rows = [self._row(item, modality) for item in items]
        name = self.name(modality)
        stored = 0
        try:
            with self._lite_write_lock:
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
        except Exception as exc:  # noqa: BLE001
            from pymilvus.exceptions import DataNotMatchException, DataTypeNotMatchException, ParamError

            # Milvus refused the rows themselves (e.g. a value its schema cannot hold): the same rows fail again.
            permanent = isinstance(exc, DataNotMatchException | DataTypeNotMatchException | ParamError)
            raise WriteFailed(f"Milvus upsert into {name} failed: {exc}", stored, permanent) from exc
        return len(rows)

    def delete(self, modality: str, ids: list[str]) -> tuple[int, list[str]]:
        if self.model is None:
            return 0, list(ids)
        name = self.name(modality)
        try:
            existing = {r["id"] for r in self.client.query(name, filter=id_filter(ids), output_fields=["id"], consistency_level="Strong")}
            present = [i for i in ids if i in existing]
            if present:
                with self._lite_write_lock:
                    self.client.delete(name, filter=id_filter(present))
                    if self.flush_on_index:
                        self.client.flush(name)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"Milvus delete from {name} failed: {exc}") from exc
        return len(present), [i for i in ids if i not in existing]

    # ------------------------------------------------------------------ reads

    def _read(self) -> dict:
        return {"consistency_level": self.consistency_level}

    def _reading(self, name: str, what: str, call):
        """`call()`, a read of collection `name`; after a Milvus restart the collections are released
        ("collection not loaded"): load it again and retry once, so reads recover by themselves."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            if not _not_loaded(exc):
                raise StoreError(f"Milvus {what} on {name} failed: {exc}") from exc
        try:
            self.client.load_collection(name)
            return call()
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"Milvus {what} on {name} failed after loading it again: {exc}") from exc

    def ping(self) -> None:
        """Raise StoreError unless Milvus answers (readiness)."""
        try:
            self.client.get_server_version(timeout=min(self.timeout, 5.0))
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"Milvus at {self.safe_uri} does not answer: {exc}") from exc

    def reload(self) -> None:
        """Load the collections into memory again (Milvus releases them when it restarts)."""
        names = [self.name(m) for m in MODALITIES] + [self.meta_name]
        try:
            for name in names:
                if self.client.has_collection(name):
                    self.client.load_collection(name)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot load the collections in Milvus at {self.safe_uri}: {exc}") from exc

    def _fields(self, concepts: bool, global_vector: bool) -> list[str]:
        names = ["id", "num_concepts", "labels", "boxes", "metadata", "model"] + (["stamp"] if self.stamped else [])
        names += ["hub"] if self.hub_field else []
        if concepts:
            names += [f"concepts_{k}" for k in range(self.chunks)]
        if global_vector:
            names.append("global_vector")
        return names

    def _stored(self, row: dict, vectors: bool) -> Stored:
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
        if vectors:
            item.concepts = decode_concepts([row[f"concepts_{k}"] for k in range(self.chunks)], count, self.known_model.dimension)
        return item

    def get(self, modality: str, ids: list[str], vectors: bool = False) -> dict[str, Stored]:
        if self.model is None or not ids:
            return {}
        name = self.name(modality)
        fields = self._fields(vectors, vectors)
        rows = self._reading(name, "query", lambda: self.client.query(name, filter=id_filter(ids), output_fields=fields, **self._read()))
        return {row["id"]: self._stored(row, vectors) for row in rows}

    def concepts(self, modality: str, ids: list[str]) -> dict[str, Stored]:
        """The rows still stored among `ids`, with concepts (no global vector): the re-rank cache's misses."""
        if self.model is None or not ids:
            return {}
        name = self.name(modality)
        fields = self._fields(True, False)
        rows = self._reading(name, "query", lambda: self.client.query(name, filter=id_filter(ids), output_fields=fields, **self._read()))
        return {row["id"]: self._stored(row, True) for row in rows}

    def _concepts(self, row: dict) -> np.ndarray:
        return decode_concepts([row[f"concepts_{k}"] for k in range(self.chunks)], int(row["num_concepts"]), self.known_model.dimension)

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
                try:
                    sample = self.client.query(name, filter="", output_fields=fields, limit=64, **self._read())
                except Exception as exc:  # noqa: BLE001
                    raise StoreError(f"Milvus query on {name} failed: {exc}") from exc
                if sample:
                    row_bytes = sum(len(r[f"concepts_{k}"]) for r in sample for k in range(self.chunks)) / len(sample) + 256
                    batch_size = int(min(16384, max(64, batch_bytes // row_bytes)))
        try:
            iterator = self.client.query_iterator(name, batch_size=batch_size, filter="", output_fields=fields, **self._read())
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"Milvus query iterator on {name} failed: {exc}") from exc
        try:
            while True:
                try:
                    rows = iterator.next()
                except Exception as exc:  # noqa: BLE001
                    raise StoreError(f"Milvus query iterator on {name} failed: {exc}") from exc
                if not rows:
                    return
                yield [(row["id"], int(row.get("stamp") or 0), self._concepts(row) if concepts else None) for row in rows]
        finally:
            iterator.close()

    def count(self, modality: str) -> int:
        if self.model is None:
            return 0
        name = self.name(modality)
        rows = self._reading(name, "count", lambda: self.client.query(name, filter="", output_fields=["count(*)"], **self._read()))
        return int(rows[0]["count(*)"])

    def validate_filter(self, modality: str, expr: str) -> None:
        """Raise BadFilter unless Milvus accepts `expr` (checked once per expression, then cached)."""
        check_filter_names(expr)
        if expr in self._valid_filters:
            return
        from pymilvus.exceptions import MilvusException, MilvusUnavailableException

        # Before the first item there is no collection to try it on: an empty one with the same filterable fields.
        name = self.name(modality) if self.model is not None else self._filter_check_collection()

        def dry_run() -> None:
            self.client.query(name, filter=expr, output_fields=["id"], limit=1, consistency_level="Eventually")

        try:
            try:
                dry_run()
            except MilvusException as exc:
                if isinstance(exc, MilvusUnavailableException) or not _not_loaded(exc):
                    raise
                self._reading(name, "load", lambda: self.client.load_collection(name))  # a restarted Milvus: load, check again
                dry_run()
        except MilvusUnavailableException as exc:
            raise StoreError(f"Milvus unavailable: {exc}") from exc
        except MilvusException as exc:
            raise BadFilter(getattr(exc, "message", None) or str(exc)) from None
        if len(self._valid_filters) > 4096:
            self._valid_filters.clear()
        self._valid_filters[expr] = None

    def _filter_check_collection(self) -> str:
        """PREFIX_filter_check: id and metadata as in the data collections, never written; filters are tried on it
        while no data collection exists (so a malformed filter is refused then too)."""
        from pymilvus import DataType, MilvusClient

        name = f"{self.prefix}_filter_check"
        with self._lock:
            try:
                if not self.client.has_collection(name):
                    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description="filter checks")
                    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=self.max_id_length)
                    schema.add_field("metadata", DataType.JSON)
                    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
                    index = self.client.prepare_index_params()
                    index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
                    self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
                self.client.load_collection(name)
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"cannot prepare {name} to check the filter: {exc}") from exc
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
            params = dict(self.search_params)
            if self.index_type == "HNSW":
                params["ef"] = max(int(params.get("ef", 64)), limit)
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
            stored = self._stored(entity, concepts)
            stored.score = float(hit["distance"])
            hits.append(stored)
        return hits
