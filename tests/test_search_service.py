"""The search service end to end through real gRPC, against BOTH milvus-lite and the Milvus standalone
server (PyPI `milvus`) on loopback, with a real encoder server on a synthetic model directory."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from encoder_fixtures import build_synthetic_model_dir, image_bytes, make_config
from search_fixtures import (
    expect_error,
    random_unit,
    search_config,
    search_process,
    unique_prefix,
    vector_item,
    vectors_message,
)

from demo.milvus_standalone import MilvusStandalone, drop_collections
from encoder_service.server import ServerThread as EncoderThread
from search_service.server import ServerThread
from teran.alignment_numpy import alignment_scores
from teran.hubness import HubReference
from teran.words import content_words
from teran_api._proto import search_pb2, search_pb2_grpc
from teran_api.encoder_client import EncoderClient
from teran_api.tensors import decode

DIM = 16
CAPTIONS = [
    "a dog runs on the beach",
    "two cats sleep on a red sofa",
    "a man climbs a tall rock wall",
    "children play football in a park",
    "a woman rides a bicycle down the street",
    "a boat on a calm lake at sunset",
]
CODE = grpc.StatusCode

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_synthetic_model_dir(tmp_path_factory.mktemp("search-model") / "model", joint_dim=DIM)


@pytest.fixture(scope="module")
def encoder(model_dir):
    with EncoderThread(make_config(model_dir, max_items=64)) as running:
        yield running


@pytest.fixture(scope="module")
def encoder_client(encoder):
    with EncoderClient(encoder.target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    pytest.importorskip("milvus", reason="the PyPI `milvus` package (Milvus standalone server) is not installed")
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-standalone"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["lite", pytest.param("standalone", marks=pytest.mark.slow)])
def milvus_uri(request, tmp_path_factory):
    if request.param == "lite":
        return str(tmp_path_factory.mktemp("lite") / "search.db")
    return request.getfixturevalue("standalone").uri


class Search:
    """A running search server (ServerThread) with its own collections, and a stub."""

    def __init__(self, uri: str, encoder_target: str, **overrides):
        self.uri = uri
        self.prefix = overrides.pop("collection_prefix", None) or unique_prefix()
        self.config = search_config(uri, encoder_target, collection_prefix=self.prefix, **overrides)
        self.thread = ServerThread(self.config)
        self.channel = grpc.insecure_channel(self.thread.target)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def close(self, drop: bool = True) -> None:
        self.channel.close()
        self.thread.stop()
        if drop:
            drop_collections(self.uri, self.prefix)

    def index(self, items, **kwargs):
        return self.stub.Index(search_pb2.IndexRequest(items=items, **kwargs), timeout=60)

    def search(self, **kwargs):
        return self.stub.Search(search_pb2.SearchRequest(**kwargs), timeout=60)

    def get(self, modality, ids, vectors=False):
        return self.stub.Get(search_pb2.GetRequest(modality=modality, ids=ids, include_vectors=vectors), timeout=60)

    def stats(self):
        return self.stub.Stats(search_pb2.StatsRequest(), timeout=60)


@pytest.fixture
def make_search(milvus_uri, encoder):
    running: list[Search] = []

    def make(**overrides) -> Search:
        search = Search(milvus_uri, encoder.target, **overrides)
        running.append(search)
        return search

    yield make
    for search in running:
        search.close()


@pytest.fixture(scope="module")
def corpus(milvus_uri, encoder):
    """One shared collection pair: 8 images (raw JPEG via the encoder) and the 6 captions."""
    search = Search(milvus_uri, encoder.target)
    images = [
        search_pb2.IndexItem(
            id=f"img{i}", metadata_json=json.dumps({"n": i, "split": "even" if i % 2 == 0 else "odd"}), image=image_bytes(seed=i)
        )
        for i in range(8)
    ]
    captions = [search_pb2.IndexItem(id=f"cap{i}", metadata_json=json.dumps({"n": i}), caption=c) for i, c in enumerate(CAPTIONS)]
    response = search.index(images + captions)
    assert (response.indexed, response.images, response.captions) == (14, 8, 6)
    yield search
    search.close()


def stored_vectors(search: Search, modality, ids):
    items = search.get(modality, ids, vectors=True).items
    assert all(i.found for i in items)
    return {i.id: (decode(i.global_vector), decode(i.concepts).astype(np.float32), i) for i in items}


def snapshot(search: Search, modality, ids):
    """Everything stored about `ids`, comparable across calls."""
    out = []
    for item in search.get(modality, ids, vectors=True).items:
        out.append(
            (
                item.id,
                item.found,
                item.metadata_json,
                item.num_concepts,
                list(item.word_pieces),
                item.global_vector.data,
                item.concepts.data,
            )
        )
    return out


# --------------------------------------------------------------------------- basics


def test_stats_and_get(corpus):
    stats = corpus.stats()
    assert (stats.images, stats.captions) == (8, 6)
    assert stats.model.dimension == DIM and stats.model.name == "synthetic"
    assert stats.backend in ("milvus-lite", "milvus") and stats.encoder_configured
    assert stats.limits["max_index_items"] == 32 and stats.limits["max_concepts"] == 128
    items = corpus.get(search_pb2.IMAGE, ["img3", "nope", "img0"]).items
    assert [(i.id, i.found) for i in items] == [("img3", True), ("nope", False), ("img0", True)]
    assert json.loads(items[0].metadata_json) == {"n": 3, "split": "odd"}
    assert items[0].num_concepts == 49 and tuple(items[0].boxes.shape) == (49, 4)
    caption = corpus.get(search_pb2.CAPTION, ["cap0"], vectors=True).items[0]
    assert list(caption.word_pieces) == ["a", "dog", "runs", "on", "the", "beach"]
    assert tuple(caption.concepts.shape) == (6, DIM) and tuple(caption.global_vector.shape) == (DIM,)


@pytest.mark.parametrize("caption", CAPTIONS[:3] + ["a red dog on a sofa"])
def test_caption_rerank_equals_exhaustive_mrsw(corpus, encoder_client, caption):
    query = encoder_client.encode_captions([caption])[0]
    ids = [f"img{i}" for i in range(8)]
    stored = stored_vectors(corpus, search_pb2.IMAGE, ids)
    regions = [stored[i][1] for i in ids]
    scores = alignment_scores(np.stack(regions), np.ones((8, 49), bool), query.concepts[None], np.ones((1, len(query.word_pieces)), bool))[
        :, 0
    ]
    expected = [ids[i] for i in np.argsort(-scores, kind="stable")[:5]]
    response = corpus.search(caption=caption, top_k=5, rerank_multiplier=2)
    assert response.reranked and response.candidates == 8 and response.target == search_pb2.IMAGE
    assert [h.id for h in response.hits] == expected
    np.testing.assert_allclose([h.score for h in response.hits], np.sort(scores)[::-1][:5], rtol=1e-5, atol=1e-5)
    globals_ = np.stack([stored[i][0] for i in ids])
    first = dict(zip(ids, globals_ @ query.global_vector, strict=True))
    for hit in response.hits:
        assert hit.first_stage_score == pytest.approx(first[hit.id], abs=1e-4)


def test_image_query_rerank_equals_exhaustive_mrsw(corpus, encoder_client):
    data = image_bytes(seed=3)
    query = encoder_client.encode_images([data])[0]
    ids = [f"cap{i}" for i in range(6)]
    stored = stored_vectors(corpus, search_pb2.CAPTION, ids)
    scores = np.array(
        [
            alignment_scores(query.concepts[None], np.ones((1, 49), bool), stored[i][1][None], np.ones((1, len(stored[i][1])), bool))[0, 0]
            for i in ids
        ]
    )
    response = corpus.search(image=data, top_k=6)
    assert response.target == search_pb2.CAPTION
    assert [h.id for h in response.hits] == [ids[i] for i in np.argsort(-scores, kind="stable")]
    np.testing.assert_allclose([h.score for h in response.hits], np.sort(scores)[::-1], rtol=1e-5, atol=1e-5)
    assert response.ranking == "MrSw"  # the synthetic model has no blend weight
    # explanation: the hit caption's content words against the query image's regions (boxes of the query)
    hit = response.hits[0]
    assert [a.word for a in hit.alignment] == [w.text for w in content_words(list(stored[hit.id][2].word_pieces))]
    for a in hit.alignment:
        np.testing.assert_allclose(a.box, query.boxes[a.region_index], atol=1e-6)


def test_explanation_content(corpus, encoder_client):
    caption = "a dog runs on the beach"
    query = encoder_client.encode_captions([caption])[0]
    response = corpus.search(caption=caption, top_k=3)
    assert list(response.query_word_pieces) == query.word_pieces
    for hit in response.hits:
        _g, regions, item = stored_vectors(corpus, search_pb2.IMAGE, [hit.id])[hit.id]
        boxes = decode(item.boxes)
        sims = query.concepts @ regions.T
        # Content words only ("a", "on", "the" left out), each at the region where its pieces' mean cosine is highest.
        assert [(a.word, a.word_piece, a.word_index, list(a.piece_indices)) for a in hit.alignment] == [
            ("dog", "dog", 1, [1]),
            ("runs", "runs", 2, [2]),
            ("beach", "beach", 5, [5]),
        ]
        for a in hit.alignment:
            assert a.region_index == int(sims[a.word_index].argmax())
            assert a.similarity == pytest.approx(float(sims[a.word_index].max()), abs=1e-5)
            np.testing.assert_allclose(a.box, boxes[a.region_index], atol=1e-6)
    assert not corpus.search(caption=caption, top_k=3, skip_explanation=True).hits[0].alignment


def mrsw(regions: np.ndarray, words: np.ndarray) -> float:
    """MrSw of one image's regions [R, D] and one caption's words [W, D] (teran.alignment_numpy)."""
    return float(alignment_scores(regions[None], np.ones((1, len(regions)), bool), words[None], np.ones((1, len(words)), bool))[0, 0])


@pytest.mark.parametrize("query_kind", ["caption", "image"])
def test_blend_ranking_equals_the_exhaustive_blend(corpus, milvus_uri, encoder, encoder_client, query_kind):
    """--ranking blend:W re-ranks by global cosine + W x MrSw, exactly."""
    weight = 0.4
    replica = Search(milvus_uri, encoder.target, collection_prefix=corpus.prefix, ranking=f"blend:{weight}")
    try:
        if query_kind == "caption":
            query = encoder_client.encode_captions(["a dog runs on the beach"])[0]
            ids = [f"img{i}" for i in range(8)]
            stored = stored_vectors(corpus, search_pb2.IMAGE, ids)
            alignment = np.array([mrsw(stored[i][1], query.concepts) for i in ids])
            response = replica.search(caption="a dog runs on the beach", top_k=5, rerank_multiplier=2)
        else:
            data = image_bytes(seed=3)
            query = encoder_client.encode_images([data])[0]
            ids = [f"cap{i}" for i in range(6)]
            stored = stored_vectors(corpus, search_pb2.CAPTION, ids)
            alignment = np.array([mrsw(query.concepts, stored[i][1]) for i in ids])
            response = replica.search(image=data, top_k=5, rerank_multiplier=2)
        cosines = np.stack([stored[i][0] for i in ids]) @ query.global_vector
        blend = cosines + weight * alignment
        assert response.ranking == "blend w=0.4"
        assert [h.id for h in response.hits] == [ids[i] for i in np.argsort(-blend, kind="stable")[:5]]
        np.testing.assert_allclose([h.score for h in response.hits], np.sort(blend)[::-1][:5], rtol=1e-4, atol=1e-4)
    finally:
        replica.close(drop=False)


def test_model_ranking_is_the_encoder_models_blend(milvus_uri, tmp_path):
    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM, name="blended", blend_weight=0.3)
    with EncoderThread(make_config(model_dir)) as encoder, EncoderClient(encoder.target, timeout=30) as client:
        assert client.model_info().blend_weight == pytest.approx(0.3)  # from the manifest, through GetModelInfo
        search = Search(milvus_uri, encoder.target)  # --ranking model (the default)
        explicit = Search(milvus_uri, encoder.target, collection_prefix=search.prefix, ranking="mrsw")
        try:
            items = [search_pb2.IndexItem(id=f"img{i}", image=image_bytes(seed=i)) for i in range(3)]
            assert search.index(items).indexed == 3
            assert search.search(caption="a dog", top_k=2).ranking == "blend w=0.3"
            assert search.search(caption="a dog", top_k=2, disable_rerank=True).ranking == "first stage"
            assert explicit.search(caption="a dog", top_k=2).ranking == "MrSw"
        finally:
            explicit.close(drop=False)
            search.close()


def test_model_ranking_subtracts_the_encoder_models_hub_penalty(milvus_uri, tmp_path):
    """With a hub penalty in the manifest, the service fetches the reference from the encoder, stores each
    item's hub statistic when indexing (raw and vector items) and ranks by blend - weight x statistic."""
    rng = np.random.default_rng(5)
    hub = HubReference(random_unit(rng, 40, DIM), random_unit(rng, 60, DIM), k=3, weight=0.5)
    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM, name="hubbed", blend_weight=0.3, hub_reference=hub)
    with EncoderThread(make_config(model_dir)) as encoder, EncoderClient(encoder.target, timeout=30) as client:
        assert client.model_info().hub_penalty_weight == pytest.approx(0.5)
        served, fetched = client.hub_reference()
        assert (served.name, fetched.k, fetched.weight) == ("hubbed", 3, 0.5)
        np.testing.assert_allclose(fetched.captions, hub.captions, atol=1e-3)  # sent as fp16
        search = Search(milvus_uri, encoder.target)
        try:
            images = [search_pb2.IndexItem(id=f"img{i}", image=image_bytes(seed=i)) for i in range(5)]
            assert search.index(images).indexed == 5
            caption = "a dog runs on the beach"
            query = client.encode_captions([caption])[0]
            ids = [f"img{i}" for i in range(5)]
            stored = stored_vectors(search, search_pb2.IMAGE, ids)
            globals_ = np.stack([stored[i][0] for i in ids])
            blend = globals_ @ query.global_vector + 0.3 * np.array([mrsw(stored[i][1], query.concepts) for i in ids])
            expected = blend - 0.5 * fetched.statistic(globals_, items_are_images=True)
            response = search.search(caption=caption, top_k=5, rerank_multiplier=1)
            assert response.ranking == "blend w=0.3, hub 0.5"
            assert [h.id for h in response.hits] == [ids[i] for i in np.argsort(-expected, kind="stable")]
            np.testing.assert_allclose([h.score for h in response.hits], np.sort(expected)[::-1], atol=1e-4)
            # caption items sent as vectors get their statistic against the reference photos
            cap = client.encode_captions(["two cats sleep on a red sofa"])[0]
            vectors = vectors_message("captions", cap.global_vector, cap.concepts, word_pieces=cap.word_pieces, model=("hubbed", 1, DIM))
            item = search_pb2.IndexItem(id="cap0", vectors=vectors)
            assert search.index([item]).indexed == 1
            photo = client.encode_images([image_bytes(seed=1)])[0]
            hit = search.search(image=image_bytes(seed=1), top_k=1).hits[0]
            want = cap.global_vector @ photo.global_vector + 0.3 * mrsw(photo.concepts, cap.concepts)
            want -= 0.5 * float(fetched.statistic(cap.global_vector[None], items_are_images=False)[0])
            assert hit.id == "cap0" and hit.score == pytest.approx(want, abs=1e-3)
        finally:
            search.close()


