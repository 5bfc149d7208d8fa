"""`teran_api.types` <-> the messages of proto/teran/v1/search.proto, for both sides of the wire.

Requests decoded on the service side are checked as they are decoded: a tensor's declared size is
compared with its limit before its bytes are copied, and every error is a TeranInputError that
names the field (the service answers INVALID_ARGUMENT with its text).
"""

from __future__ import annotations

import json

import numpy as np

from teran.errors import TeranInputError
from teran_api._proto import common_pb2, search_pb2
from teran_api.tensors import FLOAT16, FLOAT32, decode, fill_tensor, from_tensor
from teran_api.types import (
    Content,
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
    WordAlignment,
)

MODALITY_TO_PROTO = {Modality.IMAGE: search_pb2.IMAGE, Modality.CAPTION: search_pb2.CAPTION}
MODALITY_FROM_PROTO: dict[int, Modality] = {v: k for k, v in MODALITY_TO_PROTO.items()}
FIRST_STAGE_TO_PROTO = {
    FirstStage.DENSE: search_pb2.DENSE,
    FirstStage.SCALAR_QUANTIZATION: search_pb2.SCALAR_QUANTIZATION,
    FirstStage.DEEP_PERMUTATION: search_pb2.DEEP_PERMUTATION,
    FirstStage.BAG_OF_CONCEPTS: search_pb2.BAG_OF_CONCEPTS,
}
FIRST_STAGE_FROM_PROTO: dict[int, FirstStage] = {v: k for k, v in FIRST_STAGE_TO_PROTO.items()}
MAX_GLOBAL_ELEMENTS = 65536  # a global vector's dimension, at most (decoded before the model is known)
MAX_REGION_FEATURE_ELEMENTS = 1 << 24
MAX_REGION_BOX_ELEMENTS = 1 << 16


# --------------------------------------------------------------------------- both sides


def model_to_proto(model: ModelRef | None) -> common_pb2.ModelRef:
    if model is None:
        return common_pb2.ModelRef()
    return common_pb2.ModelRef(name=model.name, version=model.version, dimension=model.dimension)


def model_from_proto(message: common_pb2.ModelRef) -> ModelRef | None:
    if not (message.name or message.version or message.dimension):
        return None
    return ModelRef(message.name, int(message.version), int(message.dimension))


def modality_name(modality: Modality) -> str:
    """The wire name: IMAGE or CAPTION."""
    return search_pb2.Modality.Name(MODALITY_TO_PROTO[modality])


def first_stage_name(stage: FirstStage) -> str:
    """The wire name, e.g. SCALAR_QUANTIZATION."""
    return search_pb2.FirstStage.Name(FIRST_STAGE_TO_PROTO[stage])


# --------------------------------------------------------------------------- client side: requests


def regions_to_proto(regions: RegionFeatures, message) -> None:
    fill_tensor(message.features, regions.features, FLOAT32)
    fill_tensor(message.boxes, regions.boxes, FLOAT32)
    message.image_width = int(regions.width)
    message.image_height = int(regions.height)


def _wire_dtype(array: np.ndarray) -> int:
    """float16 arrays travel as FLOAT16 (half the bytes), everything else as FLOAT32."""
    return FLOAT16 if np.asarray(array).dtype == np.float16 else FLOAT32


def vectors_to_proto(vectors: Vectors, message: search_pb2.Vectors) -> search_pb2.Vectors:
    if vectors.modality is not None:
        message.modality = MODALITY_TO_PROTO[vectors.modality]
    fill_tensor(message.global_vector, vectors.global_vector, _wire_dtype(vectors.global_vector))
    fill_tensor(message.concepts, vectors.concepts, _wire_dtype(vectors.concepts))
    if vectors.boxes is not None:
        fill_tensor(message.boxes, vectors.boxes, FLOAT32)
    message.word_pieces.extend(vectors.word_pieces)
    if vectors.model is not None:
        message.model.CopyFrom(model_to_proto(vectors.model))
    return message


def _content_to_proto(content: Content, message) -> None:
    """Set the `caption` / `image` / `regions` / `vectors` member of an IndexItem's or a SearchRequest's oneof."""
    if isinstance(content, str):
        message.caption = content
    elif isinstance(content, bytes | bytearray | memoryview):
        message.image = bytes(content)
    elif isinstance(content, RegionFeatures):
        regions_to_proto(content, message.regions)
    elif isinstance(content, Vectors):
        vectors_to_proto(content, message.vectors)
    elif content is not None:
        raise TypeError(f"content must be a caption (str), an image file (bytes), RegionFeatures or Vectors, not {type(content).__name__}")


def index_item_to_proto(item: IndexItem) -> search_pb2.IndexItem:
    message = search_pb2.IndexItem(id=item.id, metadata_json=item.metadata_json)
    _content_to_proto(item.content, message)
    return message


