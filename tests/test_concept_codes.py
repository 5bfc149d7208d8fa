"""The concept codec (search_service.concept_codes): training, bit-exact codes, what decoding keeps, and
collections that store codes on real milvus-lite (the codec kept with them, a different one refused,
fp16 collections left as they are)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from search_fixtures import ROOT, DirectSearch, unique_prefix, vectors_value

from search_service.concept_codes import MAX_BITS, allocate_bits, check_codec, companded_levels, load_codec, train_codec
from search_service.layout import CodecMismatch
from search_service.ranking import mrsw_scores
from teran.errors import TeranInputError
from teran_api.types import IndexItem

DIM = 16


def concepts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors with most of their variance in a few directions, as a model's concepts have."""
    scales = np.exp(-np.arange(DIM) / 3.0).astype(np.float32)
    x = rng.standard_normal((n, DIM)).astype(np.float32) * scales + 0.3
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def codec():
    return train_codec(concepts(np.random.default_rng(0), 20000), bytes_per_vector=12)


def test_bits_follow_the_variance_within_the_budget():
    variances = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    bits = allocate_bits(variances, 12)
    assert bits.sum() <= 12 and list(bits) == sorted(bits, reverse=True) and bits[-1] == 0
    assert bits[0] - bits[3] == 3  # one bit per doubling of the variance
    assert allocate_bits(np.ones(4), 100).tolist() == [MAX_BITS] * 4


def test_levels_follow_the_density_within_the_range():
    values = np.random.default_rng(5).standard_normal(100000)
    even = companded_levels(values, 16, power=0.0)  # power 0: evenly spaced over the range
    np.testing.assert_allclose(np.diff(even), (values.max() - values.min()) / 16, rtol=0.02)
    levels = companded_levels(values, 64)
    gaps = np.diff(levels)
    assert (gaps > 0).all() and values.min() <= levels[0] and levels[-1] <= values.max()
    assert gaps[31] < gaps[5] and gaps[31] < gaps[-6]  # denser where the values are
    assert 2 < gaps[5] / gaps[31] < 4  # but flatter than the density itself (about 6x thinner there: level 5 lies near -1.9)
    assert np.all(companded_levels(np.full(50, 0.25), 4) == 0.25)


def test_codes_have_the_promised_size_and_decode_close_to_the_vectors(codec):
    assert codec.bytes_per_vector == 12 and codec.bits.sum() <= 96
    x = concepts(np.random.default_rng(1), 500)
    codes = codec.encode(x)
    assert codes.shape == (500, 12) and codes.dtype == np.uint8
    decoded = codec.decode(codes)
    assert decoded.shape == x.shape
    np.testing.assert_array_equal(codec.encode(decoded), codes)  # decoding lands on the levels: codes are stable
    np.testing.assert_array_equal(codec.decode(codes[None]).reshape(x.shape), decoded)  # any leading shape
    # the re-rank's shortcut: inner products in the principal basis equal those with the decoded vectors
    queries_full = concepts(np.random.default_rng(3), 4)
    np.testing.assert_allclose(codec.principal_query(queries_full) @ codec.decode_principal(codes).T, queries_full @ decoded.T, atol=1e-5)
    error = np.mean(np.sum((decoded - x) ** 2, axis=1))
    assert error < 0.05 * np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))  # far below the vectors' own spread
    # what the re-rank sees: MrSw of decoded candidates against full-precision queries stays close
    queries = concepts(np.random.default_rng(2), 30).reshape(10, 3, DIM)
    candidates = [x[i : i + 5] for i in range(0, 100, 5)]
    decoded_candidates = [decoded[i : i + 5] for i in range(0, 100, 5)]
    for q in queries:
        np.testing.assert_allclose(mrsw_scores(q, True, decoded_candidates), mrsw_scores(q, True, candidates), atol=0.05)