def test_rerank_off_and_multiplier(corpus):
    plain = corpus.search(caption="two cats", top_k=4, disable_rerank=True)
    assert not plain.reranked and plain.candidates == 4
    assert [h.score for h in plain.hits] == [h.first_stage_score for h in plain.hits]
    assert [h.first_stage_rank for h in plain.hits] == [0, 1, 2, 3]
    assert sorted((h.score for h in plain.hits), reverse=True) == [h.score for h in plain.hits]
    assert plain.hits[0].alignment  # explained even without the re-rank
    bare = corpus.search(caption="two cats", top_k=4, disable_rerank=True, skip_explanation=True)  # no concepts fetched
    assert [h.id for h in bare.hits] == [h.id for h in plain.hits] and not bare.hits[0].alignment
    small = corpus.search(caption="two cats", top_k=2, rerank_multiplier=2)
    assert small.candidates == 4 and len(small.hits) == 2
    assert {h.id for h in small.hits} <= {h.id for h in plain.hits}  # re-ranks only the first 4 candidates


def test_filters(corpus):
    response = corpus.search(caption="a dog", top_k=8, filter='metadata["split"] == "even"')
    assert {h.id for h in response.hits} == {"img0", "img2", "img4", "img6"}
    assert all(json.loads(h.metadata_json)["split"] == "even" for h in response.hits)
    response = corpus.search(caption="a dog", top_k=8, filter='metadata["n"] >= 5 and id != "img7"')
    assert {h.id for h in response.hits} == {"img5", "img6"}
    assert corpus.search(caption="a dog", top_k=8, filter='metadata["n"] > 100').hits == []
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="a dog", filter='metadata["n"] >>> 2', match="filter:")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="a dog", filter="global_vector == 1", match="unknown name 'global_vector'")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="a dog", filter='metadata["a"] == "x', match="unterminated")
    expect_error(
        CODE.INVALID_ARGUMENT, corpus.search, caption="a dog", filter="id == " + '"x" or ' * 600 + "true", match="--max-filter-chars"
    )


