"""bench/bench_search.py: its exhaustive reference is the service's re-rank score, and the agreement part runs
end to end (both directions, milvus-lite, in-process service) on small synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import load_bench

from search_service.ranking import Ranking, rerank_scores
from teran.hubness import HubReference
from teran.manifest import load_manifest


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_search")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_images: int = 12, per_image: int = 5, regions: int = 4, dim: int = 16, seed: int = 0) -> dict:
    """Encoder-like data: captions near their image (so recall means something), ragged word-piece counts."""
    rng = np.random.default_rng(seed)
    image_concepts = unit(rng.normal(size=(n_images, regions, dim)))
    image_global = unit(image_concepts.mean(axis=1) + 0.3 * rng.normal(size=(n_images, dim)))
    owners = np.repeat(np.arange(n_images), per_image)
    lengths = rng.integers(2, 7, size=len(owners))
    words = np.zeros((len(owners), int(lengths.max()), dim), np.float32)
    caption_global = np.zeros((len(owners), dim), np.float32)
    for c, (owner, n) in enumerate(zip(owners, lengths, strict=True)):
        picked = image_concepts[owner, rng.integers(0, regions, size=n)]
        words[c, :n] = unit(picked + 0.8 * rng.normal(size=(n, dim)))
        caption_global[c] = unit(image_global[owner] + 0.8 * rng.normal(size=dim))
    boxes = np.sort(rng.uniform(size=(n_images, regions, 4)).astype(np.float32), axis=-1)
    return {
        "image_global": image_global,
        "image_concepts": image_concepts,
        "image_boxes": boxes,
        "caption_global": caption_global,
        "caption_concepts": words,
        "caption_lengths": lengths,
        "caption_owner": owners,
        "model": np.array(["bench-test", "1", str(dim)]),
        "blend_weight": 0.3,
    }


def fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def reference_of(data: dict, weight: float | None, k: int = 3) -> HubReference:
    """A hub reference for `data`: random unit vectors of its dimension, the given weight."""
    rng = np.random.default_rng(9)
    dim = data["image_global"].shape[1]
    return HubReference(unit(rng.normal(size=(7, dim))), unit(rng.normal(size=(11, dim))), k=k, weight=weight)


@pytest.mark.parametrize(("weight", "hub_weight"), [(None, None), (0.3, None), (1.0, None), (0.3, 0.5)])
def test_reference_is_the_service_rerank_score_in_both_directions(bench, weight, hub_weight):
    data = synthetic()
    hub = reference_of(data, hub_weight) if hub_weight is not None else None
    ranking = Ranking(weight, hub)
    scores, cosines = bench.reference_scores(data, ranking, chunk=5)
    lengths = data["caption_lengths"]
    images = data["image_concepts"].astype(np.float16)
    zeros = (np.zeros(len(images), np.float32), np.zeros(len(lengths), np.float32))
    image_hub, caption_hub = (
        zeros if hub is None else (hub.statistic(data["image_global"], True), hub.statistic(data["caption_global"], False))
    )
    w = 0.0 if hub is None else hub.weight
    np.testing.assert_allclose(cosines, data["image_global"] @ data["caption_global"].T, rtol=1e-6, atol=1e-6)
    for q in range(len(lengths)):  # caption query: its words against every image's regions (its own penalty: a constant)
        words = fp16(data["caption_concepts"][q, : lengths[q]])
        served = rerank_scores(words, True, images, np.full(len(images), images.shape[1]), cosines[:, q], ranking, image_hub)
        np.testing.assert_allclose(scores[:, q], served - w * caption_hub[q], rtol=1e-5, atol=1e-5)
    block = data["caption_concepts"].astype(np.float16)
    for i in range(len(images)):  # image query: every caption's words against its regions
        served = rerank_scores(fp16(data["image_concepts"][i]), False, block, lengths, cosines[i], ranking, caption_hub)
        np.testing.assert_allclose(scores[i], served - w * image_hub[i], rtol=1e-5, atol=1e-5)


def test_resolve_ranking(bench):
    hub = reference_of(synthetic(), 0.5)
    assert bench.resolve_ranking("model", 0.3) == (Ranking(0.3), "blend:0.3")
    assert bench.resolve_ranking("model", 0.3, hub) == (Ranking(0.3, hub), "model")  # the service needs the encoder's reference
    assert bench.resolve_ranking("model", None) == (Ranking(), "mrsw")
    assert bench.resolve_ranking("mrsw", 0.3, hub) == (Ranking(), "mrsw")
    assert bench.resolve_ranking("blend:0.08", None, hub) == (Ranking(0.08), "blend:0.08")
    assert Ranking(0.3, hub).label == "blend w=0.3, hub 0.5" and Ranking().label == "MrSw"
    for bad in ("blend:-1", "blend:x", "cosine"):
        with pytest.raises(ValueError, match="--ranking"):
            bench.resolve_ranking(bad, 0.3)


def test_recall_and_summary(bench):
    assert bench.recall([[3, 1], [0, 2, 5]], np.array([1, 7])) == {"r1": 0.0, "r5": 50.0, "r10": 50.0}
    result = {
        "ranking": "blend w=0.3",
        "queries": 2,
        "recall_first_stage_only": {"r1": 1.0, "r5": 2.0, "r10": 3.0},
        "recall_exhaustive": {"r1": 4.0, "r5": 5.0, "r10": 6.0},
        "per_multiplier": {
            "10": {"recall_reranked": {"r1": 4.0, "r5": 5.0, "r10": 6.0}, "agreement_at_10": 1.0, "agreement_at_10_ordered": 0.5}
        },
    }
    line = bench.summary("text to image", result, 10)
    assert "first stage 1.0/2.0/3.0 -> re-ranked (R_m=10) 4.0/5.0/6.0" in line and "agreement@10 1.000 (ordered 0.500)" in line


def test_agreement_part_end_to_end(bench, tmp_path):
    """Both directions through the service (milvus-lite): when R_m x 10 covers the gallery the re-rank IS the
    exhaustive ranking by the same score; the service says which score it used."""
    data = synthetic()
    ranking = bench.resolve_ranking("model", data["blend_weight"])
    t2i, i2t = bench.agreement(data, [1, 6], 20, tmp_path, [], ranking, image_queries=None)
    assert t2i["ranking"] == i2t["ranking"] == "blend w=0.3"
    assert (t2i["queries"], t2i["gallery_images"], i2t["queries"], i2t["gallery_captions"]) == (20, 12, 12, 60)
    for result in (t2i, i2t):
        assert set(result) >= {"recall_exhaustive", "recall_first_stage_only", "per_multiplier"}
        full = result["per_multiplier"]["6"]  # 60 candidates: the whole gallery in both directions
        assert full["agreement_at_10"] == 1.0 and full["agreement_at_10_ordered"] >= 0.9
        assert full["recall_reranked"] == result["recall_exhaustive"]
        assert set(full) == {"agreement_at_10", "agreement_at_10_ordered", "recall_reranked", "mean_query_ms"}
    assert set(t2i["strategies"]) >= {"dense", "sq_scale10", "dp_keep16"}
    assert t2i["strategies"]["dense"]["per_multiplier"]["6"]["agreement_at_10"] == 1.0


def test_agreement_with_the_hub_penalty_takes_it_from_an_encoder(bench, tmp_path):
    """--ranking model with a hub penalty: the bench starts an encoder on the model directory, the service
    stores each item's statistic from the encoder's reference, and its re-rank equals the exhaustive one."""
    from encoder_fixtures import build_synthetic_model_dir

    data = synthetic()
    hub = reference_of(data, 0.5)
    data["model_dir"] = build_synthetic_model_dir(tmp_path / "model", joint_dim=16, name="bench-test", blend_weight=0.3, hub_reference=hub)
    stored = HubReference.load(data["model_dir"], load_manifest(data["model_dir"]).hub_penalty)  # fp16, as the encoder sends it
    ranking = bench.resolve_ranking("model", data["blend_weight"], stored)
    t2i, i2t = bench.agreement(data, [6], 20, tmp_path, [], ranking)
    for result in (t2i, i2t):
        assert result["ranking"] == "blend w=0.3, hub 0.5" and result["hub_penalty"].startswith("hub penalty 0.5")
        full = result["per_multiplier"]["6"]
        assert full["agreement_at_10"] == 1.0 and full["recall_reranked"] == result["recall_exhaustive"]


def test_agreement_refuses_a_service_ranking_other_than_the_reference(bench, tmp_path):
    data = synthetic(n_images=4, per_image=2)
    with pytest.raises(RuntimeError, match="ranked by 'MrSw'"):
        bench.agreement(data, [1], 2, tmp_path, [], (Ranking(0.3), "mrsw"))


def test_codec_sweep_scores_decoded_concepts_and_reports_the_boundary_gaps(bench):
    data = synthetic(n_images=30, per_image=2, regions=4, dim=16)
    served = Ranking(0.3)
    scores, _ = bench.reference_scores(data, served)
    exhaustive_t2i = bench.top10(np.ascontiguousarray(scores.T))
    exhaustive_i2t = bench.top10(scores)
    train = synthetic(n_images=400, per_image=2, regions=4, dim=16, seed=5)  # its captions' word pieces pick salient regions
    train["image_concepts"] = unit(np.random.default_rng(5).normal(size=(1024, 4, 16)))  # regions over the whole range
    sweep = bench.codec_sweep(data, train, [2, 20], [1], 45, 20, served, exhaustive_t2i, exhaustive_i2t, scores)
    coarse, fine = sweep["by_bytes"]
    (salient,) = sweep["by_salient"]  # 1 fp16 region (33 bytes) and 3 regions of 4 bytes
    assert (salient["salient_regions"], salient["region_bytes"], salient["concept_bytes_per_image"]) == (1, 4, 45)
    assert salient["agreement_at_10"] > coarse["agreement_at_10"] and salient["explanations_unchanged"] > coarse["explanations_unchanged"]
    assert (coarse["bytes_per_vector"], fine["bytes_per_vector"]) == (2, 20)
    assert fine["concept_bytes_per_image"] == 20 * 4
    # 20 bytes = 10 bits for each of the 16 dimensions: the top-10 sets survive; 2 bytes keep 16 bits in all
    assert fine["agreement_at_10"] >= 0.95 and fine["agreement_at_10_i2t"] >= 0.95
    assert coarse["agreement_at_10"] < fine["agreement_at_10"]
    assert fine["explanations_unchanged"] >= 0.95 and coarse["explanations_unchanged"] < fine["explanations_unchanged"]
    gaps = list(sweep["rank_10_11_gap_t2i"].values())
    assert gaps == sorted(gaps) and gaps[0] >= 0


def test_best_regions_kept_compares_each_word_pieces_best_region(bench):
    data = synthetic(n_images=3, per_image=1, regions=4, dim=16)
    hits = [[0, 1, 2]] * 3
    assert bench.best_regions_kept(data, data["image_concepts"], hits) == 1.0
    shuffled = data["image_concepts"][:, ::-1]  # every photo's regions in reverse order: each best region moves
    assert bench.best_regions_kept(data, shuffled, hits) == 0.0


def test_decoded_keeps_padding_rows_zero(bench):
    from search_service.concept_codes import train_codec

    codec = train_codec(unit(np.random.default_rng(1).normal(size=(2048, 16))), 8)
    concepts = np.zeros((2, 3, 16), np.float32)
    concepts[0, :2] = unit(np.ones((2, 16)))
    out = bench.decoded(codec, concepts)
    assert out.shape == concepts.shape
    assert not out[0, 2].any() and not out[1].any()
    assert np.all(np.linalg.norm(out[0, :2], axis=1) > 0.5)


def test_query_trace_splits_each_query_into_stages_and_collections(bench):
    import gc
    import time

    class Searcher:  # the one method QueryTrace wraps
        def __init__(self):
            self.observed = []

        def _observe(self, stage, started):
            self.observed.append(stage)

    searcher = Searcher()
    original = searcher._observe
    trace = bench.QueryTrace(searcher)
    try:
        trace.start()
        started = time.perf_counter()
        searcher._observe("first_stage", started - 0.004)
        searcher._observe("rerank", started - 0.002)
        gc.collect()
        first = trace.record(20.0, 1.5)
        trace.start()
        second = trace.record(3.0, 2.0)
    finally:
        trace.close()
    assert searcher.observed == ["first_stage", "rerank"]  # the service's own metrics still get every stage
    assert searcher._observe == original and trace._on_gc not in gc.callbacks
    assert first["first_stage"] >= 4.0 and first["rerank"] >= 2.0 and first["gc_full"] == 1 and first["gc"] > 0
    # a collection pauses whichever stage it falls in: "gc" overlaps the stages, "outside_stages" does not
    assert abs(first["outside_stages"] - (20.0 - first["first_stage"] - first["rerank"])) < 0.02
    assert second == {"total_ms": 3.0, "at_s": 2.0, "gc_full": 0, "gc": 0.0, "outside_stages": 3.0}


def test_tail_profile_compares_the_slowest_percent_with_all_queries(bench):
    traces = [{"total_ms": 10.0, "at_s": float(i), "gc_full": 0, "first_stage": 6.0, "rerank": 2.0} for i in range(198)]
    traces += [{"total_ms": 90.0, "at_s": 7.5, "gc_full": 1, "first_stage": 70.0, "rerank": 2.0}] * 2
    profile = bench.tail_profile(traces)
    assert profile["stage_median_ms_all"] == {"first_stage": 6.0, "rerank": 2.0}
    assert profile["stage_median_ms_slowest_1pct"] == {"first_stage": 70.0, "rerank": 2.0}
    assert [t["total_ms"] for t in profile["slowest_1pct"]] == [90.0, 90.0]
    assert profile["gc_full_collections"] == 2


def test_query_trace_times_the_milvus_search_inside_the_first_stage(bench):
    import time

    class Client:
        def search(self, *args, **kwargs):
            time.sleep(0.003)
            return [["hit"]]

        def query(self, *args, **kwargs):
            return []

    class Store:
        client = Client()

    class Searcher:
        def _observe(self, stage, started):
            pass

    store, searcher = Store(), Searcher()
    real = store.client
    trace = bench.QueryTrace(searcher, store)
    try:
        trace.start()
        started = time.perf_counter()
        assert store.client.search("images") == [["hit"]] and store.client.query("images") == []  # calls pass through
        searcher._observe("first_stage", started)
        record = trace.record(10.0, 0.0)
    finally:
        trace.close()
    assert store.client is real
    assert 3.0 <= record["milvus_search"] <= record["first_stage"]
    # the Milvus call lies within first_stage: counted once in the time outside the stages
    assert abs(record["outside_stages"] - (10.0 - record["first_stage"])) < 0.02


def test_first_stage_probe_times_three_ways_of_fetching_the_candidates(bench):
    calls = []

    class Client:
        def search(self, name, data, anns_field, limit, output_fields, search_params, **read):
            assert search_params == {"metric_type": "IP", "params": {"ef": 100}}
            calls.append(("search", tuple(output_fields), limit))
            return [[{"id": f"i{k}", "distance": 1.0} for k in range(3)]]

        def query(self, name, filter, output_fields, **read):
            calls.append(("query", filter))
            return [{"id": f"i{k}"} for k in range(3)]

    class Store:
        client = Client()

        def dense_search_params(self, limit):
            return {"ef": limit}

        def name(self, modality):
            return f"bench_{modality}"

        def _fields(self, concepts, global_vector):
            return ["id", "concepts_0"]

        def _read(self):
            return {"consistency_level": "Bounded"}

    data = {"caption_global": np.eye(4, dtype=np.float32)}
    probe = bench.first_stage_probe(Store(), data, 2)
    assert calls[:4] == [
        ("search", ("id", "concepts_0"), 100),
        ("search", ("id",), 100),
        ("search", ("id",), 100),
        ("query", 'id in ["i0", "i1", "i2"]'),
    ]
    assert len(calls) == 8 and probe["queries"] == 2
    for way in ("search_with_fields", "search_ids_only", "ids_then_query_by_id"):
        assert 0 <= probe[way]["p50_ms"] <= probe[way]["p99_ms"] <= probe[way]["max_ms"]
