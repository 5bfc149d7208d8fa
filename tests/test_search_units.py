"""Search service pieces without servers: config and --help, concept encoding, filters, re-rank maths, generated code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search_service.config import ConfigError, SearchConfig, build_parser, from_args
from search_service.ranking import explain, mrsw_scores, pad
from search_service.store import (
    CHUNK_CHARS,
    BadFilter,
    MilvusStore,
    ModelInfo,
    ModelMismatch,
    check_filter_names,
    concept_chunks,
    decode_boxes,
    decode_concepts,
    encode_boxes,
    encode_concepts,
)
from teran.alignment_numpy import alignment_scores, best_regions

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
    store.model = ModelInfo("m", 1, 16)
    store.check_model(ModelInfo("m", 1, 16))
    with pytest.raises(ModelMismatch, match="dimension 8"):
        store.check_model(ModelInfo("m", 1, 8))
    with pytest.raises(ModelMismatch, match="not comparable"):
        store.check_model(ModelInfo("m", 2, 16))


def test_mrsw_scores_match_the_library_for_ragged_sets():
    rng = np.random.default_rng(0)
    dim = 12
    images = [unit(rng, n, dim) for n in (3, 7, 1, 5, 9)]
    caption = unit(rng, 4, dim)
    regions, mask = pad(images, dim)
    expected = alignment_scores(regions, mask, caption[None], np.ones((1, 4), bool))[:, 0]
    np.testing.assert_allclose(mrsw_scores(caption, True, images, chunk=2), expected, rtol=1e-6)
    # image query: its regions against ragged captions
    captions = [unit(rng, n, dim) for n in (2, 6, 3)]
    words, wmask = pad(captions, dim)
    image = unit(rng, 5, dim)
    expected = alignment_scores(image[None], np.ones((1, 5), bool), words, wmask)[0]
    np.testing.assert_allclose(mrsw_scores(image, False, captions, chunk=2), expected, rtol=1e-6)
    # MrSw by hand
    for c, s in zip(captions, mrsw_scores(image, False, captions), strict=True):
        assert s == pytest.approx(float((c @ image.T).max(axis=1).sum()), abs=1e-5)


def test_explain_uses_best_regions():
    rng = np.random.default_rng(1)
    regions, words = unit(rng, 6, 8), unit(rng, 3, 8)
    boxes = rng.random((6, 4), dtype=np.float32)
    terms = explain(regions, boxes, words, ["a", "dog"])
    w, r, s = best_regions(regions, np.ones(6, bool), words, np.ones(3, bool))
    assert [t.word_index for t in terms] == w.tolist() and [t.region_index for t in terms] == r.tolist()
    assert [t.word_piece for t in terms] == ["a", "dog", "#2"]
    np.testing.assert_allclose([t.similarity for t in terms], s, rtol=1e-6)
    np.testing.assert_allclose(terms[0].box, boxes[r[0]])
    assert explain(regions, None, words, [])[0].box == []


def test_generated_search_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "proto"))
    generate.generate_search(tmp_path / "search")
    assert generate.compare(tmp_path / "search", ROOT / "search_service" / "_proto") == [], "run: python proto/generate.py"
    generate.generate(tmp_path / "encoder")
    assert generate.compare(tmp_path / "encoder", ROOT / "encoder_service" / "_proto") == []
    result = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


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