def test_a_malformed_filter_is_refused_before_the_first_item(milvus_uri, encoder):
    """With no collection yet, the filter is still checked by Milvus (on an empty collection of the same fields)."""
    empty = Search(milvus_uri, encoder.target)
    try:
        query = vector_item("q", "captions", DIM, seed=1).vectors
        expect_error(CODE.INVALID_ARGUMENT, empty.search, vectors=query, filter='metadata["n"] >>> 2', match="filter:")
        expect_error(CODE.INVALID_ARGUMENT, empty.search, vectors=query, filter='metadata["a"] == "x', match="unterminated")
        assert empty.search(vectors=query, filter='metadata["n"] >= 5').hits == []  # a good filter: no hits, no error
        assert empty.stats().images == empty.stats().captions == 0  # nothing was created for the data
        # Collections that exist but are empty (their items deleted): a filter Milvus cannot type is still refused.
        empty.index([vector_item("gone", "captions", DIM, seed=2)])
        empty.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.CAPTION, ids=["gone"]), timeout=60)
        expect_error(CODE.INVALID_ARGUMENT, empty.search, vectors=query, filter='id in ["a", 1]', match="filter:")
    finally:
        empty.close()


def test_search_bad_input(corpus):
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, match="query: empty")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="   ", match="caption: empty")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="dog", top_k=51, match="--max-top-k")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, caption="dog", rerank_multiplier=101, match="--max-rerank-multiplier")
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, image=b"not an image", match="image")
    rng = np.random.default_rng(0)
    wrong = vectors_message("captions", random_unit(rng, DIM + 1), random_unit(rng, 3, DIM + 1))
    expect_error(CODE.FAILED_PRECONDITION, corpus.search, vectors=wrong, match="dimension 17")
    scaled_query = vectors_message("captions", rng.random(DIM), random_unit(rng, 3, DIM))
    expect_error(CODE.INVALID_ARGUMENT, corpus.search, vectors=scaled_query, match="vectors.global_vector: L2 norm")


# --------------------------------------------------------------------------- writes


def test_upsert_is_idempotent_and_delete(make_search):
    search = make_search()
    items = [vector_item(f"v{i}", "images", DIM, seed=i, metadata={"v": 1}) for i in range(6)]
    for _ in range(3):  # re-sending never duplicates
        assert search.index(items).indexed == 6
    assert search.stats().images == 6
    changed = vector_item("v2", "images", DIM, seed=99, metadata={"v": 2})
    search.index([changed])
    after = search.get(search_pb2.IMAGE, ["v2"], vectors=True).items[0]
    assert json.loads(after.metadata_json) == {"v": 2}
    np.testing.assert_allclose(decode(after.concepts).astype(np.float32), decode(changed.vectors.concepts), atol=2e-3)
    assert search.stats().images == 6
    query = vectors_message("captions", decode(changed.vectors.global_vector), np.ones((2, DIM), np.float32) / 4)
    assert search.search(vectors=query, top_k=1, disable_rerank=True).hits[0].id == "v2"
    response = search.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.IMAGE, ids=["v2", "v4", "missing"]), timeout=60)
    assert response.deleted == 2 and list(response.not_found) == ["missing"]
    assert search.stats().images == 4
    assert [i.found for i in search.get(search_pb2.IMAGE, ["v2", "v4", "v1"]).items] == [False, False, True]
    assert "v2" not in {h.id for h in search.search(vectors=query, top_k=10).hits}
    expect_error(CODE.INVALID_ARGUMENT, search.stub.Delete, search_pb2.DeleteRequest(modality=search_pb2.IMAGE), match="ids: empty")
    expect_error(CODE.INVALID_ARGUMENT, search.stub.Delete, search_pb2.DeleteRequest(ids=["v1"]), match="modality")