def search_query_to_proto(query: SearchQuery) -> search_pb2.SearchRequest:
    message = search_pb2.SearchRequest(
        top_k=query.top_k,
        filter=query.filter,
        rerank_multiplier=query.rerank_multiplier,
        disable_rerank=query.disable_rerank,
        skip_explanation=query.skip_explanation,
        request_id=query.request_id,
        first_stage=FIRST_STAGE_TO_PROTO[FirstStage(query.first_stage)],
    )
    _content_to_proto(query.query, message)
    return message


# --------------------------------------------------------------------------- service side: requests


def modality_from_proto(value: int) -> Modality | None:
    """None for MODALITY_UNSPECIFIED or an unknown value (the service refuses it)."""
    return MODALITY_FROM_PROTO.get(value)


def regions_from_proto(message, where: str) -> RegionFeatures:
    features = from_tensor(message.features, f"{where}.features", ndim=2, max_elements=MAX_REGION_FEATURE_ELEMENTS)
    boxes = from_tensor(message.boxes, f"{where}.boxes", ndim=2, max_elements=MAX_REGION_BOX_ELEMENTS)
    return RegionFeatures(features, boxes, int(message.image_width), int(message.image_height))


def vectors_from_proto(message: search_pb2.Vectors, where: str, max_concepts: int) -> Vectors:
    """Decode with the sizes bounded by `max_concepts` rows (checked on the declared shape first)."""
    global_vector = from_tensor(message.global_vector, f"{where}.global_vector", ndim=1, max_elements=MAX_GLOBAL_ELEMENTS)
    dim = global_vector.shape[0]
    if dim == 0:
        raise TeranInputError(f"{where}.global_vector: empty")
    shape = message.concepts.shape
    if len(shape) == 2 and shape[0] > max_concepts:
        raise TeranInputError(f"{where}.concepts: {shape[0]} concept vectors exceeds the limit of {max_concepts} (--max-concepts)")
    concepts = from_tensor(message.concepts, f"{where}.concepts", ndim=2, max_elements=max_concepts * dim)
    boxes = None
    if message.HasField("boxes"):
        boxes = from_tensor(message.boxes, f"{where}.boxes", ndim=2, max_elements=4 * (max_concepts + 1))
    model = None
    if message.HasField("model"):
        model = ModelRef(message.model.name, int(message.model.version), int(message.model.dimension))
    return Vectors(modality_from_proto(message.modality), global_vector, concepts, boxes, list(message.word_pieces), model)


def _content_from_proto(message, oneof: str, where: str, max_concepts: int) -> Content:
    which = message.WhichOneof(oneof)
    if which == "caption":
        return message.caption
    if which == "image":
        return message.image
    if which == "regions":
        return regions_from_proto(message.regions, f"{where}regions")
    if which == "vectors":
        return vectors_from_proto(message.vectors, f"{where}vectors", max_concepts)
    return None


def index_items_from_proto(request: search_pb2.IndexRequest, max_concepts: int, prefix: str = "") -> list[IndexItem]:
    return [
        IndexItem(item.id, _content_from_proto(item, "content", f"{prefix}items[{i}].", max_concepts), item.metadata_json)
        for i, item in enumerate(request.items)
    ]


def search_query_from_proto(request: search_pb2.SearchRequest, max_concepts: int) -> SearchQuery:
    if request.first_stage not in FIRST_STAGE_FROM_PROTO:
        raise TeranInputError(f"first_stage: unknown value {request.first_stage}")
    return SearchQuery(
        query=_content_from_proto(request, "query", "", max_concepts),
        top_k=request.top_k,
        filter=request.filter,
        rerank_multiplier=request.rerank_multiplier,
        disable_rerank=request.disable_rerank,
        skip_explanation=request.skip_explanation,
        request_id=request.request_id,
        first_stage=FIRST_STAGE_FROM_PROTO[request.first_stage],
    )


# --------------------------------------------------------------------------- service side: responses


def index_result_to_proto(result: IndexResult) -> search_pb2.IndexResponse:
    return search_pb2.IndexResponse(
        indexed=result.indexed,
        images=result.images,
        captions=result.captions,
        model=model_to_proto(result.model),
        request_id=result.request_id,
    )


def search_result_to_proto(result: SearchResult) -> search_pb2.SearchResponse:
    response = search_pb2.SearchResponse(
        target=MODALITY_TO_PROTO[result.target],
        candidates=result.candidates,
        reranked=result.reranked,
        ranking=result.ranking,
        model=model_to_proto(result.model),
        request_id=result.request_id,
        query_word_pieces=result.query_word_pieces,
    )
    for hit in result.hits:
        message = response.hits.add(
            id=hit.id,
            score=hit.score,
            first_stage_score=hit.first_stage_score,
            first_stage_rank=hit.first_stage_rank,
            metadata_json=json.dumps(hit.metadata, ensure_ascii=False),
        )
        for a in hit.alignment:
            message.alignment.add(
                word_index=a.word_index,
                word_piece=a.word_piece,
                word=a.word,
                piece_indices=a.piece_indices,
                region_index=a.region_index,
                box=a.box,
                similarity=a.similarity,
            )
    return response


