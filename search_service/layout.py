"""The collections in Milvus and their layout: the schema, the record of what they hold (model, concept
fields, sparse fields, BoC codebook), reading it back when the service starts with the checks of the
codebook given then, and recovery from a crash while the collections were being created.

Two collections, PREFIX_images and PREFIX_captions, same schema:

    id              VARCHAR primary key (caller's id)
    global_vector   FLOAT_VECTOR[D]            dense first stage (metric IP = cosine on unit vectors)
    concepts_0..K-1 VARCHAR(65535)             concept vectors [N, D] as little-endian fp16 bytes, base64,
                                               split over K fields (K fixed by D and max_concepts; see codec.py)
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
The concept codec of collections that store codes (--concept-codec) is kept the same way: rows
`concept_codec_0..P-1` (its .npz file's bytes), recorded under `codec`.

The `collections` row of PREFIX_meta (and each collection's description, JSON) records the model (name,
version, dimension), the concept encoding and K, so a restarted service, or another replica, reads them
back from Milvus.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

from search_service.codec import CHUNK_CHARS, CODED_CONCEPT_ENCODING, CONCEPT_ENCODING, ConceptFormat, pack, unpack, unpack_rows
from search_service.concept_codes import MAX_SALIENT_REGIONS, ConceptCodec, codec_from_bytes
from search_service.filters import id_filter
from search_service.milvus_calls import StoreError, milvus_call
from search_service.sparse import BOC, BOC_DEFAULTS, check_codebook, codebook_digest
from search_service.sparse import KINDS as SPARSE_KINDS
from teran_api.types import ModelRef

IMAGES, CAPTIONS = "images", "captions"
MODALITIES = (IMAGES, CAPTIONS)
SCHEMA_FORMAT = 3  # 2: rows carry `stamp`; 3: and `hub`
BOC_PART_CHARS = 32768  # base64 characters per codebook row in PREFIX_meta (well below Milvus's JSON limit)


class ModelMismatch(Exception):
    """Vectors from a model other than the collections' (FAILED_PRECONDITION)."""


class CodebookMismatch(ModelMismatch):
    """A BoC codebook other than the collections' (FAILED_PRECONDITION; at startup: the service does not start)."""


class CodecMismatch(ModelMismatch):
    """A concept codec other than the collections' (FAILED_PRECONDITION; at startup: the service does not start)."""