def test_bad_index_requests_leave_store_intact(make_search):
    search = make_search()
    good = [vector_item(f"k{i}", "captions", DIM, seed=i, metadata={"i": i}) for i in range(4)]
    search.index(good)
    ids = [f"k{i}" for i in range(4)]
    before = snapshot(search, search_pb2.CAPTION, ids)
    fresh = vector_item("new", "captions", DIM, seed=50)
    bad_metadata = search_pb2.IndexItem(id="new2", metadata_json="{not json", caption="a dog")
    cases = [
        ([fresh, bad_metadata], CODE.INVALID_ARGUMENT, "items[1].metadata_json: malformed JSON"),
        ([search_pb2.IndexItem(id="new3", metadata_json="[1, 2]", caption="a dog")], CODE.INVALID_ARGUMENT, "must be a JSON object"),
        (
            [search_pb2.IndexItem(id="new4", metadata_json=json.dumps({"x": "y" * 3000}), caption="a")],
            CODE.INVALID_ARGUMENT,
            "--max-metadata-bytes",
        ),
        ([fresh] * 33, CODE.INVALID_ARGUMENT, "--max-index-items"),
        ([], CODE.INVALID_ARGUMENT, "items: empty"),
        ([fresh, fresh], CODE.INVALID_ARGUMENT, "repeats items[0]"),
        ([search_pb2.IndexItem(id="", caption="a dog")], CODE.INVALID_ARGUMENT, "items[0].id: empty id"),
        ([search_pb2.IndexItem(id='a"b', caption="a dog")], CODE.INVALID_ARGUMENT, "double quote"),
        ([search_pb2.IndexItem(id="x" * 600, caption="a dog")], CODE.INVALID_ARGUMENT, "--max-id-length"),
        ([search_pb2.IndexItem(id="nocontent")], CODE.INVALID_ARGUMENT, "no content"),
        ([fresh, search_pb2.IndexItem(id="e", caption=" ")], CODE.INVALID_ARGUMENT, "items[1].caption: empty"),
        ([fresh, search_pb2.IndexItem(id="e", image=b"garbage")], CODE.INVALID_ARGUMENT, "items[1].image"),
        ([fresh, vector_item("d", "captions", DIM + 2, seed=1)], CODE.FAILED_PRECONDITION, "dimension 18"),
        ([fresh, vector_item("m", "captions", DIM, seed=1, model=("other", 3, DIM))], CODE.FAILED_PRECONDITION, "other v3"),
        ([vector_item("k0", "captions", DIM, seed=7, n=200)], CODE.INVALID_ARGUMENT, "--max-concepts"),
        # Values Milvus cannot store fail here, before any write, not halfway through the batch inside Milvus.
        (
            [fresh] + [meta_item(f"b{i}", {"i": i}) for i in range(30)] + [meta_item("big", {"x": 10**30})],
            CODE.INVALID_ARGUMENT,
            "items[31].metadata_json.x: integer 1000000000000000000000000000000 is outside the 64-bit range",
        ),
        ([fresh, meta_item("nan", '{"x": {"y": NaN}}')], CODE.INVALID_ARGUMENT, "items[1].metadata_json: NaN is not a JSON number"),
        ([fresh, meta_item("inf", '{"x": [1, 1e999]}')], CODE.INVALID_ARGUMENT, "items[1].metadata_json.x[1]: number inf is not finite"),
        ([fresh, meta_item("deep", '{"a": ' * 40 + "1" + "}" * 40)], CODE.INVALID_ARGUMENT, "nested 40 levels deep; at most 32"),
        # Vectors must be unit length, as the encoder returns them: a scaled item would top every search.
        (
            [fresh, scaled(vector_item("s", "captions", DIM, seed=3), 100.0)],
            CODE.INVALID_ARGUMENT,
            "items[1].vectors.global_vector: L2 norm 100; vectors must be L2-normalised",
        ),
        (
            [scaled(vector_item("s", "images", DIM, seed=3), 4.8e6, concept_row=2)],
            CODE.INVALID_ARGUMENT,
            "items[0].vectors.concepts: row 2 L2 norm 4.8e+06",
        ),
    ]
    for items, code, match in cases:
        expect_error(code, search.index, items, match=match)
    broken = vector_item("k1", "captions", DIM, seed=7)
    broken.vectors.concepts.data = broken.vectors.concepts.data[:-4]
    expect_error(CODE.INVALID_ARGUMENT, search.index, [broken], match="items[0].vectors.concepts.data")
    nan = vector_item("k2", "captions", DIM, seed=7)
    nan.vectors.global_vector.data = np.full(DIM, np.nan, np.float32).tobytes()
    expect_error(CODE.INVALID_ARGUMENT, search.index, [nan], match="non-finite")
    no_modality = vector_item("k3", "captions", DIM, seed=7)
    no_modality.vectors.modality = search_pb2.MODALITY_UNSPECIFIED
    expect_error(CODE.INVALID_ARGUMENT, search.index, [no_modality], match="items[0].vectors.modality")
    assert snapshot(search, search_pb2.CAPTION, ids) == before
    assert not any(i.found for i in search.get(search_pb2.CAPTION, ["new", "new2", "d", "m", "e", "b0", "b29", "big", "s"]).items)
    assert not search.get(search_pb2.IMAGE, ["s"]).items[0].found
    assert search.stats().captions == 4
    expect_error(CODE.INVALID_ARGUMENT, search.get, search_pb2.CAPTION, [f"x{i}" for i in range(65)], match="--max-ids")
    long_id = "r" * 129
    expect_error(
        CODE.INVALID_ARGUMENT, search.index, [fresh], request_id=long_id, match="request_id: 129 characters exceeds the limit of 128"
    )
    expect_error(CODE.INVALID_ARGUMENT, search.search, caption="a dog", request_id=long_id, match="--max-request-id-chars")
    stream = [search_pb2.IndexRequest(items=[fresh], request_id="ok"), search_pb2.IndexRequest(items=[fresh], request_id=long_id)]
    with pytest.raises(grpc.RpcError) as info:
        search.stub.StreamIndex(iter(stream), timeout=60)
    assert info.value.code() == CODE.INVALID_ARGUMENT
    assert (
        "stream message 1: request_id: 129 characters" in info.value.details()
        and "messages 0..0 (1 items) were stored" in info.value.details()
    )
    search.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.CAPTION, ids=["new"]), timeout=60)


def meta_item(item_id: str, metadata) -> search_pb2.IndexItem:
    item = vector_item(item_id, "captions", DIM, seed=len(item_id))
    item.metadata_json = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return item