def stored_items_to_proto(items: list[StoredItem]) -> search_pb2.GetResponse:
    response = search_pb2.GetResponse()
    for stored in items:
        message = response.items.add(id=stored.id)
        if not stored.found:
            continue
        message.found = True
        message.metadata_json = json.dumps(stored.metadata, ensure_ascii=False)
        message.num_concepts = stored.num_concepts
        message.word_pieces.extend(stored.word_pieces)
        if stored.boxes is not None:
            fill_tensor(message.boxes, stored.boxes, FLOAT32)
        if stored.global_vector is not None:
            fill_tensor(message.global_vector, stored.global_vector, FLOAT32)
        if stored.concepts is not None:
            fill_tensor(message.concepts, stored.concepts, FLOAT16)
        message.model.CopyFrom(model_to_proto(stored.model))
    return response


def delete_result_to_proto(result: DeleteResult) -> search_pb2.DeleteResponse:
    return search_pb2.DeleteResponse(deleted=result.deleted, not_found=result.not_found)


def stats_to_proto(stats: Stats) -> search_pb2.StatsResponse:
    return search_pb2.StatsResponse(
        images=stats.images,
        captions=stats.captions,
        model=model_to_proto(stats.model),
        backend=stats.backend,
        server_version=stats.server_version,
        uri=stats.uri,
        index_type=stats.index_type,
        concept_encoding=stats.concept_encoding,
        sparse_vectors_supported=stats.sparse_vectors_supported,
        encoder_configured=stats.encoder_configured,
        limits=stats.limits,
        first_stages=[FIRST_STAGE_TO_PROTO[s] for s in stats.first_stages],
    )


# --------------------------------------------------------------------------- client side: responses


def index_result_from_proto(response: search_pb2.IndexResponse) -> IndexResult:
    return IndexResult(
        int(response.indexed), int(response.images), int(response.captions), model_from_proto(response.model), response.request_id
    )


def search_result_from_proto(response: search_pb2.SearchResponse) -> SearchResult:
    hits = [
        SearchHit(
            id=h.id,
            score=h.score,
            first_stage_score=h.first_stage_score,
            first_stage_rank=h.first_stage_rank,
            metadata=json.loads(h.metadata_json) if h.metadata_json else {},
            alignment=[
                WordAlignment(a.word_index, a.word_piece, a.word, list(a.piece_indices), a.region_index, list(a.box), a.similarity)
                for a in h.alignment
            ],
        )
        for h in response.hits
    ]
    return SearchResult(
        hits=hits,
        target=MODALITY_FROM_PROTO[response.target],
        candidates=response.candidates,
        reranked=response.reranked,
        ranking=response.ranking,
        model=model_from_proto(response.model),
        query_word_pieces=list(response.query_word_pieces),
        request_id=response.request_id,
    )


def _optional(tensor: common_pb2.Tensor, present: bool) -> np.ndarray | None:
    return decode(tensor) if present else None


def stored_items_from_proto(response: search_pb2.GetResponse) -> list[StoredItem]:
    return [
        StoredItem(
            id=m.id,
            found=m.found,
            metadata=(json.loads(m.metadata_json) if m.metadata_json else {}) if m.found else None,
            num_concepts=m.num_concepts,
            word_pieces=list(m.word_pieces),
            boxes=_optional(m.boxes, m.HasField("boxes")),
            global_vector=_optional(m.global_vector, m.HasField("global_vector")),
            concepts=_optional(m.concepts, m.HasField("concepts")),
            model=model_from_proto(m.model),
        )
        for m in response.items
    ]


def delete_result_from_proto(response: search_pb2.DeleteResponse) -> DeleteResult:
    return DeleteResult(int(response.deleted), list(response.not_found))


def stats_from_proto(response: search_pb2.StatsResponse) -> Stats:
    return Stats(
        images=int(response.images),
        captions=int(response.captions),
        model=model_from_proto(response.model),
        backend=response.backend,
        server_version=response.server_version,
        uri=response.uri,
        index_type=response.index_type,
        concept_encoding=response.concept_encoding,
        sparse_vectors_supported=response.sparse_vectors_supported,
        encoder_configured=response.encoder_configured,
        limits=dict(response.limits),
        first_stages=[FIRST_STAGE_FROM_PROTO[s] for s in response.first_stages if s in FIRST_STAGE_FROM_PROTO],
    )
