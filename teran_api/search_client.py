"""A small typed client for teran.v1.SearchService (blocking).

    from teran_api.search_client import SearchClient
    with SearchClient("localhost:50052") as client:
        client.index_captions({"c1": "a dog runs on the beach"}, metadata={"c1": {"split": "test"}})
        client.index_images({"i1": open("dog.jpg", "rb").read()})
        for hit in client.search_caption("a dog", top_k=5, filter='metadata["split"] == "test"').hits:
            print(hit.id, hit.score, [(a.word, a.region_index, a.similarity) for a in hit.alignment])

Every call raises SearchError (with `.code`, a grpc.StatusCode, and `.details`) on failure and
returns the dataclasses of `teran_api.types` (see proto/teran/v1/search.proto for each field).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from serving.grpc_server import channel_credentials
from teran_api import search_messages as messages
from teran_api._proto import search_pb2, search_pb2_grpc
from teran_api.types import (
    Content,
    DeleteResult,
    IndexItem,
    IndexResult,
    Modality,
    SearchQuery,
    SearchResult,
    Stats,
    StoredItem,
)

IMAGE, CAPTION = Modality.IMAGE, Modality.CAPTION


class SearchError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class SearchClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = 64 << 20,
        tls: bool = False,
        root_cert: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
    ):
        """`tls` / `root_cert` (PEM CA bundle, implies TLS): connect over TLS; `client_cert` and
        `client_key` for a service that requires mutual TLS."""
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        credentials = channel_credentials(tls, root_cert, client_cert, client_key)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method, request, timeout=None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise SearchError(exc.code(), exc.details() or "") from exc

    @staticmethod
    def _items(values: Mapping[str, Content], metadata: Mapping[str, dict] | None) -> list[IndexItem]:
        metadata = metadata or {}
        return [IndexItem(item_id, value, json.dumps(metadata.get(item_id, {}))) for item_id, value in values.items()]

    def index(self, items: Iterable[IndexItem], request_id: str = "") -> IndexResult:
        request = search_pb2.IndexRequest(items=[messages.index_item_to_proto(item) for item in items], request_id=request_id)
        return messages.index_result_from_proto(self._call(self.stub.Index, request))

    def index_captions(self, captions: Mapping[str, str], metadata: Mapping[str, dict] | None = None) -> IndexResult:
        return self.index(self._items(captions, metadata))

    def index_images(self, images: Mapping[str, bytes], metadata: Mapping[str, dict] | None = None) -> IndexResult:
        return self.index(self._items(images, metadata))

    def stream_index(self, batches: Iterable[Iterable[IndexItem]], timeout: float | None = None) -> IndexResult:
        """One IndexRequest per batch on one stream: each batch is stored before the next is read."""
        requests = (search_pb2.IndexRequest(items=[messages.index_item_to_proto(item) for item in batch]) for batch in batches)
        return messages.index_result_from_proto(self._call(self.stub.StreamIndex, requests, timeout))

    def search(self, query: SearchQuery) -> SearchResult:
        response = self._call(self.stub.Search, messages.search_query_to_proto(query))
        return messages.search_result_from_proto(response)

    def search_caption(self, caption: str, **options) -> SearchResult:
        """Images for a caption; `options`: the other fields of SearchQuery (top_k, filter, ...)."""
        return self.search(SearchQuery(caption, **options))

    def search_image(self, image: bytes, **options) -> SearchResult:
        """Captions for an image file (JPEG, PNG or WebP bytes)."""
        return self.search(SearchQuery(image, **options))

    def get(self, modality: Modality, ids: list[str], include_vectors: bool = False) -> list[StoredItem]:
        """One entry per id, in order; `found` False for an id not stored."""
        request = search_pb2.GetRequest(modality=messages.MODALITY_TO_PROTO[modality], ids=ids, include_vectors=include_vectors)
        return messages.stored_items_from_proto(self._call(self.stub.Get, request))

    def delete(self, modality: Modality, ids: list[str]) -> DeleteResult:
        request = search_pb2.DeleteRequest(modality=messages.MODALITY_TO_PROTO[modality], ids=ids)
        return messages.delete_result_from_proto(self._call(self.stub.Delete, request))

    def stats(self, timeout: float | None = None) -> Stats:
        """`timeout`: seconds for this call (default: the client's)."""
        return messages.stats_from_proto(self._call(self.stub.Stats, search_pb2.StatsRequest(), timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