def scaled(item: search_pb2.IndexItem, factor: float, concept_row: int | None = None) -> search_pb2.IndexItem:
    """The item with its global vector (or one concept row) multiplied by `factor`."""
    if concept_row is None:
        vector = np.frombuffer(item.vectors.global_vector.data, np.float32) * factor
        item.vectors.global_vector.data = vector.astype(np.float32).tobytes()
    else:
        concepts = np.frombuffer(item.vectors.concepts.data, np.float32).reshape(-1, DIM).copy()
        concepts[concept_row] *= factor
        item.vectors.concepts.data = concepts.tobytes()
    return item


def test_a_failed_write_reports_what_was_stored(make_search, monkeypatch):
    """Milvus refusing the second batch of an Index (its captions, after its images were acknowledged):
    INVALID_ARGUMENT that lists what was stored and says not to retry; a transport failure stays UNAVAILABLE."""
    from pymilvus.exceptions import DataNotMatchException, MilvusUnavailableException

    search = make_search()
    search.index([vector_item("warm", "captions", DIM, seed=1)])  # collections exist
    client = search.thread.server.store.client
    real_upsert = client.upsert
    calls = []

    def second_call_fails(error):
        def upsert(name, rows, *args, **kwargs):
            calls.append(name)
            if len(calls) == 2:
                raise error
            return real_upsert(name, rows, *args, **kwargs)

        return upsert

    images = [vector_item(f"im{i}", "images", DIM, seed=i) for i in range(3)]
    captions = [vector_item(f"ca{i}", "captions", DIM, seed=i) for i in range(2)]
    monkeypatch.setattr(client, "upsert", second_call_fails(DataNotMatchException(message="Integer exceeds 64-bit range")))
    expect_error(
        CODE.INVALID_ARGUMENT,
        search.index,
        images + captions,
        match="3 items were stored before it (modality/id): images/im0, images/im1, images/im2; fix the data, retrying fails",
    )
    assert [i.found for i in search.get(search_pb2.IMAGE, ["im0", "im1", "im2"]).items] == [True] * 3
    assert not any(i.found for i in search.get(search_pb2.CAPTION, ["ca0", "ca1"]).items)

    calls.clear()
    monkeypatch.setattr(client, "upsert", second_call_fails(MilvusUnavailableException(message="connection refused")))
    details = expect_error(CODE.UNAVAILABLE, search.index, images + captions, match="3 items were stored before it")
    assert "(retry: indexing is idempotent) [error id " in details and "the cause is in the service log]" in details
    assert "connection refused" not in details and "Exception" not in details  # Milvus's own text stays in the log
    monkeypatch.setattr(client, "upsert", real_upsert)
    assert search.index(images + captions).indexed == 5


def test_encoder_dimension_mismatch_is_failed_precondition(make_search):
    # collections created for 12-dimensional vectors; the encoder's model has dimension 16
    search = make_search()
    search.index([vector_item("a", "images", 12, seed=1, model=("synthetic", 1, 12))])
    details = expect_error(CODE.FAILED_PRECONDITION, search.index, [search_pb2.IndexItem(id="c", caption="a dog")])
    assert "dimension 16" in details and "dimension 12" in details
    expect_error(CODE.FAILED_PRECONDITION, search.search, caption="a dog", match="dimension 16")
    assert search.stats().captions == 0 and search.stats().images == 1


def test_stream_index(make_search):
    search = make_search()

    def messages(bad_at=None):
        for m in range(3):
            items = [vector_item(f"s{m}_{i}", "captions", DIM, seed=10 * m + i) for i in range(4)]
            if m == bad_at:
                items[1] = search_pb2.IndexItem(id="bad", metadata_json="{", caption="x")
            yield search_pb2.IndexRequest(items=items)

    response = search.stub.StreamIndex(messages(), timeout=60)
    assert (response.indexed, response.captions, response.images) == (12, 12, 0)
    assert search.stub.StreamIndex(messages(), timeout=60).indexed == 12  # idempotent re-send
    assert search.stats().captions == 12
    search2 = make_search()
    details = expect_error(CODE.INVALID_ARGUMENT, search2.stub.StreamIndex, messages(bad_at=1), timeout=60)
    assert "stream message 1: items[1].metadata_json" in details and "messages 0..0 (4 items) were stored" in details
    assert search2.stats().captions == 4


def test_vectors_only_service_and_restart(milvus_uri):
    """No encoder: vectors in, vectors out; a restarted service reads the model back from Milvus."""
    search = Search(milvus_uri, "", model_name="mine", model_version=7)
    try:
        search.index([vector_item(f"q{i}", "images", 8, seed=i) for i in range(5)])
        assert search.stats().model.name == "mine" and search.stats().model.version == 7
        expect_error(CODE.FAILED_PRECONDITION, search.index, [search_pb2.IndexItem(id="c", caption="a dog")], match="--encoder-address")
        search.channel.close()
        search.thread.stop()
        again = Search(milvus_uri, "", collection_prefix=search.prefix)
        stats = again.stats()
        assert (stats.images, stats.model.name, stats.model.version, stats.model.dimension) == (5, "mine", 7, 8)
        rng = np.random.default_rng(1)
        g, c = random_unit(rng, 8), random_unit(rng, 2, 8)
        hits = again.search(vectors=vectors_message("captions", g, c), top_k=5).hits
        assert len(hits) == 5
        again.channel.close()
        again.thread.stop()
    finally:
        drop_collections(milvus_uri, search.prefix)


# --------------------------------------------------------------------------- crash


