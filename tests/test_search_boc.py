"""The Bag-of-Concepts (BoC) first stage on real milvus-lite, through the Searcher (no gRPC: the wire is
tested in test_search_service): the codebook CLI, boc_vector fields written at index time, BAG_OF_CONCEPTS
searches (then the MrSw re-rank), the codebook stored with the collections (restart, mismatch refused), and
bad codebooks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from search_fixtures import ROOT, DirectSearch, random_unit, search_config, unique_prefix, vectors_value

from demo.milvus_standalone import MilvusStandalone, drop_collections
from search_service import codebook as codebook_cli
from search_service.config import ConfigError
from search_service.errors import PreconditionFailed
from search_service.layout import CodebookMismatch
from search_service.server import ServerThread
from search_service.sparse import check_codebook, codebook_digest, item_boc, kmeans_codebook, load_codebook
from teran.errors import TeranInputError
from teran_api.types import FirstStage, IndexItem

pytestmark = pytest.mark.slow  # Bag-of-Concepts collections: codebooks, restarts, a Milvus server

DIM = 16
CLUSTERS = 8
# image i has regions near the cluster centres i, i+1, i+3 (mod 8): two images share at most one centre
IMAGE_CENTRES = [[i, (i + 1) % CLUSTERS, (i + 3) % CLUSTERS] for i in range(CLUSTERS)]


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centres = random_unit(rng, CLUSTERS, DIM)

    def near(ids):
        x = centres[ids] + 0.05 * rng.standard_normal((len(ids), DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    images = {f"img{i}": near(c) for i, c in enumerate(IMAGE_CENTRES)}
    captions = {f"cap{i}": near([i, (i + 5) % CLUSTERS]) for i in range(CLUSTERS)}
    regions = np.concatenate(list(images.values()))
    codebook = kmeans_codebook(regions, CLUSTERS, seed=0)
    globals_ = {k: random_unit(rng, DIM) for k in [*images, *captions]}
    return {"images": images, "captions": captions, "codebook": codebook, "globals": globals_, "regions": regions}


@pytest.fixture(scope="module")
def codebook_file(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("boc") / "codebook.npy"
    np.save(path, data["codebook"])
    return path


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lite-boc") / "search.db")


def image_item(data, item_id):
    concepts = data["images"][item_id]
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (len(concepts), 1))
    vectors = vectors_value("images", data["globals"][item_id], concepts, boxes=boxes)
    return IndexItem(item_id, vectors, json.dumps({"id": item_id}))


def caption_item(data, item_id):
    concepts = data["captions"][item_id]
    pieces = [f"w{i}" for i in range(len(concepts))]
    return IndexItem(item_id, vectors_value("captions", data["globals"][item_id], concepts, word_pieces=pieces))


def caption_query(global_vector, concepts):
    return vectors_value("captions", global_vector, concepts, word_pieces=[f"q{i}" for i in range(len(concepts))])


def Service(uri: str, prefix: str | None = None, **overrides) -> DirectSearch:
    return DirectSearch(uri, prefix or unique_prefix("boc"), **overrides)


@pytest.fixture
def services(lite_uri):
    running: list[Service] = []

    def make(**overrides) -> Service:
        service = Service(lite_uri, **overrides)
        running.append(service)
        return service

    yield make
    for service in running:
        service.close()


def indexed(service, data):
    response = service.index([image_item(data, k) for k in data["images"]] + [caption_item(data, k) for k in data["captions"]])
    assert (response.images, response.captions) == (CLUSTERS, CLUSTERS)
    return service


def stored_boc(service, modality):
    store = service.store
    rows = store.client.query(store.name(modality), filter='id != ""', output_fields=["id", "boc_vector"], consistency_level="Strong")
    return {r["id"]: {int(k): float(v) for k, v in dict(r["boc_vector"]).items()} for r in rows}


# --------------------------------------------------------------------------- index and search


def test_index_stores_boc_vectors(services, codebook_file, data):
    service = indexed(services(boc_codebook=codebook_file), data)
    stats = service.stats()
    assert list(stats.first_stages) == [FirstStage.DENSE, FirstStage.BAG_OF_CONCEPTS]
    codebook = load_codebook(codebook_file)
    params = {"boc_top": 1, "boc_keep": 0, "boc_temperature": 0.05}
    for modality, image in (("images", True), ("captions", False)):
        stored = stored_boc(service, modality)
        assert sorted(stored) == sorted(data[modality])
        for item_id, concepts in data[modality].items():
            expected = item_boc(concepts, image, codebook, params)
            assert stored[item_id].keys() == expected.keys()
            for k, w in expected.items():
                assert stored[item_id][k] == pytest.approx(w, rel=1e-6)
    # hard assignment: an image's 3 regions fall on 3 distinct codewords (max-pooled, weight 1)
    assert all(sorted(v.values()) == pytest.approx([1.0, 1.0, 1.0]) for v in stored_boc(service, "images").values())


def test_boc_first_stage_finds_the_item_of_its_concepts(services, codebook_file, data):
    service = indexed(services(boc_codebook=codebook_file), data)
    rng = np.random.default_rng(3)
    for item_id, regions in data["images"].items():
        query = caption_query(random_unit(rng, DIM), regions)  # a caption query made of the image's region vectors
        plain = service.search(query, top_k=3, first_stage=FirstStage.BAG_OF_CONCEPTS, disable_rerank=True)
        assert plain.hits[0].id == item_id
        assert plain.hits[0].first_stage_score == pytest.approx(3.0, rel=1e-5)  # 3 words x weight 1 on its 3 codewords
        assert plain.hits[1].first_stage_score <= 1.0 + 1e-5  # other images share at most one codeword
        reranked = service.search(query, top_k=3, first_stage=FirstStage.BAG_OF_CONCEPTS, rerank_multiplier=3)
        assert reranked.reranked and reranked.hits[0].id == item_id
    # image query -> captions: cap_i sits near centres i and i+5
    image = vectors_value("images", random_unit(rng, DIM), data["captions"]["cap2"])
    hits = service.search(image, top_k=2, first_stage=FirstStage.BAG_OF_CONCEPTS, disable_rerank=True).hits
    assert hits[0].id == "cap2"


def test_boc_rerank_equals_dense_rerank_over_whole_collection(services, codebook_file, data):
    # soft assignment over every codeword: every item shares a codeword with every query, so R_m x top_k >= the
    # collection size makes the BoC candidates the whole collection, as the dense first stage's
    service = indexed(services(boc_codebook=codebook_file, boc_top=CLUSTERS, boc_temperature=0.5), data)
    rng = np.random.default_rng(5)
    queries = [caption_query(random_unit(rng, DIM), random_unit(rng, 4, DIM)) for _ in range(3)]
    queries += [caption_query(random_unit(rng, DIM), data["captions"][f"cap{i}"]) for i in range(3)]
    for query in queries:
        boc = service.search(query, top_k=5, rerank_multiplier=4, first_stage=FirstStage.BAG_OF_CONCEPTS)
        dense = service.search(query, top_k=5, rerank_multiplier=4, first_stage=FirstStage.DENSE)
        assert boc.candidates == dense.candidates == CLUSTERS
        assert [h.id for h in boc.hits] == [h.id for h in dense.hits]
        assert [h.score for h in boc.hits] == pytest.approx([h.score for h in dense.hits], abs=1e-6)
        assert all(len(h.alignment) == query.concepts.shape[0] for h in boc.hits)  # one term per query word
    image = vectors_value("images", random_unit(rng, DIM), random_unit(rng, 3, DIM))
    boc = service.search(image, top_k=4, rerank_multiplier=2, first_stage=FirstStage.BAG_OF_CONCEPTS)
    dense = service.search(image, top_k=4, rerank_multiplier=2)
    assert [h.id for h in boc.hits] == [h.id for h in dense.hits]
    assert [h.score for h in boc.hits] == pytest.approx([h.score for h in dense.hits], abs=1e-6)


# --------------------------------------------------------------------------- the codebook with the collections


def test_codebook_survives_restart_and_mismatch_is_refused(lite_uri, codebook_file, data, tmp_path):
    first = Service(lite_uri, boc_codebook=codebook_file, boc_top=2)
    prefix = first.prefix
    try:
        indexed(first, data)
        query = caption_query(data["globals"]["img5"], data["images"]["img5"])
        before = first.search(query, top_k=4, first_stage=FirstStage.BAG_OF_CONCEPTS, disable_rerank=True)
        rows = first.store.client.query(f"{prefix}_meta", filter='id == "collections"', output_fields=["info"])
        info = rows[0]["info"]
        assert info["sparse"] == ["boc"] and info["sparse_params"]["boc_top"] == 2
        assert info["boc"]["codewords"] == CLUSTERS and info["boc"]["dimension"] == DIM
        assert info["boc"]["sha256"] == codebook_digest(check_codebook(data["codebook"]))
    finally:
        first.close()

    def same_results(service):
        again = service.search(query, top_k=4, first_stage=FirstStage.BAG_OF_CONCEPTS, disable_rerank=True)
        assert [(h.id, h.first_stage_score) for h in again.hits] == [(h.id, h.first_stage_score) for h in before.hits]
        assert list(service.stats().first_stages) == [FirstStage.DENSE, FirstStage.BAG_OF_CONCEPTS]

    # reopened without the flag (and with other BoC settings): the stored codebook and parameters are used
    reopened = Service(lite_uri, prefix=prefix, boc_top=1)
    try:
        np.testing.assert_array_equal(reopened.store.codebook, check_codebook(data["codebook"]))
        assert reopened.store.sparse_params["boc_top"] == 2
        same_results(reopened)
        reopened.index([image_item(data, "img5")])  # re-indexed with the stored codebook
        same_results(reopened)
    finally:
        reopened.close()
    # the same codebook again: accepted
    same = Service(lite_uri, prefix=prefix, boc_codebook=codebook_file)
    try:
        same_results(same)
    finally:
        same.close()
    # a different codebook: refused at start, naming both
    other = tmp_path / "other.npy"
    np.save(other, kmeans_codebook(data["regions"], CLUSTERS, seed=1)[::-1])
    with pytest.raises(CodebookMismatch, match="differs from the codebook stored with the collections"):
        Service(lite_uri, prefix=prefix, boc_codebook=other)
    # collections created without BoC refuse a codebook too (their items have no boc_vector)
    plain = Service(lite_uri)
    plain_prefix = plain.prefix
    try:
        plain.index([image_item(data, "img0")])
    finally:
        plain.close()
    with pytest.raises(CodebookMismatch, match="created without a BoC codebook"):
        Service(lite_uri, prefix=plain_prefix, boc_codebook=codebook_file)


def test_codebook_recovered_when_the_layout_row_is_lost(lite_uri, codebook_file, data):
    """A crash between writing the codebook rows and the `collections` row: the rows are read back."""
    from pymilvus import MilvusClient

    first = Service(lite_uri, boc_codebook=codebook_file)
    prefix = first.prefix
    try:
        indexed(first, data)
        first.store.client.delete(f"{prefix}_meta", filter='id == "collections"')
    finally:
        first.close()
    client = MilvusClient(uri=lite_uri)
    try:
        assert client.query(f"{prefix}_meta", filter='id == "collections"', output_fields=["id"]) == []
    finally:
        client.close()
    reopened = Service(lite_uri, prefix=prefix)  # no flag: the codebook comes from PREFIX_meta's rows
    try:
        np.testing.assert_array_equal(reopened.store.codebook, check_codebook(data["codebook"]))
        query = caption_query(data["globals"]["img4"], data["images"]["img4"])
        hits = reopened.search(query, top_k=2, first_stage=FirstStage.BAG_OF_CONCEPTS, disable_rerank=True).hits
        assert hits[0].id == "img4"
    finally:
        reopened.close()


def test_boc_search_without_codebook_names_backend_and_allowed(services, data):
    service = services(sparse_surrogates=["sq"])
    service.index([image_item(data, "img0")])
    query = caption_query(data["globals"]["img0"], data["images"]["img0"])
    with pytest.raises(PreconditionFailed, match="no boc_vector field") as info:
        service.search(query, first_stage=FirstStage.BAG_OF_CONCEPTS)
    details = str(info.value)
    assert "milvus-lite" in details and "allowed here: DENSE, SCALAR_QUANTIZATION" in details and "--boc-codebook" in details
    assert service.search(query, top_k=1, first_stage=FirstStage.SCALAR_QUANTIZATION).hits[0].id == "img0"


def test_milvus_23_server_has_no_boc_and_says_so(tmp_path_factory, codebook_file, data):
    """Milvus 2.3 (PyPI `milvus` standalone) has no sparse vectors: collections without boc_vector, a clear error."""
    pytest.importorskip("milvus", reason="the PyPI `milvus` package (Milvus standalone server) is not installed")
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-standalone-boc"))
    prefix = unique_prefix("boc")
    try:
        service = Service(server.uri, prefix=prefix, boc_codebook=codebook_file)
        try:
            indexed(service, data)
            stats = service.stats()
            assert not stats.sparse_vectors_supported and list(stats.first_stages) == [FirstStage.DENSE]
            assert service.store.codebook is None
            query = caption_query(data["globals"]["img1"], data["images"]["img1"])
            with pytest.raises(PreconditionFailed) as info:
                service.search(query, first_stage=FirstStage.BAG_OF_CONCEPTS)
            details = str(info.value)
            assert "this backend, milvus " in details and "has no sparse vectors" in details and "allowed here: DENSE." in details
            assert service.search(query, top_k=1, rerank_multiplier=8).hits[0].id == "img1"
        finally:
            service.close()
        again = Service(server.uri, prefix=prefix, boc_codebook=codebook_file)  # the unused codebook is no error here
        again.close()
    finally:
        drop_collections(server.uri, prefix)
        server.stop()


# --------------------------------------------------------------------------- bad codebooks and settings


def test_codebook_with_wrong_dimension_is_refused_before_storing(services, tmp_path, data):
    path = tmp_path / "dim8.npy"
    np.save(path, random_unit(np.random.default_rng(0), 4, 8))
    service = services(boc_codebook=path)
    with pytest.raises(CodebookMismatch, match="--boc-codebook has dimension 8") as info:
        service.index([image_item(data, "img0")])
    details = str(info.value)
    assert "dimension 16" in details
    stats = service.stats()
    assert (stats.images, stats.captions, stats.model) == (0, 0, None)  # nothing created or stored


def test_bad_codebook_files_and_settings(lite_uri, tmp_path):
    bad = {
        "vector.npy": (np.ones(16, np.float32), "expected [codewords, dimension]"),
        "nan.npy": (np.full((4, 16), np.nan, np.float32), "NaN"),
        "zero.npy": (np.zeros((4, 16), np.float32), "all-zero codewords"),
        "text.npy": (np.array([["a", "b"]]), "not numeric"),
    }
    for name, (array, message) in bad.items():
        np.save(tmp_path / name, array)
        with pytest.raises(TeranInputError, match=re.escape(message)):
            load_codebook(tmp_path / name)
    with pytest.raises(TeranInputError, match="no such .npy codebook file"):
        load_codebook(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(TeranInputError, match="not a .npy codebook"):
        load_codebook(tmp_path / "junk.npy")
    with pytest.raises(TeranInputError, match="expected"):  # the service refuses to start (exit code 2 in __main__)
        ServerThread(search_config(lite_uri, collection_prefix=unique_prefix("boc"), boc_codebook=tmp_path / "vector.npy"))
    with pytest.raises(ConfigError, match="boc needs a codebook"):
        search_config(lite_uri, sparse_surrogates=["boc"])
    for name, value, message in (("boc_top", 0, ">= 1"), ("boc_keep", -1, ">= 0"), ("boc_temperature", 0.0, "> 0")):
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}.*{message}"):
            search_config(lite_uri, **{name: value})


def test_service_exit_codes_for_bad_boc_settings(tmp_path):
    np.save(tmp_path / "vector.npy", np.ones(16, np.float32))
    base = [sys.executable, "-m", "search_service", "--milvus-uri", str(tmp_path / "x.db"), "--port", "0", "--metrics-port", "-1"]
    for extra, message in (
        (["--boc-codebook", str(tmp_path / "vector.npy")], "expected [codewords, dimension]"),
        (["--sparse-surrogates", "boc"], "boc needs a codebook"),
    ):
        result = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr


def test_service_help_documents_boc():
    from search_service.config import build_parser

    text = build_parser().format_help()
    for flag in ("--boc-codebook", "--boc-top", "--boc-keep", "--boc-temperature", "TERAN_SEARCH_BOC_CODEBOOK"):
        assert flag in text


# --------------------------------------------------------------------------- the codebook CLI


def test_codebook_cli(tmp_path, data, capsys):
    npz = tmp_path / "regions.npz"
    padded = np.zeros((CLUSTERS, 5, DIM), np.float32)  # [N, R, D] with zero padding rows
    for i, regions in enumerate(data["images"].values()):
        padded[i, :3] = regions
    np.savez(npz, regions=padded, other=np.ones((2, 3), np.float32))
    out = tmp_path / "cb.bin"
    assert codebook_cli.main(["--npz", str(npz), "--key", "regions", "--size", str(CLUSTERS), "--out", str(out)]) == 0
    assert f"{CLUSTERS} codewords x {DIM} from {3 * CLUSTERS} concept vectors" in capsys.readouterr().out
    written = load_codebook(out)  # the exact name, no .npy appended
    np.testing.assert_allclose(written, kmeans_codebook(data["regions"], CLUSTERS, seed=0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(written, axis=1), 1.0, rtol=1e-5)
    cases = [
        (["--npz", str(npz), "--size", "4", "--out", str(out)], "different dimensions"),  # both arrays
        (["--npz", str(npz), "--key", "nope", "--out", str(out)], "--key: nope not in"),
        (["--npz", str(npz), "--key", "regions", "--size", "100", "--out", str(out)], "24 concept vectors for a codebook of --size 100"),
        (["--npz", str(tmp_path / "missing.npz"), "--out", str(out)], "no such .npz/.npy file"),
        (["--npz", str(npz), "--size", "0", "--out", str(out)], "--size: must be >= 1"),
        (["--images", str(tmp_path), "--out", str(out)], "--images needs --encoder-address"),
        (["--images", str(tmp_path), "--encoder-address", "127.0.0.1:1", "--out", str(out)], "no *.jpg"),
    ]
    for argv, message in cases:
        assert codebook_cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        codebook_cli.main(["--out", str(out)])  # no source: argparse usage error
    assert exit_info.value.code == 2
    result = subprocess.run([sys.executable, "-m", "search_service.codebook", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "--encoder-address" in result.stdout and "--npz" in result.stdout


def test_codebook_cli_from_images_via_encoder(tmp_path, capsys):
    from encoder_fixtures import build_synthetic_model_dir, image_bytes, make_config

    from encoder_service.server import ServerThread as EncoderThread

    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"im{i}.jpg").write_bytes(image_bytes(seed=i))
    (images / "notes.txt").write_text("ignored")
    out = tmp_path / "codebook.npy"
    with EncoderThread(make_config(model_dir, max_items=8)) as encoder:
        argv = ["--images", str(images), "--encoder-address", encoder.target, "--size", "8", "--batch", "1", "--out", str(out)]
        assert codebook_cli.main(argv) == 0
    assert f"8 codewords x {DIM} from 98 concept vectors" in capsys.readouterr().out  # 2 images x 7x7 regions
    assert load_codebook(out).shape == (8, DIM)
    # the encoder is gone: exit 1, not a traceback
    assert codebook_cli.main(argv) == 1
    assert "error:" in capsys.readouterr().err
