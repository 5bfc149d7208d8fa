"""The Searcher without gRPC, on real milvus-lite: index, search, get, delete and stats with typed
values, and its refusals as typed errors (the gRPC status of each is tested in test_search_service)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from search_fixtures import DirectSearch, random_unit, vectors_value

from search_service.errors import InvalidRequest, PreconditionFailed
from search_service.layout import ModelMismatch
from search_service.ranking import mrsw_scores
from teran_api.types import IndexItem, Modality, ModelRef, SearchResult, StoredItem

DIM = 8
MODEL = ("m", 1, DIM)


@pytest.fixture
def direct(tmp_path):
    search = DirectSearch(str(tmp_path / "direct.db"))
    yield search
    search.close()


def image(item_id: str, seed: int, n: int = 4) -> IndexItem:
    rng = np.random.default_rng(seed)
    vectors = vectors_value("images", random_unit(rng, DIM), random_unit(rng, n, DIM), boxes=rng.random((n, 4)), model=MODEL)
    return IndexItem(item_id, vectors, json.dumps({"seed": seed}))


def test_index_search_get_delete_stats(direct):
    items = [image(f"img{i}", i) for i in range(6)]
    result = direct.index(items)
    assert (result.indexed, result.images, result.captions, result.model) == (6, 6, 0, ModelRef(*MODEL))
    rng = np.random.default_rng(99)
    words = random_unit(rng, 3, DIM)
    query = vectors_value("captions", random_unit(rng, DIM), words, word_pieces=["a", "red", "dog"], model=MODEL)
    found = direct.search(query, top_k=3, rerank_multiplier=2)
    assert isinstance(found, SearchResult) and found.target is Modality.IMAGE and found.candidates == 6
    # re-ranked by MrSw (no encoder: no model ranking) over every candidate: the exhaustive top 3
    regions = [np.asarray(item.content.concepts, np.float16).astype(np.float32) for item in items]  # stored as fp16
    exhaustive = mrsw_scores(words, True, regions)
    assert [h.id for h in found.hits] == [f"img{i}" for i in np.argsort(-exhaustive, kind="stable")[:3]]
    assert [h.score for h in found.hits] == pytest.approx(sorted(exhaustive, reverse=True)[:3], abs=1e-5)
    assert [a.word for a in found.hits[0].alignment] == ["red", "dog"]  # content words, "a" left out
    assert found.hits[0].metadata == {"seed": int(found.hits[0].id[3:])}

    got = direct.loop.run_until_complete(direct.searcher.get(Modality.IMAGE, ["img2", "nope", "img2"], include_vectors=True))
    assert [g.id for g in got] == ["img2", "nope", "img2"] and got[1] == StoredItem("nope", found=False)
    assert got[0].num_concepts == 4 and got[0].concepts.shape == (4, DIM) and got[0].model == ModelRef(*MODEL)
    deleted = direct.loop.run_until_complete(direct.searcher.delete(Modality.IMAGE, ["img2", "nope"]))
    assert (deleted.deleted, deleted.not_found) == (1, ["nope"])
    assert direct.stats().images == 5


def test_refusals_are_typed_and_name_the_field(direct):
    direct.index([image("img0", 0)])
    cases = [
        ([IndexItem("", "x")], InvalidRequest, "items[0].id: empty id"),
        ([image("a", 1), image("a", 2)], InvalidRequest, "items[1].id: 'a' repeats items[0]"),
        ([IndexItem("c", "a caption")], PreconditionFailed, "items[0].caption: raw images and captions need an encoder"),
        ([IndexItem("m", image("m", 3).content, "[1]")], InvalidRequest, "items[0].metadata_json"),
        ([], InvalidRequest, "items: empty; give 1..32 items"),
    ]
    for items, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            direct.index(items)
    other = vectors_value("captions", random_unit(np.random.default_rng(1), DIM), random_unit(np.random.default_rng(2), 2, DIM))
    other.model = ModelRef("other", 2, DIM)
    with pytest.raises(ModelMismatch):
        direct.search(other)
    with pytest.raises(InvalidRequest, match=r"top_k: 51; give 1\.\.50"):
        direct.search(image("q", 4).content, top_k=51)
    with pytest.raises(InvalidRequest, match="modality: set IMAGE or CAPTION"):
        direct.loop.run_until_complete(direct.searcher.get(None, ["img0"]))
    assert direct.stats().images == 1  # nothing refused was stored