@pytest.mark.slow  # kills and restarts a service process
def test_crash_mid_stream_loses_nothing_acknowledged(milvus_uri, encoder, tmp_path):
    """SIGKILL the service process while a client streams and indexes; everything acknowledged survives."""
    prefix = unique_prefix("crash")
    args = ["--milvus-uri", milvus_uri, "--collection-prefix", prefix, "--encoder-address", encoder.target, "--log-format", "json"]
    if not milvus_uri.startswith("http"):
        args[1] = str(tmp_path / "crash.db")  # the process owns its milvus-lite file (one process per file)
    acked: dict[str, int] = {}
    process = search_process(args, tmp_path / "search.log")
    try:
        channel = grpc.insecure_channel(process.address)
        stub = search_pb2_grpc.SearchServiceStub(channel)
        # one completed stream (acknowledged as a whole), then unary batches while a stream is open
        first = [
            search_pb2.IndexRequest(items=[vector_item(f"a{m}_{i}", "images", DIM, seed=m * 10 + i) for i in range(5)]) for m in range(2)
        ]
        assert stub.StreamIndex(iter(first), timeout=60).indexed == 10
        acked.update({item.id: 1 for request in first for item in request.items})
        stop = threading.Event()

        def endless():
            m = 0
            while not stop.is_set() and m < 10_000:
                yield search_pb2.IndexRequest(items=[vector_item(f"s{m}_{i}", "images", DIM, seed=1000 + m * 10 + i) for i in range(3)])
                m += 1
                time.sleep(0.01)

        stream_error: list[BaseException] = []

        def run_stream():
            try:
                stub.StreamIndex(endless(), timeout=60)
            except grpc.RpcError as exc:
                stream_error.append(exc)

        streamer = threading.Thread(target=run_stream, daemon=True)
        streamer.start()
        for n in range(200):
            item = vector_item(f"u{n}", "images", DIM, seed=5000 + n, metadata={"n": n})
            stub.Index(search_pb2.IndexRequest(items=[item]), timeout=30)
            acked[item.id] = 1
            if n == 5:
                break
        process.stop(signal.SIGKILL)  # mid-stream
        stop.set()
        streamer.join(30)
        assert stream_error and stream_error[0].code() in (CODE.UNAVAILABLE, CODE.CANCELLED, CODE.UNKNOWN, CODE.INTERNAL)
        channel.close()
        process.start()  # the same service again, on the same port
        channel = grpc.insecure_channel(process.address)
        stub = search_pb2_grpc.SearchServiceStub(channel)
        ids = sorted(acked)
        found = stub.Get(search_pb2.GetRequest(modality=search_pb2.IMAGE, ids=ids, include_vectors=True), timeout=60).items
        assert all(item.found for item in found), [item.id for item in found if not item.found]
        for item in found:  # intact, not just present
            expected = vector_item(item.id, "images", DIM, seed=0)  # shape only
            assert tuple(item.concepts.shape) == tuple(expected.vectors.concepts.shape)
        u3 = next(item for item in found if item.id == "u3")
        assert json.loads(u3.metadata_json) == {"n": 3}
        np.testing.assert_allclose(
            decode(u3.concepts).astype(np.float32), decode(vector_item("u3", "images", DIM, seed=5003).vectors.concepts), atol=2e-3
        )
        stats = stub.Stats(search_pb2.StatsRequest(), timeout=60)
        assert stats.images >= len(acked)  # plus whatever of the broken stream was stored (never duplicated)
        # re-sending the broken stream's first messages completes it without duplicates
        resend = [
            search_pb2.IndexRequest(items=[vector_item(f"s{m}_{i}", "images", DIM, seed=1000 + m * 10 + i) for i in range(3)])
            for m in range(3)
        ]
        stub.StreamIndex(iter(resend), timeout=60)
        stub.StreamIndex(iter(resend), timeout=60)
        after = stub.Stats(search_pb2.StatsRequest(), timeout=60).images
        assert after >= len(acked) + 9 and after <= stats.images + 9
        channel.close()
        assert process.stop() == 0
    finally:
        process.stop(signal.SIGKILL)
        drop_collections(milvus_uri, prefix)


# --------------------------------------------------------------------------- service plumbing


def test_client_auth_health_metrics(milvus_uri, encoder):
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from teran_api.search_client import CAPTION, IMAGE, SearchClient, SearchError
    from teran_api.types import StoredItem

    search = Search(milvus_uri, encoder.target, auth_tokens=["s3cret"], metrics_port=0, metrics_host="127.0.0.1")
    try:
        health = health_pb2_grpc.HealthStub(search.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="teran.v1.SearchService"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
        with SearchClient(search.thread.target) as anonymous, pytest.raises(SearchError) as info:
            anonymous.stats()
        assert info.value.code == CODE.UNAUTHENTICATED
        with SearchClient(search.thread.target, token="s3cret") as client:
            client.index_captions({"c1": "a dog runs on the beach", "c2": "two cats"}, metadata={"c1": {"k": 1}})
            client.index_images({"i1": image_bytes(seed=1), "i2": image_bytes(seed=2)})
            assert (client.stats().images, client.stats().captions) == (2, 2)
            hits = client.search_caption("a dog", top_k=2).hits
            assert {h.id for h in hits} == {"i1", "i2"} and hits[0].alignment
            assert client.search_image(image_bytes(seed=1), top_k=1).hits[0].id in {"c1", "c2"}
            stored = client.get(CAPTION, ["c1", "nope"])
            assert (stored[0].found, stored[0].metadata, stored[0].word_pieces[:2]) == (True, {"k": 1}, ["a", "dog"])
            assert stored[1] == StoredItem("nope", found=False)
            assert client.delete(IMAGE, ["i2"]).deleted == 1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{search.thread.server.metrics_port}/metrics", timeout=10).read().decode()
        assert 'teran_search_requests_total{code="OK",method="Search"}' in metrics
        assert 'teran_search_requests_total{code="UNAUTHENTICATED",method="Stats"}' in metrics
        assert "teran_search_stage_seconds_bucket" in metrics and "teran_search_ready 1.0" in metrics
    finally:
        search.close()


def test_sparse_surrogate_first_stages(make_search):
    """SQ / DP surrogates as Milvus sparse vectors where the backend has them (milvus-lite 3.x, not Milvus 2.3)."""
    search = make_search(sparse_surrogates=["sq", "dp"], dp_keep=8)
    items = [vector_item(f"p{i}", "images", DIM, seed=i, metadata={"i": i}) for i in range(10)]
    search.index(items)
    stats = search.stats()
    query_item = items[4].vectors
    query = vectors_message("captions", decode(query_item.global_vector), decode(query_item.concepts))
    if not stats.sparse_vectors_supported:
        assert list(stats.first_stages) == [search_pb2.DENSE]
        expect_error(CODE.FAILED_PRECONDITION, search.search, vectors=query, first_stage=search_pb2.SCALAR_QUANTIZATION, match="sparse")
        return
    assert list(stats.first_stages) == [search_pb2.DENSE, search_pb2.SCALAR_QUANTIZATION, search_pb2.DEEP_PERMUTATION]
    for stage in (search_pb2.SCALAR_QUANTIZATION, search_pb2.DEEP_PERMUTATION):
        plain = search.search(vectors=query, top_k=3, first_stage=stage, disable_rerank=True)
        assert plain.hits[0].id == "p4"  # a vector's own surrogate scores highest
        assert plain.hits[0].first_stage_score > plain.hits[1].first_stage_score
        reranked = search.search(vectors=query, top_k=3, first_stage=stage, rerank_multiplier=4, filter='metadata["i"] != 4')
        assert "p4" not in {h.id for h in reranked.hits} and len(reranked.hits) == 3
    # the layout (surrogates and their parameters) is read back from Milvus by a restarted service
    again = make_search(collection_prefix=search.prefix)
    assert list(again.stats().first_stages) == list(stats.first_stages)
    assert again.search(vectors=query, top_k=1, first_stage=search_pb2.DEEP_PERMUTATION, disable_rerank=True).hits[0].id == "p4"


# --------------------------------------------------------------------------- re-rank cache


def cache_of(search: Search):
    cache = search.thread.server.cache
    assert cache is not None
    assert cache.loaded.wait(60)
    return cache


def cached_concepts(search: Search, modality: str, ids):
    """id -> (stamp, float16 [N, D]) as the cache holds them (None when absent)."""
    cache = cache_of(search)
    out = {}
    with cache._lock:
        m = cache._modalities.get(modality)
        for i in ids:
            entry = m.index.get(i) if m else None
            out[i] = None if entry is None else (entry[2], m.rows[entry[0] : entry[0] + entry[1]].copy())
    return out


def assert_cache_matches_milvus(search: Search, modality: str, ids, complete: bool = True):
    """Every cached entry is exactly what Milvus stores (fp16 bytes) at the row's current stamp; complete: every row is cached."""
    store = search.thread.server.store
    stored = store.concepts(modality, list(ids))
    cached = cached_concepts(search, modality, ids)
    for i in ids:
        if i not in stored:
            assert cached[i] is None, i
            continue
        if cached[i] is None and not complete:
            continue
        assert cached[i] is not None, i
        stamp, concepts = cached[i]
        assert stamp == stored[i].stamp != 0
        np.testing.assert_array_equal(concepts, stored[i].concepts)


def hit_tuples(response):
    return [
        (h.id, h.score, h.first_stage_score, h.metadata_json, [(t.word_index, t.region_index, t.similarity) for t in h.alignment])
        for h in response.hits
    ]


def caption_queries(count: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    out = []
    for q in range(count):
        n = 2 + q % 4
        out.append(vectors_message("captions", random_unit(rng, DIM), random_unit(rng, n, DIM), word_pieces=[f"q{j}" for j in range(n)]))
    return out


def image_items(prefix: str, count: int, seed: int = 0, **kwargs):
    return [vector_item(f"{prefix}{i}", "images", DIM, seed=seed + i, n=3 + i % 5, metadata={"i": i}, **kwargs) for i in range(count)]


def test_rerank_cache_follows_index_upsert_delete(make_search):
    search = make_search()
    items = image_items("c", 12)
    search.index(items)
    plain = make_search(collection_prefix=search.prefix, rerank_cache_mb=0)  # the same collections, no cache
    assert plain.thread.server.cache is None
    captions = [vector_item(f"t{i}", "captions", DIM, seed=50 + i, n=2 + i) for i in range(3)]
    search.index(captions)
    ids = [f"c{i}" for i in range(12)]
    assert cache_of(search).items("images") == 12 and cache_of(search).items("captions") == 3
    assert_cache_matches_milvus(search, "images", ids)
    assert_cache_matches_milvus(search, "captions", ["t0", "t1", "t2"])
    before = {i: s for i, (s, _) in cached_concepts(search, "images", ids).items()}
    # upsert: new concepts (and a new concept count) replace the cached ones, with a new stamp
    search.index([vector_item("c3", "images", DIM, seed=999, n=7, metadata={"i": "new"})])
    after = cached_concepts(search, "images", ["c3"])["c3"]
    assert after[0] != before["c3"] and after[1].shape == (7, DIM)
    assert_cache_matches_milvus(search, "images", ids)
    # delete: gone from the cache
    search.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.IMAGE, ids=["c5", "c6"]), timeout=60)
    assert cached_concepts(search, "images", ["c5", "c6"]) == {"c5": None, "c6": None}
    assert cache_of(search).items("images") == 10
    assert_cache_matches_milvus(search, "images", ids)
    # searches: identical to the service without a cache, served from the cache alone (no misses)
    misses = cache_of(search).misses
    for query in caption_queries(4):
        for multiplier in (1, 3):
            got = search.search(vectors=query, top_k=4, rerank_multiplier=multiplier)
            assert hit_tuples(got) == hit_tuples(plain.search(vectors=query, top_k=4, rerank_multiplier=multiplier))
            assert not {"c5", "c6"} & {h.id for h in got.hits}
    assert cache_of(search).misses == misses and cache_of(search).hits > 0
    # an image query re-ranks cached captions
    image_query = items[0].vectors
    query = vectors_message("images", decode(image_query.global_vector), decode(image_query.concepts), boxes=decode(image_query.boxes))
    assert hit_tuples(search.search(vectors=query, top_k=3)) == hit_tuples(plain.search(vectors=query, top_k=3))


