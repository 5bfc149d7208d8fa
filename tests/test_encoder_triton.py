"""The Triton backend through the real tritonclient against a KServe v2 GRPCInferenceService
test server (tritonclient's own generated service) on loopback, which runs the model
directory's triton/ repository with onnxruntime: results equal the in-process backend."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from encoder_fixtures import TritonTestServer, build_synthetic_model_dir, image_bytes, make_config, regions

from encoder_service.backends import BackendError, TritonBackend
from encoder_service.server import ServerThread
from teran.manifest import load_manifest
from teran_api.encoder_client import EncoderClient, EncoderError, RegionFeatures

CAPTIONS = ["a dog runs on the beach", "two cats", "a man in a red shirt climbs a rock wall"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_synthetic_model_dir(tmp_path_factory.mktemp("triton") / "model")


@pytest.fixture(scope="module")
def triton(model_dir):
    server = TritonTestServer(model_dir)
    yield server
    server.stop()


def test_triton_backend_equals_onnxruntime_backend(model_dir, triton):
    images = [image_bytes(seed=1), RegionFeatures(*regions(7, 12, seed=2)), image_bytes(90, 30, "PNG", seed=3)]
    local = ServerThread(make_config(model_dir), warmup=False)
    remote = ServerThread(make_config(model_dir, backend="triton", triton_url=triton.url, triton_timeout_s=10.0))
    try:
        with EncoderClient(local.target) as a, EncoderClient(remote.target) as b:
            info = b.model_info()
            assert info.backend == "triton" and triton.url in info.backend_detail
            for x, y in zip(a.encode_captions(CAPTIONS), b.encode_captions(CAPTIONS), strict=True):
                np.testing.assert_allclose(y.global_vector, x.global_vector, atol=1e-6)
                np.testing.assert_allclose(y.concepts, x.concepts, atol=1e-6)
                assert x.word_pieces == y.word_pieces
            for x, y in zip(a.encode_images(images), b.encode_images(images, dtype="float16"), strict=True):
                np.testing.assert_allclose(y.global_vector.astype(np.float32), x.global_vector, atol=1e-3)
                np.testing.assert_allclose(y.concepts.astype(np.float32), x.concepts, atol=1e-3)
                np.testing.assert_allclose(y.boxes, x.boxes, atol=1e-6)
            streamed = list(b.stream_encode_captions([[c] for c in CAPTIONS]))
            assert [len(s) for s in streamed] == [1, 1, 1]
        assert (
            triton.calls.get("text_encoder", 0) >= 3
            and triton.calls.get("image_backbone", 0) >= 1
            and triton.calls.get("image_encoder", 0) >= 1
        )
    finally:
        local.stop()
        remote.stop()


def test_triton_failures_are_reported(model_dir, triton):
    manifest = load_manifest(model_dir, verify=False)
    wrong = TritonBackend(manifest, model_dir, url=triton.url, model_names={"text_encoder": "no_such_model"}, timeout_s=5.0)
    with pytest.raises(BackendError, match="'no_such_model' version 1 is not ready"):
        wrong.load()
    # Triton goes away after startup: the encoder answers UNAVAILABLE and keeps serving health.
    lonely = TritonTestServer(model_dir)
    with ServerThread(make_config(model_dir, backend="triton", triton_url=lonely.url, triton_timeout_s=3.0)) as running:
        lonely.stop()
        with EncoderClient(running.target) as client:
            with pytest.raises(EncoderError) as info:
                client.encode_captions(["a dog"])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "the Triton backend is unavailable" in info.value.details
            assert lonely.url.rsplit(":", 1)[-1] not in info.value.details  # its address stays in the service log
            assert client.health() == "SERVING"
