"""Helpers for the search service tests: configs, a Searcher without gRPC, a search-service subprocess,
and request builders (the Milvus standalone server is `demo.milvus_standalone`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from teran_api._proto import search_pb2
from teran_api.tensors import to_tensor
from teran_api.types import Modality, ModelRef, SearchQuery, Vectors

ROOT = Path(__file__).resolve().parent.parent


def expect_error(code, call, *args, match: str = "", **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value.details()


def unique_prefix(base: str = "t") -> str:
    return f"{base}_{uuid.uuid4().hex[:10]}"


def search_config(uri: str, encoder_target: str = "", **overrides):
    from search_service.config import SearchConfig

    values = dict(
        milvus_uri=uri, encoder_address=encoder_target, host="127.0.0.1", port=0, metrics_port=-1, max_index_items=32,
        max_ids=64, max_top_k=50, max_metadata_bytes=2048, shutdown_grace_s=2.0, milvus_workers=2, encoder_timeout_s=30,
    )  # fmt: skip
    values.update(overrides)
    return SearchConfig(**values).validate()


class DirectSearch:
    """A Searcher over its own collections, without gRPC (for tests of what it does, not of the wire):
    each call runs to completion on a private event loop."""

    def __init__(self, uri: str, prefix: str | None = None, **overrides):
        from concurrent.futures import ThreadPoolExecutor

        from search_service.searcher import Searcher, open_store

        self.prefix = prefix or unique_prefix("direct")
        self.config = search_config(uri, collection_prefix=self.prefix, rerank_cache_mb=0, **overrides)
        self.store = open_store(self.config)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="milvus")
        self.searcher = Searcher(self.config, self.store, self.pool)
        self.loop = asyncio.new_event_loop()

    def index(self, items):
        return self.loop.run_until_complete(self.searcher.index(items))

    def search(self, query: Vectors, **options):
        """`options`: the other fields of teran_api.types.SearchQuery."""
        return self.loop.run_until_complete(self.searcher.search(SearchQuery(query, **options)))

    def stats(self):
        return self.loop.run_until_complete(self.searcher.stats())

    def close(self) -> None:
        self.loop.close()
        self.pool.shutdown()
        self.store.close()


def vectors_value(modality: str, global_vector, concepts, *, boxes=None, word_pieces=(), model=None) -> Vectors:
    """teran_api.types.Vectors of `modality` ("images" or "captions"); `model`: (name, version, dimension)."""
    return Vectors(
        Modality.IMAGE if modality == "images" else Modality.CAPTION,
        np.asarray(global_vector, np.float32),
        np.asarray(concepts, np.float32),
        boxes=None if boxes is None else np.asarray(boxes, np.float32),
        word_pieces=list(word_pieces),
        model=None if model is None else ModelRef(*model),
    )


# --------------------------------------------------------------------------- requests


def vectors_message(modality: str, global_vector, concepts, *, boxes=None, word_pieces=(), model=None, dtype=np.float32):
    v = search_pb2.Vectors(modality=search_pb2.IMAGE if modality == "images" else search_pb2.CAPTION)
    v.global_vector.CopyFrom(to_tensor(np.asarray(global_vector), dtype))
    v.concepts.CopyFrom(to_tensor(np.asarray(concepts), dtype))
    if boxes is not None:
        v.boxes.CopyFrom(to_tensor(np.asarray(boxes), np.float32))
    v.word_pieces.extend(word_pieces)
    if model is not None:
        v.model.name, v.model.version, v.model.dimension = model
    return v


def random_unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def vector_item(item_id: str, modality: str, dim: int, seed: int, n: int = 5, metadata: dict | None = None, model=None):
    rng = np.random.default_rng(seed)
    boxes = rng.random((n, 4), dtype=np.float32) if modality == "images" else None
    pieces = [f"w{i}" for i in range(n)] if modality == "captions" else ()
    vectors = vectors_message(modality, random_unit(rng, dim), random_unit(rng, n, dim), boxes=boxes, word_pieces=pieces, model=model)
    return search_pb2.IndexItem(id=item_id, metadata_json=json.dumps(metadata or {}), vectors=vectors)


# --------------------------------------------------------------------------- a subprocess


def search_process(args: list[str], log_path: Path):
    """`python -m search_service ARGS` (demo.launcher.LocalService), started and SERVING; restart with
    `.start()`, SIGKILL with `.stop(signal.SIGKILL)`."""
    from demo.launcher import LocalService

    process = LocalService("search_service", "teran.v1.SearchService", args, log_path, start_timeout_s=60)
    process.start()
    return process