def test_rerank_cache_rebuilt_from_milvus_on_restart(make_search):
    first = make_search()
    first.index(image_items("r", 20))
    first.index([vector_item("r7", "images", DIM, seed=77, n=4)])  # an upsert before the restart
    first.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.IMAGE, ids=["r9"]), timeout=60)
    queries = caption_queries(3, seed=11)
    expected = [hit_tuples(first.search(vectors=q, top_k=5, rerank_multiplier=4)) for q in queries]
    first.close(drop=False)
    again = make_search(collection_prefix=first.prefix)
    cache = cache_of(again)  # loaded from Milvus by the query iterator
    ids = [f"r{i}" for i in range(20)]
    assert cache.items("images") == 19 and cache.stats()["state"] == "ready"
    assert_cache_matches_milvus(again, "images", ids)
    assert [hit_tuples(again.search(vectors=q, top_k=5, rerank_multiplier=4)) for q in queries] == expected
    assert cache.misses == 0


def test_rerank_cache_memory_limit_falls_back_to_milvus(make_search):
    """A limit below the collection: part is cached, misses are fetched from Milvus, results identical to no cache."""
    items = image_items("m", 24)
    row_bytes = 2 * DIM
    total_rows = sum(3 + i % 5 for i in range(24))
    limit_mib = (total_rows // 2) * row_bytes / 2**20  # room for about half of the concept rows
    search = make_search(rerank_cache_mb=limit_mib)
    search.index(items)
    plain = make_search(collection_prefix=search.prefix, rerank_cache_mb=0)
    cache = cache_of(search)
    assert cache.full and 0 < cache.items("images") < 24
    assert cache.bytes() <= limit_mib * 2**20
    assert_cache_matches_milvus(search, "images", [f"m{i}" for i in range(24)], complete=False)
    for query in caption_queries(5, seed=3):
        assert hit_tuples(search.search(vectors=query, top_k=6, rerank_multiplier=4)) == hit_tuples(
            plain.search(vectors=query, top_k=6, rerank_multiplier=4)
        )
    assert cache.misses > 0 and cache.hits > 0
    assert search.thread.server.metrics.cache_full._value.get() == 1
    # restart with the same limit: the load stops at the limit, results still identical
    restarted = make_search(collection_prefix=search.prefix, rerank_cache_mb=limit_mib)
    again = cache_of(restarted)
    assert again.full and 0 < again.items("images") < 24
    query = caption_queries(1, seed=9)[0]
    assert hit_tuples(restarted.search(vectors=query, top_k=24, rerank_multiplier=1)) == hit_tuples(
        plain.search(vectors=query, top_k=24, rerank_multiplier=1)
    )


def test_rerank_cache_sees_writes_of_another_replica(make_search):
    """Replica B caches; replica A rewrites and deletes rows: B's stale entries are never served (stamp check), and
    a refresh drops them / loads A's new rows."""
    from search_service import cache as rerank_cache

    a = make_search()
    a.index(image_items("x", 10))
    b = make_search(collection_prefix=a.prefix)
    b_cache = cache_of(b)
    assert b_cache.items("images") == 10
    old_stamp = cached_concepts(b, "images", ["x2"])["x2"][0]
    a.index([vector_item("x2", "images", DIM, seed=500, n=6, metadata={"i": "rewritten"})])
    a.stub.Delete(search_pb2.DeleteRequest(modality=search_pb2.IMAGE, ids=["x4"]), timeout=60)
    a.index([vector_item("x10", "images", DIM, seed=501, n=3)])
    query = vectors_message("captions", decode(a.get(search_pb2.IMAGE, ["x2"], vectors=True).items[0].global_vector), np.eye(DIM)[:3])
    got_a, got_b = (s.search(vectors=query, top_k=11, rerank_multiplier=1) for s in (a, b))
    assert hit_tuples(got_b) == hit_tuples(got_a)
    assert json.loads({h.id: h.metadata_json for h in got_b.hits}["x2"]) == {"i": "rewritten"} and "x4" not in {h.id for h in got_b.hits}
    assert cached_concepts(b, "images", ["x2"])["x2"][0] != old_stamp  # the miss re-cached the new version
    assert_cache_matches_milvus(b, "images", ["x2", "x10"])
    # B learnt nothing of x4's delete until a refresh (a stale entry costs memory, it is never served)
    assert cached_concepts(b, "images", ["x4"])["x4"] is not None
    result = rerank_cache.refresh(b_cache, b.thread.server.store, ("images", "captions"), threading.Event())
    assert result["images"]["dropped"] == 1 and result["images"]["rows"] == 10
    assert cached_concepts(b, "images", ["x4"])["x4"] is None
    assert_cache_matches_milvus(b, "images", [f"x{i}" for i in range(11)])


# --------------------------------------------------------------------------- transport security


def test_tls_on_the_search_port_and_mutual_tls_to_the_encoder(tmp_path):
    """The search service serves TLS (--tls-cert/--tls-key) and reaches an encoder that requires client
    certificates with --encoder-root-cert and --encoder-client-cert/--encoder-client-key."""
    from encoder_fixtures import self_signed_cert

    from teran_api.search_client import SearchClient, SearchError

    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    cert, key = self_signed_cert(tmp_path / "server")
    client_cert, client_key = self_signed_cert(tmp_path / "client")
    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM)
    encoder_config = make_config(model_dir, tls_cert=cert, tls_key=key, tls_client_ca=client_cert)
    with EncoderThread(encoder_config, warmup=False) as encoder:
        encoder_target = f"localhost:{encoder.port}"
        tls = {"tls_cert": cert, "tls_key": key, "encoder_root_cert": cert}
        config = search_config(
            str(tmp_path / "tls.db"), encoder_target, **tls, encoder_client_cert=client_cert, encoder_client_key=client_key
        )
        with ServerThread(config) as search:
            target = f"localhost:{search.port}"
            with SearchClient(target, root_cert=cert, timeout=60) as client:
                assert client.index_images({"img1": image_bytes(seed=1)}).indexed == 1  # encoded over mutual TLS
                assert [h.id for h in client.search_caption("a dog", top_k=1).hits] == ["img1"]
            with SearchClient(target, timeout=3) as plaintext, pytest.raises(SearchError) as info:
                plaintext.stats()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
        # Without a client certificate the encoder refuses the handshake: the search service says so.
        config = search_config(str(tmp_path / "no-client-cert.db"), encoder_target, **tls, encoder_timeout_s=5)
        with ServerThread(config) as search, SearchClient(f"localhost:{search.port}", root_cert=cert, timeout=60) as client:
            with pytest.raises(SearchError) as info:
                client.index_images({"img1": image_bytes(seed=1)})
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "encoder call failed" in info.value.details
            assert str(encoder.port) not in info.value.details and "error id" in info.value.details  # the address stays in the log
            assert client.stats().images == 0  # nothing stored


