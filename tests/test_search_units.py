"""Search service pieces without servers: config and --help, concept encoding, filters, re-rank maths, generated code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search_service.checks import INT64_MAX, INT64_MIN, check_unit_rows, parse_metadata
from search_service.codec import CHUNK_CHARS, concept_chunks, decode_boxes, decode_concepts, encode_boxes, encode_concepts
from search_service.config import ConfigError, SearchConfig, build_parser, from_args
from search_service.filters import BadFilter, check_filter_names
from search_service.layout import ModelMismatch, ModelRef
from search_service.ranking import Ranking, explain, mrsw_block, mrsw_scores, pad, rerank_scores, stack_concepts
from search_service.store import MilvusStore
from teran.alignment_numpy import alignment_scores
from teran.hubness import HubReference

ROOT = Path(__file__).resolve().parent.parent


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_help_lists_limits_and_variables():
    text = build_parser().format_help()
    for flag in (
        "--max-index-items",
        "--max-top-k",
        "--max-ids",
        "--max-metadata-bytes",
        "--max-concepts",
        "--max-filter-chars",
        "--max-candidates",
    ):
        assert flag in text
    assert "LIMIT" in text and "TERAN_SEARCH_MILVUS_URI" in text and "TERAN_SEARCH_ENCODER_ADDRESS" in text


def test_config_precedence_and_errors(tmp_path):
    env = {"TERAN_SEARCH_MAX_TOP_K": "7", "TERAN_SEARCH_MILVUS_URI": "http://milvus:19530", "TERAN_SEARCH_PORT": "1"}
    config = from_args(["--port", "50099", "--search-params", '{"ef": 64}'], env)
    assert (config.max_top_k, config.port, config.milvus_uri, config.search_params) == (7, 50099, "http://milvus:19530", {"ef": 64})
    assert not config.is_lite and SearchConfig().is_lite
    assert SearchConfig().metrics_host == "127.0.0.1"  # no auth on /metrics: loopback unless opened
    tokens = tmp_path / "tokens"
    tokens.write_text("a\nb\n")
    assert from_args(["--auth-token-file", str(tokens)], {}).auth_tokens == ["a", "b"]
    with pytest.raises(ConfigError, match="--max-top-k"):
        from_args(["--max-top-k", "0"], {})
    with pytest.raises(ConfigError, match="TERAN_SEARCH_PORT"):
        from_args([], {"TERAN_SEARCH_PORT": "x"})
    with pytest.raises(ConfigError, match="--index-type"):
        from_args(["--index-type", "DISKANN2"], {})
    with pytest.raises(ConfigError, match="--rerank-multiplier"):
        from_args(["--rerank-multiplier", "20", "--max-rerank-multiplier", "10"], {})
    assert [from_args(["--ranking", r], {}).ranking for r in ("model", "mrsw", "blend:1.5")] == ["model", "mrsw", "blend:1.5"]
    for bad in ("blend:-0.1", "blend", "cosine", "blend:x", "blend:inf"):
        with pytest.raises(ConfigError, match=r"--ranking \(TERAN_SEARCH_RANKING\): .*give model, mrsw or blend:W with a number W >= 0"):
            from_args(["--ranking", bad], {})
    pem = tmp_path / "x.pem"
    pem.write_text("not checked here")
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        from_args(["--tls-cert", str(pem)], {})
    with pytest.raises(ConfigError, match="client certificates need --tls-cert"):
        from_args(["--tls-client-ca", str(pem)], {})
    with pytest.raises(ConfigError, match="--encoder-client-cert and --encoder-client-key go together"):
        from_args(["--encoder-client-key", str(pem)], {})
    with pytest.raises(ConfigError, match=r"--encoder-root-cert .*missing.pem: file does not exist"):
        from_args(["--encoder-root-cert", str(tmp_path / "missing.pem")], {})
    assert from_args([], {"TERAN_SEARCH_ENCODER_TLS": "true"}).encoder_tls


def test_cli_bad_config_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "search_service", "--max-ids", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--max-ids" in result.stderr


@pytest.mark.parametrize(("dim", "count"), [(8, 1), (256, 49), (256, 128), (1024, 100)])
def test_concept_encoding_roundtrip(dim, count):
    rng = np.random.default_rng(dim)
    concepts = unit(rng, count, dim)
    chunks = concept_chunks(dim, 128)
    parts = encode_concepts(concepts, chunks)
    assert len(parts) == chunks and all(len(p) <= CHUNK_CHARS for p in parts)
    back = decode_concepts(parts, count, dim)
    assert back.dtype == np.float16
    np.testing.assert_array_equal(back, concepts.astype(np.float16))
    assert np.abs(back.astype(np.float32) - concepts).max() < 1e-3
    boxes = rng.random((count, 4), dtype=np.float32)
    np.testing.assert_array_equal(decode_boxes(encode_boxes(boxes), count), boxes)
    assert encode_boxes(None) == "" and decode_boxes("", count) is None


def test_concepts_too_many_for_the_fields():
    with pytest.raises(ValueError, match="do not fit"):
        encode_concepts(np.zeros((200, 256), np.float32), concept_chunks(256, 128))


@pytest.mark.parametrize(
    "expr",
    [
        'metadata["split"] == "test"',
        'metadata["n"] > 3 and id in ["a", "b"]',
        "json_contains(metadata[\"tags\"], 'dog')",
        'not (metadata["x"] like "a%")',
    ],
)
def test_filter_names_allowed(expr):
    check_filter_names(expr)


@pytest.mark.parametrize(
    ("expr", "match"), [("global_vector > 1", "global_vector"), ('model == "x"', "model"), ('metadata["a"] == "b', "unterminated")]
)
def test_filter_names_refused(expr, match):
    with pytest.raises(BadFilter, match=match):
        check_filter_names(expr)


def test_model_checks():
    store = MilvusStore("unused.db")
    store.layout.model = ModelRef("m", 1, 16)
    store.check_model(ModelRef("m", 1, 16))
    with pytest.raises(ModelMismatch, match="dimension 8"):
        store.check_model(ModelRef("m", 1, 8))
    with pytest.raises(ModelMismatch, match="not comparable"):
        store.check_model(ModelRef("m", 2, 16))


def test_mrsw_scores_match_the_library_for_ragged_sets():
    rng = np.random.default_rng(0)
    dim = 12
    images = [unit(rng, n, dim) for n in (3, 7, 1, 5, 9)]
    caption = unit(rng, 4, dim)
    # each image alone (no padding): the max runs over its real regions only
    expected = [alignment_scores(im[None], np.ones((1, len(im)), bool), caption[None], np.ones((1, 4), bool))[0, 0] for im in images]
    np.testing.assert_allclose(mrsw_scores(caption, True, images, chunk=2), expected, rtol=1e-5)
    for im, s in zip(images, mrsw_scores(caption, True, images), strict=True):  # MrSw by hand
        assert s == pytest.approx(float((caption @ im.T).max(axis=1).sum()), abs=1e-5)
    # equal-length sets: the same as the library's padded batch
    same = [unit(rng, 6, dim) for _ in range(4)]
    regions, mask = pad(same, dim)
    expected = alignment_scores(regions, mask, caption[None], np.ones((1, 4), bool))[:, 0]
    np.testing.assert_allclose(mrsw_scores(caption, True, same, chunk=3), expected, rtol=1e-5)
    # image query: its regions against ragged captions
    captions = [unit(rng, n, dim) for n in (2, 6, 3)]
    words, wmask = pad(captions, dim)
    image = unit(rng, 5, dim)
    expected = alignment_scores(image[None], np.ones((1, 5), bool), words, wmask)[0]
    np.testing.assert_allclose(mrsw_scores(image, False, captions, chunk=2), expected, rtol=1e-5)
    # MrSw by hand
    for c, s in zip(captions, mrsw_scores(image, False, captions), strict=True):
        assert s == pytest.approx(float((c @ image.T).max(axis=1).sum()), abs=1e-5)


def test_mrsw_block_does_not_depend_on_the_batch():
    rng = np.random.default_rng(3)
    images = [unit(rng, n, 8).astype(np.float16).astype(np.float32) for n in (1, 4, 9)]  # exact in the fp16 block
    caption = unit(rng, 3, 8)
    alone = [mrsw_scores(caption, True, [im])[0] for im in images]
    block, counts = stack_concepts(images, 8)
    assert block.dtype == np.float16 and counts.tolist() == [1, 4, 9]
    together = mrsw_block(caption, True, block.astype(np.float32), counts, chunk=2)
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_rerank_cache_put_gather_remove_compact_limit():
    from search_service.cache import RerankCache

    rng = np.random.default_rng(0)
    dim = 4
    sets = {f"i{k}": rng.standard_normal((k + 1, dim)).astype(np.float16) for k in range(6)}  # 1..6 rows: 21 rows
    cache = RerankCache(limit_bytes=21 * 2 * dim)
    for k, (item_id, c) in enumerate(sets.items()):
        assert cache.put("images", item_id, 100 + k, c)
    assert cache.items() == 6 and cache.bytes() == 21 * 2 * dim and not cache.full
    ids = ["i5", "i0", "i3", "nope"]
    got = cache.gather("images", ids, [105, 100, 103, 1], [6, 1, 4, 2], dim)
    assert got.missing == [3] and got.block.shape == (4, 6, dim) and got.counts.tolist() == [6, 1, 4, 2]
    for row, item_id in enumerate(ids[:3]):
        n = sets[item_id].shape[0]
        np.testing.assert_array_equal(got.block[row, :n], sets[item_id])
    assert cache.gather("images", ["i2"], [999], [3], dim).missing == [0]  # another stamp: stale, a miss
    assert cache.hits == 3 and cache.misses == 2
    # full: a new item does not fit until garbage is reclaimed
    assert not cache.put("images", "new", 7, np.ones((2, dim), np.float16)) and cache.full
    cache.remove("images", ["i1"])  # 2 rows of garbage: < 1/8 of the rows, not worth a compaction
    assert not cache.put("images", "new", 7, np.ones((2, dim), np.float16))
    cache.remove("images", ["i4"])  # 7 rows of garbage
    assert cache.put("images", "new", 7, np.ones((2, dim), np.float16))  # compaction made room
    assert cache.bytes() == (21 - 7 + 2) * 2 * dim
    # an upsert with another stamp replaces the rows; the same stamp is a no-op; if_absent keeps the entry
    assert cache.put("images", "i0", 200, np.full((1, dim), 3, np.float16))
    assert not cache.put("images", "i0", 201, np.zeros((1, dim), np.float16), if_absent=True) or cache.has("images", "i0", 200)
    for item_id in ("i2", "i3", "i5"):
        got = cache.gather("images", [item_id], [100 + int(item_id[1:])], [sets[item_id].shape[0]], dim)
        assert not got.missing
        np.testing.assert_array_equal(got.block[0, : sets[item_id].shape[0]], sets[item_id])
    np.testing.assert_array_equal(cache.gather("images", ["i0"], [200], [1], dim).block[0], np.full((1, dim), 3, np.float16))
    # retain: entries absent from Milvus or at another stamp are dropped
    assert cache.retain("images", {"i2": 102, "i3": 0, "new": 7}) == 3  # i0 (stamp 200), i3 (stamp), i5 (gone)
    assert cache.items() == 2 and cache.has("images", "i2", 102) and cache.has("images", "new", 7)


def test_explain_shows_whole_content_words_at_their_best_region():
    rng = np.random.default_rng(1)
    regions, words = unit(rng, 6, 8), unit(rng, 6, 8)
    boxes = rng.random((6, 4), dtype=np.float32)
    labels = ["a", "dog", "catches", "the", "fr", "##is"]  # stop words out, "fr ##is" joined
    terms = explain(regions, boxes, words, labels)
    assert [(t.word, t.word_index, t.piece_indices) for t in terms] == [("dog", 1, [1]), ("catches", 2, [2]), ("fris", 4, [4, 5])]
    sims = words @ regions.T
    for term in terms:  # the region where the word's pieces' mean cosine is highest, and that mean
        mean = sims[term.piece_indices].mean(axis=0)
        assert term.region_index == int(mean.argmax())
        assert term.similarity == pytest.approx(float(mean.max()), abs=1e-6)
        np.testing.assert_allclose(term.box, boxes[term.region_index])
    assert explain(regions, None, words, [])[0].box == []  # no boxes; labels default to "#i"


def test_rerank_scores_add_the_weighted_alignment_to_the_global_cosine_less_the_hub_penalty():
    rng = np.random.default_rng(2)
    query, candidates = unit(rng, 4, 8), [unit(rng, n, 8) for n in (3, 5, 2)]
    block, counts = stack_concepts(candidates, 8)
    cosines = np.array([0.3, -0.1, 0.5], np.float32)
    hubs = np.array([0.6, 0.2, 0.4], np.float32)
    hub = HubReference(unit(rng, 3, 8), unit(rng, 3, 8), k=2, weight=0.5)
    for query_is_caption in (True, False):
        mrsw = mrsw_scores(query, query_is_caption, candidates)
        np.testing.assert_allclose(rerank_scores(query, query_is_caption, block, counts, cosines, Ranking(), hubs), mrsw, rtol=1e-3)
        blended = rerank_scores(query, query_is_caption, block, counts, cosines, Ranking(0.25), hubs)
        np.testing.assert_allclose(blended, cosines + 0.25 * mrsw, rtol=1e-3, atol=1e-6)
        served = rerank_scores(query, query_is_caption, block, counts, cosines, Ranking(0.25, hub), hubs)
        np.testing.assert_allclose(served, cosines + 0.25 * mrsw - 0.5 * hubs, rtol=1e-3, atol=1e-6)
    labels = (Ranking().label, Ranking(0.08).label, Ranking(0.08, hub).label)
    assert labels == ("MrSw", "blend w=0.08", "blend w=0.08, hub 0.5")


def test_no_torch_at_run_time():
    code = "import sys, search_service.server, search_service.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_sparse_surrogates():
    from search_service.sparse import crelu, deep_permutation, scalar_quantization, surrogate

    v = np.array([0.5, -0.25, 0.0, 0.1], np.float32)
    np.testing.assert_allclose(crelu(v), [0.5, 0, 0, 0.1, 0, 0.25, 0, 0], rtol=1e-6)
    assert scalar_quantization(v, 10) == {0: 5.0, 3: 1.0, 5: 2.0}
    assert scalar_quantization(v, 1) == {0: 1.0}  # never empty
    assert deep_permutation(v, 2) == {0: 2.0, 5: 1.0}
    assert deep_permutation(v, 10) == {0: 10.0, 5: 9.0, 3: 8.0}  # zero components are not kept
    assert surrogate("dp", v, {"dp_keep": 1}) == {0: 1.0}
    with pytest.raises(ValueError, match="unknown sparse surrogate"):
        surrogate("boc", v, {})
    rng = np.random.default_rng(0)
    a, b = unit(rng, 2, 64)
    # inner products of SQ surrogates track the vectors' (c-relu parts)
    sa, sb = scalar_quantization(a, 100), scalar_quantization(b, 100)
    approx = sum(w * sb.get(i, 0.0) for i, w in sa.items()) / 100**2
    exact = float(crelu(a) @ crelu(b))
    assert abs(approx - exact) < 0.05


def test_bag_of_concepts_codebook_and_encoding():
    from search_service.sparse import bag_of_concepts, kmeans_codebook

    rng = np.random.default_rng(0)
    centres = unit(rng, 8, 16)
    points = unit(rng, 1, 16)[:0]
    points = np.concatenate([centres[i] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32) for i in range(8)])
    codebook = kmeans_codebook(points, 8, seed=1)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(codebook, kmeans_codebook(points, 8, seed=1))  # deterministic
    assert sorted(np.argmax(centres @ codebook.T, axis=1).tolist()) == list(range(8))  # one codeword per cluster
    word = {int(np.argmax(codebook @ centres[i])): i for i in range(8)}
    regions = centres[[0, 0, 3]]
    hard_max = bag_of_concepts(regions, codebook, top=1, pool="max")
    hard_sum = bag_of_concepts(regions, codebook, top=1, pool="sum")
    assert {word[k] for k in hard_max} == {0, 3} and sorted(hard_max.values()) == pytest.approx([1.0, 1.0])
    assert sorted(hard_sum.values()) == pytest.approx([1.0, 2.0])  # two regions on cluster 0
    soft = bag_of_concepts(regions, codebook, top=3, pool="sum", temperature=1.0)
    assert len(soft) >= 3 and sum(soft.values()) == pytest.approx(3.0, rel=1e-5)  # each concept spreads a mass of 1
    assert len(bag_of_concepts(regions, codebook, top=3, pool="sum", keep=2)) == 2
    with pytest.raises(ValueError, match="pool"):
        bag_of_concepts(regions, codebook, pool="mean")


# --------------------------------------------------------------------------- metadata and vector checks

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _json_values, max_size=5))
def test_metadata_milvus_can_store_is_accepted_unchanged(value):
    assert parse_metadata(json.dumps(value), "m") == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"x": 9223372036854775808}', "m.x: integer 9223372036854775808 is outside the 64-bit range"),
        ('{"x": [0, -9223372036854775809]}', "m.x[1]: integer -9223372036854775809 is outside the 64-bit range"),
        ('{"x": NaN}', "m: NaN is not a JSON number"),
        ('{"x": -Infinity}', "m: -Infinity is not a JSON number"),
        ('{"x": {"y": 1e400}}', "m.x.y: number inf is not finite"),
        ('{"a": "[[[[", "b": ' + "[" * 33 + "]" * 33 + "}", "m: nested 34 levels deep; at most 32"),
        ("[1]", "m: must be a JSON object, got list"),
        ("{", "m: malformed JSON"),
    ],
)
def test_metadata_milvus_cannot_store_is_refused(text, message):
    with pytest.raises(ValueError) as info:
        parse_metadata(text, "m")
    assert message in str(info.value)


def test_nesting_inside_strings_does_not_count():
    assert parse_metadata('{"a": "' + "[" * 100 + '"}', "m") == {"a": "[" * 100}
    assert parse_metadata('{"a": "\\"[[[[" , "b": [[1]]}', "m") == {"a": '"[[[[', "b": [[1]]}


def test_unit_rows():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 8))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    check_unit_rows(rows, "c", 0.01)
    check_unit_rows(rows[0] * 1.009, "g", 0.01)
    check_unit_rows(rows.astype(np.float16), "c", 0.01)  # fp16 rounding stays well inside the tolerance
    rows[3] *= 1.02
    with pytest.raises(ValueError, match=r"c: row 3 L2 norm 1\.02; vectors must be L2-normalised \(norm 1 within 0\.01"):
        check_unit_rows(rows, "c", 0.01)
    with pytest.raises(ValueError, match=r"g: L2 norm 0;"):
        check_unit_rows(np.zeros(8), "g", 0.01)


def test_milvus_calls_are_bounded_by_the_request_deadline():
    """Each Milvus call made under within(deadline) gets timeout=min(its own, the time left); a job that
    starts after the deadline, or a call made after it, is refused without reaching Milvus."""
    import time

    from search_service.deadlines import DeadlineBoundClient, DeadlinePassed, within

    class Recorder:
        def __init__(self):
            self.calls = []

        def query(self, name, timeout=None):
            self.calls.append(("query", name, timeout))
            return name

        def close(self):  # not a server call: passed through untouched
            self.calls.append(("close",))

    inner = Recorder()
    client = DeadlineBoundClient(inner, timeout=30.0)
    assert client.query("a") == "a" and inner.calls[-1] == ("query", "a", 30.0)  # no request deadline: its own timeout
    left = within(time.monotonic() + 2.0, lambda: client.query("b") and inner.calls[-1][2])
    assert 1.5 < left <= 2.0
    assert within(time.monotonic() + 100.0, lambda: client.query("c") and inner.calls[-1][2]) == 30.0
    assert client.query("d", timeout=5) == "d" and inner.calls[-1][2] == 5  # an explicit timeout stands
    client.close()
    assert inner.calls[-1] == ("close",)
    count = len(inner.calls)
    with pytest.raises(DeadlinePassed):
        within(time.monotonic() - 0.1, client.query, "late")
    with pytest.raises(DeadlinePassed):
        within(time.monotonic() + 0.05, lambda: (time.sleep(0.1), client.query("too late")))
    assert len(inner.calls) == count  # neither reached Milvus
    assert client.query("e") == "e" and inner.calls[-1][2] == 30.0  # the bound ends with the job
