import numpy as np

from demo.ranking import Gallery, rank
from teran.alignment_numpy import alignment_scores


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _images(rng, n=30, regions=6, dim=8):
    concepts = [_unit(rng.normal(size=(regions, dim))) for _ in range(n)]
    return Gallery.build(
        ids=[f"img{i}" for i in range(n)],
        globals_=[_unit(rng.normal(size=dim)) for _ in range(n)],
        concepts=concepts,
        labels=[[f"region {k}" for k in range(regions)] for _ in range(n)],
        boxes=[rng.random((regions, 4)).astype(np.float32) for _ in range(n)],
    )


def test_full_first_stage_rerank_equals_exhaustive_mrsw():
    rng = np.random.default_rng(0)
    gallery = _images(rng)
    words = _unit(rng.normal(size=(4, 8)))
    hits = rank(_unit(rng.normal(size=8)), words, ["a", "red", "##dish", "dog"], gallery, top_k=5, rerank_multiplier=6)
    exhaustive = alignment_scores(gallery.concepts, gallery.mask, words[None], np.ones((1, 4), bool))[:, 0]
    assert [h.id for h in hits] == [gallery.ids[i] for i in np.argsort(-exhaustive)[:5]]
    np.testing.assert_allclose([h.score for h in hits], np.sort(exhaustive)[::-1][:5], rtol=1e-5)
    best = hits[0]
    index = gallery.ids.index(best.id)
    assert [m.word for m in best.matches] == ["a", "red", "##dish", "dog"]
    for match, word in zip(best.matches, words, strict=True):
        sims = gallery.concepts[index] @ word
        assert match.target == int(np.argmax(sims)) and np.isclose(match.similarity, sims.max(), atol=1e-5)
        np.testing.assert_array_equal(match.box, gallery.boxes[index][match.target])


def test_first_stage_limits_candidates_and_reports_its_score():
    rng = np.random.default_rng(1)
    gallery = _images(rng)
    query = gallery.globals_[3]
    hits = rank(query, _unit(rng.normal(size=(3, 8))), ["x", "y", "z"], gallery, top_k=1, rerank_multiplier=1)
    assert hits[0].id == "img3" and np.isclose(hits[0].first_stage, 1.0, atol=1e-5)


def test_gallery_round_trips_through_arrays():
    rng = np.random.default_rng(2)
    gallery = _images(rng, n=3)
    again = Gallery.from_arrays(gallery.to_arrays("images"), "images")
    assert again.ids == gallery.ids and again.labels == gallery.labels
    np.testing.assert_allclose(again.concepts, gallery.concepts, atol=1e-3)
    np.testing.assert_array_equal(again.mask, gallery.mask)