def wait_for_health(search: Search, status: str, timeout: float = 60.0) -> None:
    """Poll grpc.health.v1 until the overall status is `status` (SERVING / NOT_SERVING)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(search.channel)
    wanted = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    deadline = time.monotonic() + timeout
    while stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == wanted


@pytest.mark.slow  # kills and restarts its own Milvus standalone server
def test_milvus_restart_health_follows_and_reads_recover_by_themselves(tmp_path):
    """Milvus killed under a running service: health NOT_SERVING while it is down; once it answers
    again the service loads its collections again and reads work at once (a restarted Milvus
    releases them: reads failed with "collection not loaded" before); nothing acknowledged is lost."""
    pytest.importorskip("milvus")
    milvus = MilvusStandalone(tmp_path / "milvus")
    search = None
    try:
        search = Search(milvus.uri, "", milvus_health_interval_s=0.5, milvus_timeout_s=5)
        ids = [f"img{i}" for i in range(8)]
        assert search.index([vector_item(i, "images", DIM, seed=n) for n, i in enumerate(ids)]).indexed == 8
        milvus.kill()
        wait_for_health(search, "NOT_SERVING")
        milvus.restart()
        wait_for_health(search, "SERVING")
        found = search.get(search_pb2.IMAGE, ids).items
        assert [i.found for i in found] == [True] * 8 and search.stats().images == 8
        query = vector_item("q", "captions", DIM, seed=99).vectors
        assert {h.id for h in search.search(vectors=query, top_k=3).hits} <= set(ids)
        assert len(search.search(vectors=query, top_k=3, filter='id != "img0"').hits) == 3  # filters checked again too
    finally:
        if search is not None:
            search.close(drop=False)
        milvus.stop()


def test_a_refused_encoder_token_makes_the_service_not_ready_until_it_is_accepted(tmp_path, monkeypatch):
    """A wrong --encoder-token is a configuration error: health NOT_SERVING (the replica leaves the load
    balancer), requests that need the encoder get FAILED_PRECONDITION naming the flag (not a retryable
    UNAVAILABLE), and health returns to SERVING once the encoder accepts the service's credentials."""
    import asyncio

    from search_service import server as search_server
    from teran_api.encoder_client import AsyncEncoderClient

    monkeypatch.setattr(search_server, "ENCODER_RECHECK_S", 0.2)
    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM)
    with EncoderThread(make_config(model_dir, auth_tokens=["right"]), warmup=False) as encoder:
        search = Search(str(tmp_path / "token.db"), encoder.target, encoder_token="wrong")
        try:
            wait_for_health(search, "NOT_SERVING")  # found by the probe at start, before any request
            with pytest.raises(grpc.RpcError) as info:
                search.index([search_pb2.IndexItem(id="img1", image=image_bytes(seed=1))])
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--encoder-token" in info.value.details() and "UNAUTHENTICATED" in info.value.details()
            assert search.stats().images == 0

            async def fix_credentials():  # as a rotated secret would: the service now presents the right token
                server = search.thread.server
                old = server.encoder
                server.encoder = server.searcher.encoder = AsyncEncoderClient(encoder.target, token="right", timeout=30)
                await old.close()

            asyncio.run_coroutine_threadsafe(fix_credentials(), search.thread.loop).result(10)
            wait_for_health(search, "SERVING")
            assert search.index([search_pb2.IndexItem(id="img1", image=image_bytes(seed=1))]).indexed == 1
        finally:
            search.close()
