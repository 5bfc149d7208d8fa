"""Search service configuration: command-line flags, each with a TERAN_SEARCH_* environment variable.

Precedence: flag > environment variable > default. `python -m search_service --help` lists every
setting with its variable and default; settings marked LIMIT bound what a request may ask. The
settings every service has (listeners, TLS, bearer tokens, logs) are declared by
`serving.settings.ServiceSettings`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from serving.settings import ConfigError, ServiceSettings, Settings, setting

ENV_PREFIX = "TERAN_SEARCH_"
INDEX_TYPES = ("auto", "FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")

__all__ = ["ConfigError", "SearchConfig", "build_parser", "from_args", "parse_ranking"]


def parse_ranking(text: str) -> str | float | None:
    """--ranking: "model" -> "model", "mrsw" -> None, "blend:W" -> W (a finite W >= 0); anything else -> "invalid"."""
    if text in ("model", "mrsw"):
        return None if text == "mrsw" else "model"
    kind, _, weight = text.partition(":")
    try:
        value = float(weight)
    except ValueError:
        return "invalid"
    return value if kind == "blend" and 0.0 <= value < float("inf") else "invalid"


@dataclass
class SearchConfig(ServiceSettings):
    # storage
    milvus_uri: str = setting(
        "teran-search.db",
        "Milvus: a milvus-lite file (*.db, embedded, the default) or a server / cluster URI, e.g. http://milvus:19530",
    )
    milvus_token: str = setting("", "Milvus token (user:password or an API key); prefer the variable", secret=True)
    collection_prefix: str = setting("teran", "collections are PREFIX_images and PREFIX_captions")
    index_type: str = setting(
        "auto",
        "dense index of the global vectors: auto (HNSW M=16 efConstruction=200, ef raised to the candidate count; on both "
        "backends), FLAT (exact), HNSW, IVF_FLAT, IVF_SQ8, AUTOINDEX",
    )
    index_params: dict = setting({}, 'JSON build parameters of --index-type, e.g. {"M": 16, "efConstruction": 200} or {"nlist": 1024}')
    search_params: dict = setting(
        {}, 'JSON search parameters, e.g. {"ef": 128} (HNSW ef is raised to the candidate count) or {"nprobe": 16}'
    )
    consistency_level: str = setting(
        "Strong", "read consistency of Search/Get/Stats: Strong (read your writes), Bounded, Session, Eventually"
    )
    flush_on_index: bool = setting(
        False, "also flush (seal) segments before acknowledging Index (slow; acknowledged writes already survive a crash)"
    )
    milvus_workers: int = setting(4, "threads talking to Milvus")
    sparse_surrogates: list[str] = setting(
        [],
        "sparse first stages stored with new collections where the backend has sparse vectors (milvus-lite 3.x, Milvus >= 2.4): "
        "sq (scalar quantization), dp (deep permutation), boc (Bag of Concepts: needs --boc-codebook), e.g. sq,dp; fixed when "
        "the collections are created",
    )
    sq_scale: float = setting(30.0, "scalar quantization: weight floor(scale x c-relu(v)); larger = denser")
    dp_keep: int = setting(64, "deep permutation: components kept (the sparsity)")
    boc_codebook: Path | None = setting(
        None,
        "Bag of Concepts first stage: a k-means codebook of concept vectors, .npy [codewords, dimension] (python -m "
        "search_service.codebook); implies boc in --sparse-surrogates. Stored with new collections in PREFIX_meta; on "
        "existing collections the stored one is used (omit the flag), and a different one is refused at start",
    )
    concept_codec: Path | None = setting(
        None,
        "store the concept vectors of new collections as the codes of this codec, .npz (python -m "
        "search_service.concept_codes; e.g. 4,077 bytes per 49-region image, 80 per caption word piece, 1/6 of fp16), decoded for "
        "the re-rank. Stored with the collections "
        "in PREFIX_meta; on existing ones the stored codec is used (omit the flag), and a different one is refused at start",
    )
    boc_top: int = setting(1, "Bag of Concepts: codewords each concept vector is soft-assigned to (1: hard); sets the sparsity")
    boc_keep: int = setting(0, "Bag of Concepts: keep only the largest weights per item (0: all)")
    boc_temperature: float = setting(0.05, "Bag of Concepts: softmax temperature of the soft assignment (on cosines)")
    milvus_timeout_s: float = setting(30.0, "LIMIT: seconds per Milvus call")
    milvus_health_interval_s: float = setting(
        2.0,
        "seconds between readiness checks of Milvus: NOT_SERVING while it does not answer, collections loaded again when it does (0: off)",
    )
    # model used to create the collections when neither the encoder nor the request names one
    model_name: str = setting(
        "unspecified", "model name recorded when collections are created from vectors without a ModelRef and no encoder"
    )
    model_version: int = setting(0, "model version recorded in that case")
    # encoder
    encoder_address: str = setting("", "teran.v1.EncoderService host:port for raw images and captions (empty: vectors only)")
    encoder_token: str = setting("", "bearer token for the encoder; prefer the variable", secret=True)
    encoder_tls: bool = setting(False, "connect to the encoder over TLS (system CA bundle unless --encoder-root-cert)")
    encoder_root_cert: Path | None = setting(None, "PEM CA bundle that signed the encoder's certificate (implies TLS)")
    encoder_client_cert: Path | None = setting(
        None, "PEM client certificate for an encoder that requires mutual TLS (with --encoder-client-key)"
    )
    encoder_client_key: Path | None = setting(None, "PEM private key of --encoder-client-cert")
    encoder_timeout_s: float = setting(30.0, "LIMIT: seconds per encoder call")
    encoder_batch: int = setting(32, "items per encoder request")
    # network (the common listener settings, with this service's defaults)
    port: int = 50052
    metrics_port: int = 9091
    # retrieval
    ranking: str = setting(
        "model",
        "re-rank score: model (the encoder model's: global cosine + w x MrSw, w from its manifest; MrSw when it has "
        "none or no encoder is set), mrsw (the TERAN alignment alone) or blend:W (global cosine + W x MrSw)",
    )
    rerank_multiplier: int = setting(10, "default R_m: the first stage fetches R_m x top_k candidates for the re-rank")
    max_rerank_multiplier: int = setting(100, "LIMIT: largest R_m a request may ask")
    max_candidates: int = setting(2000, "LIMIT: first-stage candidates per query (R_m x top_k is capped to it; <= 16384)")
    rerank_chunk: int = setting(256, "candidates scored per numpy batch in the re-rank")
    rerank_cache_mb: float = setting(
        1024.0,
        "re-rank cache: MiB of decoded fp16 concept vectors kept in memory (loaded from Milvus at start, kept current by "
        "this service's writes, validated per search by each row's stamp); items beyond it are fetched from Milvus per "
        "search (logged, teran_search_rerank_cache_full=1). Size: items x concepts x dimension x 2 bytes. 0 disables",
    )
    rerank_cache_refresh_s: float = setting(
        0.0,
        "re-rank cache: seconds between reconciliations with Milvus (drops rows deleted or rewritten by other replicas, "
        "loads rows they wrote; stale entries are never served either way). 0: never",
    )
    # request limits
    max_top_k: int = setting(100, "LIMIT: hits per search")
    max_index_items: int = setting(256, "LIMIT: items per Index request / StreamIndex message")
    max_ids: int = setting(1024, "LIMIT: ids per Get / Delete request")
    max_id_length: int = setting(512, "LIMIT: bytes per item id (fixed when the collections are created)")
    max_metadata_bytes: int = setting(
        16384, "LIMIT: bytes of metadata JSON per item (integers within int64, finite numbers, nesting <= 32)"
    )
    vector_norm_tolerance: float = setting(
        0.01, "LIMIT: vectors sent precomputed (global and every concept) must have L2 norm 1 within this; others are refused"
    )
    max_concepts: int = setting(128, "LIMIT: concept vectors (regions / word pieces) per item (fixed when the collections are created)")
    max_filter_chars: int = setting(2048, "LIMIT: characters per search filter expression")

    env_prefix = ENV_PREFIX

    def validate(self) -> SearchConfig:
        self.check_common()
        need = self.require
        need(bool(self.milvus_uri), "milvus_uri", "required: a milvus-lite file (*.db) or a Milvus server URI (http://host:19530)")
        need(self.collection_prefix.replace("_", "").isalnum(), "collection_prefix", "letters, digits and _ only")
        need(self.index_type in INDEX_TYPES, "index_type", f"{self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        need(
            self.consistency_level in CONSISTENCY, "consistency_level", f"{self.consistency_level!r} is not one of {', '.join(CONSISTENCY)}"
        )
        for name in (
            "milvus_workers", "encoder_batch", "rerank_multiplier", "max_rerank_multiplier",
            "max_candidates", "rerank_chunk", "max_top_k", "max_index_items", "max_ids", "max_id_length",
            "max_metadata_bytes", "max_concepts", "max_filter_chars",
        ):  # fmt: skip
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(all(k in ("sq", "dp", "boc") for k in self.sparse_surrogates), "sparse_surrogates", "a comma-separated subset of sq, dp, boc")
        need(
            "boc" not in self.sparse_surrogates or self.boc_codebook is not None,
            "sparse_surrogates",
            "boc needs a codebook: set --boc-codebook PATH (build one with python -m search_service.codebook)",
        )
        need(0 < self.vector_norm_tolerance < 1, "vector_norm_tolerance", f"must be in (0, 1), got {self.vector_norm_tolerance}")
        need(self.boc_top >= 1, "boc_top", f"must be >= 1, got {self.boc_top}")
        need(self.boc_keep >= 0, "boc_keep", f"must be >= 0 (0: keep all), got {self.boc_keep}")
        need(self.boc_temperature > 0, "boc_temperature", f"must be > 0, got {self.boc_temperature}")
        need(parse_ranking(self.ranking) != "invalid", "ranking", f"{self.ranking!r}: give model, mrsw or blend:W with a number W >= 0")
        need(self.rerank_cache_mb >= 0, "rerank_cache_mb", f"must be >= 0 (0 disables the cache), got {self.rerank_cache_mb}")
        need(self.rerank_cache_refresh_s >= 0, "rerank_cache_refresh_s", f"must be >= 0 (0: never), got {self.rerank_cache_refresh_s}")
        need(self.sq_scale > 0, "sq_scale", f"must be > 0, got {self.sq_scale}")
        need(self.dp_keep >= 1, "dp_keep", f"must be >= 1, got {self.dp_keep}")
        need(self.max_candidates <= 16384, "max_candidates", "Milvus returns at most 16384 hits per search")
        need(self.max_concepts <= 3000, "max_concepts", "at most 3000 (boxes are stored in one VARCHAR field)")
        need(self.max_id_length <= 65535, "max_id_length", "at most 65535 (Milvus VARCHAR)")
        need(self.rerank_multiplier <= self.max_rerank_multiplier, "rerank_multiplier", "must be <= --max-rerank-multiplier")
        for name in ("milvus_timeout_s", "encoder_timeout_s"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(self.milvus_health_interval_s >= 0, "milvus_health_interval_s", f"must be >= 0 (0: off), got {self.milvus_health_interval_s}")
        need(
            (self.encoder_client_cert is None) == (self.encoder_client_key is None),
            "encoder_client_cert",
            "--encoder-client-cert and --encoder-client-key go together",
        )
        for name in ("encoder_root_cert", "encoder_client_cert", "encoder_client_key"):
            path = getattr(self, name)
            need(path is None or Path(path).is_file(), name, f"{path}: file does not exist")
        return self

    @property
    def is_lite(self) -> bool:
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix:"))


SETTINGS = Settings(
    ENV_PREFIX,
    SearchConfig,
    prog="python -m search_service",
    description="TERAN search gRPC service (teran.v1.SearchService): stores images and captions in Milvus, "
    "dense first stage on the global vector, exact TERAN MrSw re-rank with explanations. Serves grpc.health.v1, "
    "server reflection and Prometheus metrics. Every flag can be set by the environment variable shown; settings "
    "marked LIMIT bound what a request may ask (violations: INVALID_ARGUMENT naming the field and the limit).",
)


def env_name(name: str) -> str:
    return SETTINGS.env_name(name)


def build_parser() -> argparse.ArgumentParser:
    return SETTINGS.build_parser()


def from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> SearchConfig:
    """Flags, then TERAN_SEARCH_* variables, then defaults -> a validated SearchConfig."""
    return SETTINGS.from_args(argv, environ)
