"""The encoder serving a model directory written by the real exporter (`export.exporter`) from a
tiny random checkpoint with tiny injected backbones. The export (~30 s on 2 cores) is cached in
pytest's cache folder, keyed by the exporter's and the model's source code."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from encoder_fixtures import Reference, TritonTestServer, build_exported_model_dir, image_bytes, make_config, regions

from encoder_service.client import EncoderClient, RegionFeatures
from encoder_service.server import ServerThread
from teran.manifest import ManifestError, load_manifest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "export/*.py",
    "teran/model.py",
    "teran/manifest.py",
    "teran/checkpoint.py",
    "teran/config.py",
    "teran/preprocess.py",
    "tests/encoder_fixtures.py",
]
CAPTIONS = ["a dog runs on the beach", "two cats", "a man in a red shirt is climbing a very tall rock wall"]


def _source_key() -> str:
    digest = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    key = _source_key()
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"teran-encoder-exported-{key}") if cache is not None else tmp_path_factory.mktemp("exported")
    model_dir = Path(folder) / "model"
    try:
        load_manifest(model_dir, verify=True)
    except ManifestError:
        pytest.importorskip("torch")
        pytest.importorskip("export.exporter")
        shutil.rmtree(model_dir, ignore_errors=True)
        build_exported_model_dir(model_dir)
    return model_dir


def test_exported_model_served_equals_onnx_graphs(exported):
    reference = Reference(exported)
    feats, boxes = regions(30, 12, seed=1, width=500, height=400)
    with ServerThread(make_config(exported)) as running, EncoderClient(running.target) as client:
        info = client.model_info()
        assert info.model.name == "tiny-exported" and info.model.dimension == 8 and info.limits["max_batch"] == 16
        results = client.encode_captions(CAPTIONS)
        for caption, result in zip(CAPTIONS, results, strict=True):
            glob, concepts, pieces = reference.caption(caption)
            assert result.word_pieces == pieces
            np.testing.assert_allclose(result.global_vector, glob, atol=1e-5)
            np.testing.assert_allclose(result.concepts, concepts, atol=1e-5)
        jpeg = image_bytes(120, 80, seed=5)
        image, precomputed = client.encode_images([jpeg, RegionFeatures(feats, boxes, 500, 400)])
        glob, concepts, grid = reference.image_from_bytes(jpeg)
        np.testing.assert_allclose(image.global_vector, glob, atol=1e-5)
        np.testing.assert_allclose(image.concepts, concepts, atol=1e-5)
        np.testing.assert_allclose(image.boxes, grid, atol=1e-6)
        glob, concepts = reference.image_from_regions(feats, boxes, 500, 400)
        np.testing.assert_allclose(precomputed.global_vector, glob, atol=1e-5)
        np.testing.assert_allclose(precomputed.concepts, concepts, atol=1e-5)


def test_exported_fp16_graphs_and_triton_repository(exported):
    reference16 = Reference(exported, "fp16")
    with ServerThread(make_config(exported, precision="fp16"), warmup=False) as running, EncoderClient(running.target) as client:
        result = client.encode_captions([CAPTIONS[0]])[0]
        np.testing.assert_allclose(result.global_vector, reference16.caption(CAPTIONS[0])[0], atol=2e-3)
    triton = TritonTestServer(exported)  # serves the exporter's triton/ repository files
    local = ServerThread(make_config(exported), warmup=False)
    remote = ServerThread(make_config(exported, backend="triton", triton_url=triton.url))
    try:
        with EncoderClient(local.target) as a, EncoderClient(remote.target) as b:
            for x, y in zip(a.encode_captions(CAPTIONS), b.encode_captions(CAPTIONS), strict=True):
                np.testing.assert_allclose(y.concepts, x.concepts, atol=1e-6)
            jpeg = image_bytes(seed=9)
            np.testing.assert_allclose(b.encode_images([jpeg])[0].global_vector, a.encode_images([jpeg])[0].global_vector, atol=1e-6)
    finally:
        local.stop()
        remote.stop()
        triton.stop()