class Layout:
    """The collections of one prefix and what they hold. Until they exist (`model` None) the attributes are the
    settings new collections get; once created, or read back when the service starts, they are the collections'.
    Not locked: the store creates the collections under its lock. Methods that talk to Milvus take its client."""

    def __init__(
        self,
        prefix: str,
        *,
        index_type: str,
        index_params: dict,
        max_concepts: int,
        max_id_length: int,
        sparse_surrogates: list[str] | tuple[str, ...],
        sparse_params: dict | None,
        boc_codebook: np.ndarray | None,
        concept_codec: ConceptCodec | None = None,
    ):
        self.prefix = prefix
        self.index_type = index_type
        self.index_params = index_params
        self.max_concepts = max_concepts
        self.max_id_length = max_id_length
        self.requested_surrogates = list(sparse_surrogates)
        self.surrogates: list[str] = []  # those the collections have
        self.sparse_params = {"sq_scale": 30.0, "dp_keep": 64, **BOC_DEFAULTS, **(sparse_params or {})}
        # BoC: the codebook given at start (None: none given); `codebook` is the collections' (None: no boc_vector)
        self.requested_codebook = None if boc_codebook is None else check_codebook(boc_codebook, "--boc-codebook")
        if self.requested_codebook is not None and BOC not in self.requested_surrogates:
            self.requested_surrogates.append(BOC)
        self.codebook: np.ndarray | None = None
        # Concept codes: the codec given at start (None: fp16 concepts); `codec` is the collections'
        self.requested_codec = concept_codec
        self.codec: ConceptCodec | None = None
        self.model: ModelRef | None = None
        self.chunks = 0
        self.stamped = True  # rows carry `stamp` (False for collections created before schema format 2)
        self.hub_field = True  # rows carry `hub` (False for collections created before schema format 3)

    # ------------------------------------------------------------------ names and the layout record

    def name(self, modality: str) -> str:
        return f"{self.prefix}_{modality}"

    @property
    def meta_name(self) -> str:
        return f"{self.prefix}_meta"

    @property
    def filter_check_name(self) -> str:
        return f"{self.prefix}_filter_check"

    @property
    def _data_names(self) -> str:
        return f"{self.name(IMAGES)}/{self.name(CAPTIONS)}"

    @property
    def known_model(self) -> ModelRef:
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

    @property
    def concepts(self) -> ConceptFormat:
        """How the collections' concept fields hold the vectors (new collections: as the settings say)."""
        return ConceptFormat(self.codec if self.model is not None else self.requested_codec)

    def _record(self, model: ModelRef | None = None) -> dict:
        """The layout as PREFIX_meta's `collections` row (and the collections' descriptions) record it."""
        m = model or self.known_model
        return {
            "format": SCHEMA_FORMAT,
            "model": {"name": m.name, "version": m.version, "dimension": m.dimension},
            "concept_encoding": self.concepts.encoding,
            "concept_chunks": self.chunks,
            "max_concepts": self.max_concepts,
            "max_id_length": self.max_id_length,
            "sparse": self.surrogates,
            "sparse_params": self.sparse_params,
            "row_stamp": self.stamped,
            "row_hub": self.hub_field,
            **({"boc": self._boc_record()} if self.codebook is not None else {}),
            **({"codec": self._codec_record(self.codec)} if self.codec is not None else {}),
        }

    @staticmethod
    def _codec_record(codec: ConceptCodec) -> dict:
        size = len(codec.to_bytes())
        return {
            "bytes_per_vector": codec.bytes_per_vector,
            **({"salient_regions": codec.salient, "region_bytes": codec.region_codec.bytes_per_vector} if codec.salient else {}),
            "sha256": codec.digest(),
            "parts": math.ceil(4 * math.ceil(size / 3) / BOC_PART_CHARS),
        }

    def _boc_record(self) -> dict:
        codebook = self.known_codebook
        size, dim = codebook.shape
        parts = math.ceil(4 * math.ceil(size * dim * 4 / 3) / BOC_PART_CHARS)
        return {"codewords": size, "dimension": dim, "sha256": codebook_digest(codebook), "parts": parts}

    # ------------------------------------------------------------------ checks

    def check_model(self, model: ModelRef, *, what: str = "vectors") -> None:
        current = self.model
        if current is None:
            return
        if model.dimension != current.dimension:
            raise ModelMismatch(
                f"{what} have dimension {model.dimension} ({model.name} v{model.version}), but the collections "
                f"{self._data_names} hold {current.describe()} vectors: use the same model, "
                "or index into new collections (--collection-prefix)"
            )
        if (model.name, model.version) != (current.name, current.version):
            raise ModelMismatch(
                f"{what} come from model {model.describe()}, but the collections hold {current.describe()} vectors "
                "(vectors of different models are not comparable): use the same model, or new collections (--collection-prefix)"
            )

    def _check_requested_codebook(self, sparse_supported: bool) -> None:
        """Existing collections: a codebook given at start must be theirs (they were encoded with it)."""
        given = self.requested_codebook
        if given is None:
            return
        if self.codebook is None:
            if not sparse_supported:
                return  # like sq/dp: no sparse fields on this backend, the codebook is unused
            raise CodebookMismatch(
                f"--boc-codebook was given, but the existing collections {self._data_names} were created without a BoC "
                "codebook (no boc_vector field): drop --boc-codebook, or index into new collections (--collection-prefix)"
            )
        if given.shape != self.codebook.shape or codebook_digest(given) != codebook_digest(self.codebook):
            raise CodebookMismatch(
                f"--boc-codebook ({given.shape[0]} codewords x {given.shape[1]}, sha256 {codebook_digest(given)[:12]}) differs from "
                f"the codebook stored with the collections {self._data_names} ({self.codebook.shape[0]} x {self.codebook.shape[1]}, "
                f"sha256 {codebook_digest(self.codebook)[:12]}): their boc_vector fields were encoded with the stored one. Drop "
                "--boc-codebook (the stored codebook is used), or index into new collections (--collection-prefix)"
            )

    def _check_requested_codec(self) -> None:
        """Existing collections: a codec given at start must be theirs (their codes were made with it)."""
        given = self.requested_codec
        if given is None:
            return
        if self.codec is None:
            raise CodecMismatch(
                f"--concept-codec was given, but the existing collections {self._data_names} store fp16 concepts: drop "
                "--concept-codec, or copy them into new collections that store codes (python -m search_service.convert_concepts)"
            )
        if given.digest() != self.codec.digest():
            raise CodecMismatch(
                f"--concept-codec ({given.describe()}) differs from the codec stored with the collections {self._data_names} "
                f"({self.codec.describe()}): their codes were made with the stored one. Drop --concept-codec (the stored "
                "codec is used), or index into new collections (--collection-prefix)"
            )

    # ------------------------------------------------------------------ at startup: read back, recover

    def read_back(self, client: Any, sparse_supported: bool) -> None:
        """Read the collections' layout back from PREFIX_meta (milvus-lite keeps no collection descriptions), load
        them, and create what a crash left missing. Nothing to read: the attributes stay the settings given."""
        record = None
        if client.has_collection(self.meta_name):
            client.load_collection(self.meta_name)
            rows = client.query(self.meta_name, filter='id == "collections"', output_fields=["info"], consistency_level="Strong")
            record = rows[0]["info"] if rows else None
        existing = [m for m in MODALITIES if client.has_collection(self.name(m))]
        if record is None:
            if not existing:
                return
            record = self._recover_record(client, existing)
            if record is None:
                return
            if "boc" in record:  # the codebook rows may be missing too: rewrite them (the given codebook)
                self.codebook = record["boc"]["codebook"]
                self._create_meta(client)
                self._write_codebook(client)
            if "codec" in record:
                self.codec = record["codec"]["codec"]
                self._create_meta(client)
                self._write_codec(client)
        model = record["model"]
        self.model = ModelRef(str(model["name"]), int(model["version"]), int(model["dimension"]))
        self.chunks = int(record["concept_chunks"])
        self.max_concepts = int(record["max_concepts"])
        self.max_id_length = int(record.get("max_id_length", self.max_id_length))
        self.surrogates = list(record.get("sparse", []))
        self.sparse_params = dict(record.get("sparse_params", self.sparse_params))
        self.stamped = bool(record.get("row_stamp", False))
        self.hub_field = bool(record.get("row_hub", False))
        if BOC in self.surrogates:
            boc = record["boc"]
            self.codebook = boc["codebook"] if "codebook" in boc else self._read_codebook(client, boc)
        encoding = record.get("concept_encoding", CONCEPT_ENCODING)
        if encoding == CODED_CONCEPT_ENCODING:
            codec = record["codec"]
            self.codec = codec["codec"] if "codec" in codec else self._read_codec(client, codec)
        elif encoding != CONCEPT_ENCODING:
            raise StoreError(f"{self.meta_name}: concept encoding {encoding!r} is unknown to this version of the service")
        self._check_requested_codebook(sparse_supported)
        self._check_requested_codec()
        for modality in existing:
            client.load_collection(self.name(modality))
        self._create_missing(client)

    def _recover_record(self, client: Any, existing: list[str]) -> dict | None:
        """PREFIX_meta is missing (a crash while creating): derive the layout from the schema and a row's model,
        or drop the data collections if they are empty (nothing was acknowledged into them)."""
        for modality in existing:
            client.load_collection(self.name(modality))
            rows = client.query(self.name(modality), filter='id != ""', output_fields=["model"], limit=1, consistency_level="Strong")
            if rows:
                fields = {f["name"]: f for f in client.describe_collection(self.name(modality))["fields"]}
                name, _, version = rows[0]["model"].rpartition("@")
                return {
                    "model": {"name": name, "version": int(version or 0), "dimension": int(fields["global_vector"]["params"]["dim"])},
                    "concept_chunks": sum(1 for f in fields if f.startswith("concepts_")),
                    "max_concepts": self.max_concepts,
                    "max_id_length": int(fields["id"]["params"]["max_length"]),
                    "sparse": [k for k in (*SPARSE_KINDS, BOC) if f"{k}_vector" in fields],
                    "row_stamp": "stamp" in fields,
                    "row_hub": "hub" in fields,
                    **self._recover_boc(client, fields),
                    **self._recover_codec(client),
                }
        for modality in existing:
            client.drop_collection(self.name(modality))
        return None

    def _recover_boc(self, client: Any, fields: dict) -> dict:
        """PREFIX_meta lost its `collections` row: the codebook rows (written before the collections) if there, else the
        given one (checked against the rows' later, as on any reopen)."""
        if "boc_vector" not in fields:
            return {}
        dim = int(fields["global_vector"]["params"]["dim"])
        codebook = unpack_rows(self._found_parts(client, "boc_codebook"), "<f4", dim)
        if codebook is not None:
            return {"boc": {"codebook": codebook.copy()}}
        if self.requested_codebook is None:
            raise StoreError(
                f"{self.meta_name} lost the layout of collections with a boc_vector field: restart once with the "
                "--boc-codebook they were created with"
            )
        return {"boc": {"codebook": self.requested_codebook}}

    def _recover_codec(self, client: Any) -> dict:
        """PREFIX_meta lost its `collections` row: collections that store codes have their codec's rows (written
        before the collections); without them the concepts are fp16."""
        text = self._found_parts(client, "concept_codec")
        if not text:
            return {}
        codec = codec_from_bytes(base64.b64decode(text), f"{self.meta_name}: the stored concept codec")
        return {"concept_encoding": CODED_CONCEPT_ENCODING, "codec": {"codec": codec}}

    def _found_parts(self, client: Any, stem: str) -> str:
        """Recovery: the rows `stem_0..` of PREFIX_meta that are there, joined in order ("" when none); their count is
        unknown when the `collections` row that records it is lost."""
        if not client.has_collection(self.meta_name):
            return ""
        client.load_collection(self.meta_name)
        rows = client.query(self.meta_name, filter=f'id like "{stem}_%"', output_fields=["id", "info"], consistency_level="Strong")
        return "".join(r["info"]["data"] for r in sorted(rows, key=lambda r: int(r["id"].rsplit("_", 1)[1])))

    def _write_parts(self, client: Any, stem: str, text: str) -> None:
        """`text` in rows `stem_0..P-1` of PREFIX_meta ({"data": part}), written before what refers to them."""
        rows = [
            {"id": f"{stem}_{i}", "info": {"data": text[start : start + BOC_PART_CHARS]}, "v": [0.0, 0.0]}
            for i, start in enumerate(range(0, len(text), BOC_PART_CHARS))
        ]
        for start in range(0, len(rows), 16):
            client.upsert(self.meta_name, rows[start : start + 16])

    def _read_parts(self, client: Any, stem: str, count: int, what: str) -> str:
        ids = [f"{stem}_{i}" for i in range(count)]
        rows = client.query(self.meta_name, filter=id_filter(ids), output_fields=["id", "info"], consistency_level="Strong")
        parts = {r["id"]: r["info"]["data"] for r in rows}
        if len(parts) != len(ids):
            raise StoreError(f"{self.meta_name}: the {what} is incomplete ({len(parts)} of {len(ids)} parts)")
        return "".join(parts[i] for i in ids)

    def _write_codebook(self, client: Any) -> None:
        self._write_parts(client, "boc_codebook", pack(self.known_codebook, "<f4"))

    def _read_codebook(self, client: Any, boc: dict) -> np.ndarray:
        text = self._read_parts(client, "boc_codebook", int(boc["parts"]), "BoC codebook")
        codebook = unpack(text, "<f4").reshape(int(boc["codewords"]), int(boc["dimension"])).copy()
        if codebook_digest(codebook) != boc["sha256"]:
            raise StoreError(f"{self.meta_name}: the stored BoC codebook does not match its sha256")
        return codebook

    def _write_codec(self, client: Any) -> None:
        assert self.codec is not None
        self._write_parts(client, "concept_codec", base64.b64encode(self.codec.to_bytes()).decode("ascii"))

    def _read_codec(self, client: Any, record: dict) -> ConceptCodec:
        text = self._read_parts(client, "concept_codec", int(record["parts"]), "concept codec")
        codec = codec_from_bytes(base64.b64decode(text), f"{self.meta_name}: the stored concept codec")
        if codec.digest() != record["sha256"]:
            raise StoreError(f"{self.meta_name}: the stored concept codec does not match its sha256")
        return codec

    # ------------------------------------------------------------------ creation

    def create(self, client: Any, model: ModelRef, sparse_supported: bool) -> None:
        """Create the collections for `model` (there are none yet)."""
        codec = self.requested_codec
        if codec is not None and codec.dimension != model.dimension:
            raise CodecMismatch(
                f"--concept-codec is for dimension {codec.dimension}, but the vectors ({model.describe()}) have dimension "
                f"{model.dimension}: train the codec on this model's concept vectors (python -m search_service.concept_codes)"
            )
        if codec is not None and codec.salient and self.max_concepts > MAX_SALIENT_REGIONS:
            raise CodecMismatch(
                f"--concept-codec keeps salient regions, indexed by one byte: --max-concepts {self.max_concepts} exceeds "
                f"{MAX_SALIENT_REGIONS}; lower it, or train the codec with --salient 0"
            )
        self.codec = codec
        self.chunks = ConceptFormat(codec).chunks(model.dimension, self.max_concepts)
        self.surrogates = list(self.requested_surrogates) if sparse_supported else []
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
        with milvus_call("cannot create collections"):
            self._create_missing(client, model)
        # Published only once the collections exist: writers test `model is None` without the lock.
        self.model = model

    def _create_missing(self, client: Any, model: ModelRef | None = None) -> None:
        """Create the data collections that do not exist (all of them for a new `model`), then record the layout."""
        from pymilvus import DataType, MilvusClient

        m = model or self.known_model
        if self.codebook is not None and model is not None:  # new collections: the codebook first (recovery reads it)
            self._create_meta(client)
            self._write_codebook(client)
        if self.codec is not None and model is not None:  # and the codec
            self._create_meta(client)
            self._write_codec(client)
        for modality in MODALITIES:
            name = self.name(modality)
            if client.has_collection(name):
                continue
            description = json.dumps({**self._record(m), "modality": modality})
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
            index = client.prepare_index_params()
            index.add_index(field_name="global_vector", index_type=self.index_type, metric_type="IP", params=self.index_params)
            for kind in self.surrogates:
                index.add_index(field_name=f"{kind}_vector", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
            client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
            client.load_collection(name)
        self._create_meta(client)
        client.upsert(self.meta_name, [{"id": "collections", "info": self._record(m), "v": [0.0, 0.0]}])

    def _create_meta(self, client: Any) -> None:
        if not client.has_collection(self.meta_name):
            _create_json_collection(client, self.meta_name, "teran search service layout", id_length=64, json_field="info")
            client.load_collection(self.meta_name)

    def create_filter_check(self, client: Any) -> None:
        """PREFIX_filter_check, loaded: id and metadata as in the data collections, never written; filters are tried
        on it while no data collection exists (so a malformed filter is refused then too)."""
        name = self.filter_check_name
        if not client.has_collection(name):
            _create_json_collection(client, name, "filter checks", id_length=self.max_id_length, json_field="metadata")
        client.load_collection(name)


def _create_json_collection(client: Any, name: str, description: str, *, id_length: int, json_field: str) -> None:
    """A collection of rows (id, one JSON field, v: a 2-d vector, since Milvus needs a vector field in every collection)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=id_length)
    schema.add_field(json_field, DataType.JSON)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
