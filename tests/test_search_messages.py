"""teran_api.search_messages: the typed values survive the wire both ways, and requests decoded on the
service side are bounded by their declared sizes before their bytes are copied."""

from __future__ import annotations

import numpy as np
import pytest

from teran.errors import TeranInputError
from teran_api import search_messages as messages
from teran_api._proto import search_pb2
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
    WordAlignment,
)

MODEL = ModelRef("teran", 3, 4)


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def wire(message):
    """Serialise and parse again, as a real call does."""
    return type(message).FromString(message.SerializeToString())


def test_index_items_round_trip_every_kind_of_content():
    rng = np.random.default_rng(0)
    image_vectors = Vectors(Modality.IMAGE, unit(rng, 4), unit(rng, 3, 4), boxes=rng.random((3, 4), np.float32), model=MODEL)
    caption_vectors = Vectors(Modality.CAPTION, unit(rng, 4), unit(rng, 2, 4).astype(np.float16), word_pieces=["a", "dog"])
    regions = RegionFeatures(rng.random((5, 6), np.float32), rng.random((5, 4), np.float32) * 100, 640, 480)
    items = [
        IndexItem("c", "a dog runs", '{"k": 1}'),
        IndexItem("i", b"\xff\xd8jpeg bytes"),
        IndexItem("r", regions),
        IndexItem("v1", image_vectors),
        IndexItem("v2", caption_vectors),
        IndexItem("none", None),
    ]
    request = wire(search_pb2.IndexRequest(items=[messages.index_item_to_proto(item) for item in items]))
    # fp16 concepts travel as FLOAT16, the rest as FLOAT32
    assert request.items[4].vectors.concepts.dtype == 2 and request.items[3].vectors.concepts.dtype == 1
    back = messages.index_items_from_proto(request, max_concepts=8)
    assert [b.id for b in back] == [i.id for i in items]
    assert back[0].content == "a dog runs" and back[0].metadata_json == '{"k": 1}'
    assert back[1].content == b"\xff\xd8jpeg bytes" and back[5].content is None
    r = back[2].content
    assert isinstance(r, RegionFeatures) and (r.width, r.height) == (640, 480)
    np.testing.assert_array_equal(r.features, regions.features)
    v1, v2 = back[3].content, back[4].content
    assert isinstance(v1, Vectors) and isinstance(v2, Vectors)
    assert (v1.modality, v1.model, v1.word_pieces) == (Modality.IMAGE, MODEL, [])
    np.testing.assert_array_equal(v1.concepts, image_vectors.concepts)
    np.testing.assert_array_equal(v1.boxes, image_vectors.boxes)
    assert (v2.modality, v2.model, v2.boxes, v2.word_pieces) == (Modality.CAPTION, None, None, ["a", "dog"])
    np.testing.assert_array_equal(v2.concepts, caption_vectors.concepts.astype(np.float32))


def test_search_query_round_trip_and_unknown_first_stage():
    rng = np.random.default_rng(1)
    query = SearchQuery(
        Vectors(Modality.CAPTION, unit(rng, 4), unit(rng, 2, 4)),
        top_k=7,
        filter='metadata["k"] == 1',
        rerank_multiplier=3,
        disable_rerank=True,
        skip_explanation=True,
        request_id="r-1",
        first_stage=FirstStage.BAG_OF_CONCEPTS,
    )
    back = messages.search_query_from_proto(wire(messages.search_query_to_proto(query)), max_concepts=8)
    assert (back.top_k, back.filter, back.rerank_multiplier, back.disable_rerank, back.skip_explanation, back.request_id) == (
        7, 'metadata["k"] == 1', 3, True, True, "r-1",
    )  # fmt: skip
    assert back.first_stage is FirstStage.BAG_OF_CONCEPTS
    assert messages.search_query_from_proto(search_pb2.SearchRequest(caption="x"), 8).query == "x"
    with pytest.raises(TeranInputError, match="first_stage: unknown value 9"):
        messages.search_query_from_proto(search_pb2.SearchRequest(caption="x", first_stage=9), 8)


def test_vectors_are_bounded_by_their_declared_shape_before_decoding():
    message = search_pb2.Vectors(modality=search_pb2.IMAGE)
    message.global_vector.shape[:] = [4]
    message.global_vector.data = np.ones(4, np.float32).tobytes()
    message.concepts.shape[:] = [1000, 4]  # declared; no data sent
    with pytest.raises(TeranInputError, match=r"vectors.concepts: 1000 concept vectors exceeds the limit of 8 \(--max-concepts\)"):
        messages.vectors_from_proto(message, "vectors", max_concepts=8)
    message.global_vector.shape[:] = [0]
    message.global_vector.data = b""
    with pytest.raises(TeranInputError, match="vectors.global_vector: empty"):
        messages.vectors_from_proto(message, "vectors", max_concepts=8)
    unset = search_pb2.Vectors()
    unset.global_vector.shape[:] = [1]
    unset.global_vector.data = np.ones(1, np.float32).tobytes()
    unset.concepts.shape[:] = [1, 1]
    unset.concepts.data = np.ones(1, np.float32).tobytes()
    assert messages.vectors_from_proto(unset, "v", 8).modality is None  # refused by the Searcher, which names the field


def test_results_round_trip():
    rng = np.random.default_rng(2)
    hit = SearchHit(
        "img1", 1.5, 0.25, 3, {"caption": "ein Hund", "n": 1}, [WordAlignment(0, "do", "dog", [0, 1], 4, [0.1, 0.2, 0.3, 0.4], 0.5)]
    )
    result = SearchResult([hit], Modality.IMAGE, 30, True, "blend:0.5", MODEL, ["do", "##g"], "r")
    back = messages.search_result_from_proto(wire(messages.search_result_to_proto(result)))
    assert back.hits[0].alignment[0].box == pytest.approx([0.1, 0.2, 0.3, 0.4])
    back.hits[0].alignment[0].box = hit.alignment[0].box
    assert back == result
    empty = SearchResult([], Modality.CAPTION, 0, False, "first stage", None)
    assert messages.search_result_from_proto(wire(messages.search_result_to_proto(empty))) == empty

    index = IndexResult(3, 1, 2, MODEL, "req")
    assert messages.index_result_from_proto(wire(messages.index_result_to_proto(index))) == index
    delete = DeleteResult(1, ["gone"])
    assert messages.delete_result_from_proto(wire(messages.delete_result_to_proto(delete))) == delete
    stats = Stats(5, 6, MODEL, "milvus-lite", "2.5", "x.db", "FLAT", "fp16", True, False, {"max_top_k": 100}, [FirstStage.DENSE])
    assert messages.stats_from_proto(wire(messages.stats_to_proto(stats))) == stats

    concepts = unit(rng, 2, 4).astype(np.float16)
    found = StoredItem("c1", True, {"k": 1}, 2, ["a", "b"], None, unit(rng, 4), concepts, MODEL)
    missing = StoredItem("c2", found=False)
    back_found, back_missing = messages.stored_items_from_proto(wire(messages.stored_items_to_proto([found, missing])))
    assert back_missing == missing
    assert (back_found.metadata, back_found.num_concepts, back_found.word_pieces, back_found.model) == ({"k": 1}, 2, ["a", "b"], MODEL)
    assert back_found.boxes is None and back_found.concepts is not None and back_found.concepts.dtype == np.float16
    np.testing.assert_array_equal(back_found.concepts, concepts)
