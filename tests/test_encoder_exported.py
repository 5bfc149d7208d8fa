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

from encoder_service.server import ServerThread
from teran.manifest import ManifestError, load_manifest
from teran_api.encoder_client import EncoderClient, EncoderError, RegionFeatures

pytestmark = pytest.mark.slow  # exports and serves real backbones

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "export/*.py",
    "teran/model.py",
    "teran/backbones.py",
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


def _cached_export(request, tmp_path_factory, name: str, **options) -> Path:
    key = _source_key()
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"teran-encoder-{name}-{key}") if cache is not None else tmp_path_factory.mktemp(name)
    model_dir = Path(folder) / "model"
    try:
        load_manifest(model_dir, verify=True)
    except ManifestError:
        pytest.importorskip("torch")
        pytest.importorskip("export.exporter")
        shutil.rmtree(model_dir, ignore_errors=True)
        build_exported_model_dir(model_dir, **options)
    return model_dir


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    return _cached_export(request, tmp_path_factory, "exported")


@pytest.fixture(scope="module")
def exported_tuned_image(request, tmp_path_factory):
    """A model tuning the image trunk's top block: its backbone graph is the real trunk below it."""
    return _cached_export(request, tmp_path_factory, "exported-tuned-image", image_tuned_blocks=1)


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


def test_model_tuning_the_image_trunk_serves_jpegs_like_torch_and_takes_only_whole_grids(exported_tuned_image):
    import grpc
    import torch

    from teran.backbones import GridImageBackbone
    from teran.checkpoint import load_model
    from teran.preprocess import PixelSpec, decode_image, to_pixels

    manifest = load_manifest(exported_tuned_image)
    assert manifest.preprocessing.region_dim == 192 and manifest.preprocessing.region_count == 49
    model, _ = load_model(exported_tuned_image.parent / f"{exported_tuned_image.name}-tiny.pt")
    jpeg = image_bytes(120, 80, seed=5)
    with torch.no_grad():
        grid, boxes = GridImageBackbone(drop_top_blocks=1)(torch.from_numpy(to_pixels(decode_image(jpeg), PixelSpec())[None]))
        expected = model.image(grid, boxes, torch.ones(1, 49, dtype=torch.bool))
    with ServerThread(make_config(exported_tuned_image)) as running, EncoderClient(running.target) as client:
        info = client.model_info()
        assert info.region_dim == 192 and info.region_count == 49
        image = client.encode_images([jpeg])[0]
        np.testing.assert_allclose(image.global_vector, expected.global_vec[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(image.concepts, expected.concepts[0].numpy(), atol=1e-4)
        # Precomputed features must be the whole grid below the tuned blocks.
        whole = client.encode_images([RegionFeatures(grid[0].numpy(), boxes[0].numpy())])[0]
        np.testing.assert_allclose(whole.global_vector, image.global_vector, atol=1e-5)
        feats, part = regions(36, 192, seed=2)
        with pytest.raises(EncoderError) as caught:
            client.encode_images([RegionFeatures(feats, part)])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            caught.value.details
            == "images[0].regions.features: this model takes exactly 49 regions (the backbone's 7x7 grid, row-major), got 36"
        )
        with pytest.raises(EncoderError, match=r"images\[0\]\.regions\.features: no regions; send exactly 49"):
            client.encode_images([RegionFeatures(np.zeros((0, 192), np.float32), np.zeros((0, 4), np.float32))])
