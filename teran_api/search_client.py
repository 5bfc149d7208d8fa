"""A small typed client for teran.v1.SearchService (blocking).

    from teran_api.search_client import SearchClient
    with SearchClient("localhost:50052") as client:
        client.index_captions({"c1": "a dog runs on the beach"}, metadata={"c1": {"split": "test"}})
        client.index_images({"i1": open("dog.jpg", "rb").read()})
        for hit in client.search_caption("a dog", top_k=5, filter='metadata["split"] == "test"').hits:
            print(hit.id, hit.score, [(a.word, a.region_index, a.similarity) for a in hit.alignment])

Every call raises SearchError (with `.code`, a grpc.StatusCode, and `.details`) on failure; the
responses are the generated protobuf messages (see proto/teran/v1/search.proto).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from serving.grpc_server import channel_credentials
from teran_api._proto import search_pb2, search_pb2_grpc

IMAGE, CAPTION = search_pb2.IMAGE, search_pb2.CAPTION


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
    def _items(values: Mapping[str, object], field: str, metadata: Mapping[str, dict] | None) -> list:
        metadata = metadata or {}
        items = []
        for item_id, value in values.items():
            item = search_pb2.IndexItem(id=item_id, metadata_json=json.dumps(metadata.get(item_id, {})))
            setattr(item, field, value)  # the `caption` or `image` of the item's oneof
            items.append(item)
        return items

    def index(self, items: Iterable[search_pb2.IndexItem], request_id: str = "") -> search_pb2.IndexResponse:
        return self._call(self.stub.Index, search_pb2.IndexRequest(items=list(items), request_id=request_id))

    def index_captions(self, captions: Mapping[str, str], metadata: Mapping[str, dict] | None = None) -> search_pb2.IndexResponse:
        return self.index(self._items(captions, "caption", metadata))

    def index_images(self, images: Mapping[str, bytes], metadata: Mapping[str, dict] | None = None) -> search_pb2.IndexResponse:
        return self.index(self._items(images, "image", metadata))

    def stream_index(self, batches: Iterable[Iterable[search_pb2.IndexItem]], timeout: float | None = None) -> search_pb2.IndexResponse:
        requests = (search_pb2.IndexRequest(items=list(batch)) for batch in batches)
        return self._call(self.stub.StreamIndex, requests, timeout)

    def search(self, **fields) -> search_pb2.SearchResponse:
        return self._call(self.stub.Search, search_pb2.SearchRequest(**fields))

    def search_caption(self, caption: str, **options) -> search_pb2.SearchResponse:
        return self.search(caption=caption, **options)

    def search_image(self, image: bytes, **options) -> search_pb2.SearchResponse:
        return self.search(image=image, **options)

    def get(self, modality: search_pb2.Modality, ids: list[str], include_vectors: bool = False) -> search_pb2.GetResponse:
        return self._call(self.stub.Get, search_pb2.GetRequest(modality=modality, ids=ids, include_vectors=include_vectors))

    def delete(self, modality: search_pb2.Modality, ids: list[str]) -> search_pb2.DeleteResponse:
        return self._call(self.stub.Delete, search_pb2.DeleteRequest(modality=modality, ids=ids))

    def stats(self) -> search_pb2.StatsResponse:
        return self._call(self.stub.Stats, search_pb2.StatsRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