def test_fields_of_every_width_unpack_at_any_bit_offset():
    """Widths 1..10 packed back to back (fields straddle bytes at every shift): decoding returns each field's level."""
    bits = np.array([10, 10, 7, 9, 1, 3, 5, 2, 10, 6, 4, 8, 0, 9, 7, 3])
    levels = np.tile(np.arange(1 << MAX_BITS, dtype=np.float32), (DIM, 1))  # level k of every component is k
    codec = check_codec(np.zeros(DIM), np.eye(DIM), bits, levels)
    rng = np.random.default_rng(4)
    fields = rng.integers(0, 1 << bits, size=(300, DIM)).astype(np.float32)  # component i: 0 .. 2^bits[i] - 1
    codes = codec.encode(fields)
    np.testing.assert_array_equal(codec.decode(codes), fields)
    assert codes.shape[1] == codec.bytes_per_vector == sum(-(-int((bits == b).sum()) * b // 8) for b in range(1, MAX_BITS + 1))


def test_save_load_and_bad_codecs(codec, tmp_path):
    path = tmp_path / "codec.bin"
    codec.save(path)  # the exact name
    loaded = load_codec(path)
    assert loaded.digest() == codec.digest() and loaded.describe() == codec.describe()
    with pytest.raises(TeranInputError, match="no such concept codec file"):
        load_codec(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(TeranInputError, match="not a concept codec file"):
        load_codec(tmp_path / "junk.npz")
    with pytest.raises(TeranInputError, match="orthonormal"):
        check_codec(codec.mean, codec.basis * 2, codec.bits, codec.levels)
    with pytest.raises(TeranInputError, match=f"bits must be integers 0..{MAX_BITS}"):
        check_codec(codec.mean, codec.basis, codec.bits + MAX_BITS, codec.levels)
    with pytest.raises(TeranInputError, match="expected"):
        check_codec(codec.mean[:4], codec.basis, codec.bits, codec.levels)
    with pytest.raises(TeranInputError, match="at least 1024"):
        train_codec(concepts(np.random.default_rng(0), 100), 8)
    with pytest.raises(TeranInputError, match="--bytes 100"):
        train_codec(concepts(np.random.default_rng(0), 2000), 100)


def salient_codec(count: int = 2, regions: int = 6, region_bytes: int = 6):
    rng = np.random.default_rng(11)
    return train_codec(
        concepts(rng, 20000),
        12,
        words=concepts(rng, 3000),
        salient=count,
        regions=regions,
        image_bytes=count * (1 + 2 * DIM) + (regions - count) * region_bytes,
    )


def test_salient_regions_are_kept_as_fp16_and_the_rest_coded():
    codec = salient_codec()
    assert (codec.salient, codec.region_codec.bytes_per_vector, codec.image_bytes(6), codec.image_bytes(1)) == (2, 6, 90, 33)
    assert "2 salient regions as fp16, the others 6 bytes" in codec.describe()
    rng = np.random.default_rng(12)
    images = [concepts(rng, 6), concepts(rng, 6), concepts(rng, 1), concepts(rng, 4)]
    # image 1: region 4 is the reference words' mean direction (the best region of nearly every word), region 5 next to it
    direction = codec.reference_words.astype(np.float32).mean(0)
    images[1][4] = direction / np.linalg.norm(direction)
    images[1][5] = 0.9 * images[1][4] + 0.1 * images[1][0]
    images[1][5] /= np.linalg.norm(images[1][5])
    assert codec.salient_regions(images[1])[0] == 4 or codec.salient_regions(images[1])[1] == 4
    blobs = codec.encode_images(images)
    assert [len(b) for b in blobs] == [90, 90, 33, 2 * 33 + 2 * 6]
    block = codec.decode_images(blobs, [6, 6, 1, 4])
    assert block.shape == (4, 6, DIM + 1)
    regions = codec.image_vectors(block)
    for i, image in enumerate(images):
        kept = codec.salient_regions(image)
        assert list(blobs[i][: len(kept)]) == kept.tolist()
        np.testing.assert_allclose(regions[i, kept], image[kept].astype(np.float16), atol=1e-6)  # fp16, exactly
        others = np.setdiff1d(np.arange(len(image)), kept)
        coded = codec.region_codec.decode(codec.region_codec.encode(image[others]))
        np.testing.assert_allclose(regions[i, others], coded, atol=1e-5)
        assert len(others) == 0 or np.abs(regions[i, others] - image[others]).max() > 1e-3  # coded, not kept
    # the re-rank's dot products: block x image_query equal the decoded regions' with the words
    words = concepts(rng, 5)
    np.testing.assert_allclose(block[1] @ codec.image_query(words).T, regions[1] @ words.T, atol=1e-5)
    with pytest.raises(ValueError, match="image codes of 89 bytes for 6 regions; expected 90"):
        codec.decode_images([blobs[0][:-1]], [6])


def test_salient_codecs_save_load_and_refuse_bad_arrays(tmp_path):
    codec = salient_codec()
    codec.save(tmp_path / "salient.npz")
    loaded = load_codec(tmp_path / "salient.npz")
    assert loaded.digest() == codec.digest() and loaded.salient == 2
    assert salient_codec(count=3, region_bytes=5).digest() != codec.digest()
    plain = check_codec(codec.mean, codec.basis, codec.bits, codec.levels)
    assert plain.salient == 0 and plain.digest() != codec.digest() and plain.image_bytes(6) == 6 * 12
    image = concepts(np.random.default_rng(15), 6)  # without salient regions an image's codes are its regions' codes
    (blob,) = plain.encode_images([image])
    np.testing.assert_array_equal(blob, plain.encode(image).reshape(-1))
    np.testing.assert_allclose(plain.image_vectors(plain.decode_images([blob], [6]))[0], plain.decode(plain.encode(image)), atol=1e-5)
    salient = (codec.salient, codec.region_bits, codec.region_levels, codec.reference_words)
    with pytest.raises(TeranInputError, match="salient regions 0; expected 1..255"):
        check_codec(codec.mean, codec.basis, codec.bits, codec.levels, salient=(0, *salient[1:]))
    with pytest.raises(TeranInputError, match="reference_words of shape"):
        check_codec(codec.mean, codec.basis, codec.bits, codec.levels, salient=(*salient[:3], np.zeros((4, DIM + 1))))
    with pytest.raises(TeranInputError, match="region_bits and region_levels"):
        check_codec(codec.mean, codec.basis, codec.bits, codec.levels, salient=(2, codec.region_bits[:-1], *salient[2:]))
    with pytest.raises(TeranInputError, match="need training word pieces"):
        train_codec(concepts(np.random.default_rng(0), 2000), 8, salient=2, regions=6, image_bytes=100)
    with pytest.raises(TeranInputError, match="--image-bytes 60: 2 fp16 regions take 66 bytes"):
        train_codec(
            concepts(np.random.default_rng(0), 2000), 8, words=concepts(np.random.default_rng(1), 100), salient=2, regions=6, image_bytes=60
        )


@pytest.mark.slow  # milvus-lite collections
def test_collections_store_salient_regions_and_rerank_on_them(tmp_path):
    codec = salient_codec()
    codec.save(tmp_path / "salient.npz")
    uri, prefix = str(tmp_path / "salient.db"), unique_prefix("salient")
    rng = np.random.default_rng(13)
    items = [image_item(f"img{i}", rng) for i in range(10)]
    words = concepts(rng, 4)
    caption = IndexItem("cap0", vectors_value("captions", words[0], words, word_pieces=["a", "b", "c", "d"], model=("m", 1, DIM)))
    search = DirectSearch(uri, prefix, concept_codec=tmp_path / "salient.npz")
    try:
        search.index([*items, caption])
        assert "2 salient regions as fp16" in search.stats().concept_encoding
        row = search.store.client.query(search.store.name("images"), filter='id == "img3"', output_fields=["concepts_0"])[0]
        assert len(row["concepts_0"]) == 4 * -(-90 // 3)  # 2 x (1 + 32) + 4 x 6 bytes, base64
        decoded = [codec.image_vectors(codec.decode_images(codec.encode_images([i.content.concepts]), [6]))[0] for i in items]
        stored = search.loop.run_until_complete(search.searcher.get(items[3].content.modality, ["img3"], include_vectors=True))[0]
        np.testing.assert_allclose(stored.concepts, decoded[3], atol=2e-3)
        query_words = concepts(np.random.default_rng(14), 3)
        query = vectors_value("captions", query_words.mean(0) / np.linalg.norm(query_words.mean(0)), query_words, model=("m", 1, DIM))
        result = search.search(query, top_k=5, rerank_multiplier=3)
        expected = mrsw_scores(query_words, True, decoded)
        assert result.candidates == 10
        assert [h.score for h in result.hits] == pytest.approx(sorted(expected, reverse=True)[:5], abs=1e-4)
        best = int(np.argmax(expected))
        assert result.hits[0].id == f"img{best}"
        alignment = [a.region_index for a in result.hits[0].alignment]
        assert alignment == (decoded[best] @ query_words.T).argmax(0).tolist()[: len(alignment)]
        # captions stay coded word by word (image to text)
        image_query = vectors_value("images", items[0].content.global_vector, items[0].content.concepts, model=("m", 1, DIM))
        hits = search.search(image_query, top_k=1, rerank_multiplier=2).hits
        caption_words = codec.decode(codec.encode(words))
        assert hits[0].id == "cap0" and hits[0].score == pytest.approx(
            mrsw_scores(items[0].content.concepts, False, [caption_words])[0], abs=1e-4
        )
    finally:
        search.close()
    wide = DirectSearch(uri, unique_prefix("wide"), concept_codec=tmp_path / "salient.npz", max_concepts=300)
    try:  # refused when the collections would be created, before anything is written
        with pytest.raises(CodecMismatch, match="indexed by one byte: --max-concepts 300 exceeds 256"):
            wide.index(items[:1])
        assert wide.stats().images == 0
    finally:
        wide.close()
    with pytest.raises(ValueError, match="an image of 257 regions"):
        codec.encode_images([concepts(rng, 257)])


def image_item(item_id: str, rng: np.random.Generator) -> IndexItem:
    regions = concepts(rng, 6)
    return IndexItem(item_id, vectors_value("images", regions.mean(0) / np.linalg.norm(regions.mean(0)), regions, model=("m", 1, DIM)))


@pytest.mark.slow  # milvus-lite collections or subprocesses
def test_collections_store_codes_keep_the_codec_and_refuse_another(codec, tmp_path):
    codec_path, other_path = tmp_path / "codec.npz", tmp_path / "other.npz"
    codec.save(codec_path)
    train_codec(concepts(np.random.default_rng(9), 20000), bytes_per_vector=6).save(other_path)
    uri, prefix = str(tmp_path / "coded.db"), unique_prefix("codes")
    rng = np.random.default_rng(3)
    items = [image_item(f"img{i}", rng) for i in range(12)]
    search = DirectSearch(uri, prefix, concept_codec=codec_path)
    try:
        search.index(items)
        stats = search.stats()
        assert stats.concept_encoding.startswith("transform codec, 12 bytes per vector") and "1 VARCHAR field" in stats.concept_encoding
        row = search.store.client.query(search.store.name("images"), filter='id == "img3"', output_fields=["concepts_0"])[0]
        assert len(row["concepts_0"]) == 4 * -(-6 * 12 // 3)  # 6 regions x 12 bytes, base64
        stored = search.loop.run_until_complete(search.searcher.get(items[3].content.modality, ["img3"], include_vectors=True))[0]
        np.testing.assert_allclose(stored.concepts, codec.decode(codec.encode(items[3].content.concepts)), atol=2e-3)
        # the re-rank scores the decoded regions against the query's full-precision words
        words = concepts(np.random.default_rng(4), 3)
        query = vectors_value("captions", words.mean(0) / np.linalg.norm(words.mean(0)), words, model=("m", 1, DIM))
        result = search.search(query, top_k=5, rerank_multiplier=3)
        decoded = [codec.decode(codec.encode(item.content.concepts)) for item in items]
        expected = mrsw_scores(words, True, decoded)
        assert result.candidates == 12
        assert [h.score for h in result.hits] == pytest.approx(sorted(expected, reverse=True)[:5], abs=1e-4)
        meta = search.store.client.query(f"{prefix}_meta", filter='id == "collections"', output_fields=["info"])[0]["info"]
        assert meta["concept_encoding"] == "transform-codes-base64-varchar"
        assert meta["codec"]["sha256"] == codec.digest() and meta["codec"]["bytes_per_vector"] == 12
    finally:
        search.close()
    reopened = DirectSearch(uri, prefix)  # no flag: the stored codec
    try:
        assert reopened.store.layout.codec.digest() == codec.digest()
        assert reopened.stats().images == 12
    finally:
        reopened.close()
    with pytest.raises(CodecMismatch, match="differs from the codec stored with the collections"):
        DirectSearch(uri, prefix, concept_codec=other_path)
    plain_prefix = unique_prefix("fp16")
    plain = DirectSearch(uri, plain_prefix)
    try:
        plain.index(items[:2])
        assert plain.stats().concept_encoding.startswith("fp16")
    finally:
        plain.close()
    with pytest.raises(CodecMismatch, match="store fp16 concepts"):
        DirectSearch(uri, plain_prefix, concept_codec=codec_path)


@pytest.mark.slow  # milvus-lite collections or subprocesses
def test_codec_command_line(tmp_path):
    rng = np.random.default_rng(5)
    npz = tmp_path / "concepts.npz"
    np.savez(npz, regions=concepts(rng, 3000).reshape(300, 10, DIM), words=concepts(rng, 2000))
    out = tmp_path / "codec.npz"
    command = [sys.executable, "-m", "search_service.concept_codes", "--npz", str(npz), "--bytes", "6", "--out", str(out)]
    no_words = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)  # salient regions by default
    assert no_words.returncode == 2 and "--salient needs caption word pieces" in no_words.stderr
    salient = [*command, "--word-key", "words", "--salient", "2", "--regions", "10", "--image-bytes", "130"]
    result = subprocess.run(salient, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 salient regions as fp16, the others 8 bytes" in result.stdout, result.stdout
    assert (load_codec(out).salient, load_codec(out).image_bytes(10)) == (2, 130)
    command += ["--salient", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "6 bytes per vector" in result.stdout and "5000 of 5000 concept vectors" in result.stdout
    assert load_codec(out).bytes_per_vector == 6 and load_codec(out).salient == 0
    bad = subprocess.run([*command, "--bytes", "99"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--bytes 99" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "search_service.concept_codes", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "give the training vectors" in missing.stderr


@pytest.mark.slow  # milvus-lite collections or subprocesses
def test_fp16_collections_are_copied_into_coded_ones(codec, tmp_path):
    from search_service.convert_concepts import main as convert_main

    codec_path = tmp_path / "codec.npz"
    codec.save(codec_path)
    uri, old, new = str(tmp_path / "convert.db"), unique_prefix("old"), unique_prefix("new")
    rng = np.random.default_rng(7)
    items = [image_item(f"img{i}", rng) for i in range(7)]
    words = concepts(rng, 4)
    caption = IndexItem(
        "cap0", vectors_value("captions", words[0], words, word_pieces=["a", "b", "c", "d"], model=("m", 1, DIM)), '{"k": 2}'
    )
    source = DirectSearch(uri, old)
    try:
        source.index([*items, caption])
    finally:
        source.close()
    argv = ["--milvus-uri", uri, "--from-prefix", old, "--to-prefix", new, "--concept-codec", str(codec_path), "--batch", "3"]
    assert convert_main(argv) == 0
    assert convert_main(argv) == 0  # again: upserts, nothing doubled
    assert convert_main([*argv[:4], "--to-prefix", old, *argv[6:]]) == 2  # into itself
    assert convert_main(["--milvus-uri", uri, "--from-prefix", "nothing_here", *argv[4:]]) == 2
    target = DirectSearch(uri, new)
    try:
        stats = target.stats()
        assert (stats.images, stats.captions) == (7, 1) and stats.concept_encoding.startswith("transform codec")
        got = target.loop.run_until_complete(target.searcher.get(caption.content.modality, ["cap0"], include_vectors=True))[0]
        assert (got.metadata, got.word_pieces) == ({"k": 2}, ["a", "b", "c", "d"])
        np.testing.assert_allclose(got.concepts, codec.decode(codec.encode(words)), atol=2e-3)
        np.testing.assert_allclose(got.global_vector, words[0], atol=1e-6)
    finally:
        target.close()


@pytest.mark.slow  # milvus-lite collections
def test_codec_recovered_when_the_layout_row_is_lost(codec, tmp_path):
    """A crash between writing the codec rows and the `collections` row: the codec is read back from its rows."""
    codec_path = tmp_path / "codec.npz"
    codec.save(codec_path)
    uri, prefix = str(tmp_path / "lost.db"), unique_prefix("lost")
    items = [image_item(f"img{i}", np.random.default_rng(i)) for i in range(3)]
    first = DirectSearch(uri, prefix, concept_codec=codec_path)
    try:
        first.index(items)
        first.store.client.delete(f"{prefix}_meta", filter='id == "collections"')
    finally:
        first.close()
    reopened = DirectSearch(uri, prefix)  # no flag: the codec comes from PREFIX_meta's rows
    try:
        assert reopened.store.layout.codec.digest() == codec.digest()
        got = reopened.loop.run_until_complete(reopened.searcher.get(items[1].content.modality, ["img1"], include_vectors=True))[0]
        np.testing.assert_allclose(got.concepts, codec.decode(codec.encode(items[1].content.concepts)), atol=2e-3)
    finally:
        reopened.close()
