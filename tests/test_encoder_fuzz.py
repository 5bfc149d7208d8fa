"""Hypothesis throws random (mostly malformed) requests at a live encoder: every answer is OK
or INVALID_ARGUMENT (never INTERNAL / UNKNOWN), OK answers are well-formed, and the server
keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from encoder_fixtures import build_synthetic_model_dir, image_bytes, make_config
from fuzz_strategies import tensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from encoder_service.server import ServerThread
from teran_api._proto import common_pb2, encoder_pb2, encoder_pb2_grpc
from teran_api.encoder_client import EncoderClient

FUZZ = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
IMAGES = [image_bytes(64, 48, "JPEG", 1), image_bytes(33, 70, "PNG", 2), image_bytes(20, 20, "WEBP", 3)]
REGION_DIM = 12


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = build_synthetic_model_dir(tmp_path_factory.mktemp("fuzz") / "model")
    with ServerThread(make_config(model_dir, max_queue_delay_ms=0.0), warmup=False) as running:
        channel = grpc.insecure_channel(running.target)
        yield running, encoder_pb2_grpc.EncoderServiceStub(channel)
        channel.close()


def call(method, request):
    try:
        return grpc.StatusCode.OK, method(request, timeout=20), ""
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details()


def check_vectors(item, dtype_code: int, global_only: bool) -> None:
    dtype = np.float16 if dtype_code == common_pb2.Tensor.FLOAT16 else np.float32
    glob = np.frombuffer(item.global_vector.data, dtype).astype(np.float32)
    assert glob.shape == (8,) and np.isfinite(glob).all()
    assert abs(float(np.linalg.norm(glob)) - 1.0) < 5e-3
    assert item.HasField("concepts") != global_only
    if not global_only:
        concepts = np.frombuffer(item.concepts.data, dtype).reshape(tuple(item.concepts.shape))
        assert np.isfinite(concepts).all()


dtype_codes = st.sampled_from([0, 1, 2] * 4 + [3, 99])
texts = st.one_of(
    st.sampled_from(["a dog runs", "two cats on a sofa", "A MAN, a plan; a canal!", "🐶 on a 🏖️", "Ünïcödé café"]),
    st.text(min_size=1, max_size=40),
    st.sampled_from(["", "   ", "word " * 40, "x" * 1001, "\x00"]),
)
caption_requests = st.builds(
    lambda captions, dtype, global_only, rid: encoder_pb2.EncodeCaptionsRequest(
        captions=captions, output_dtype=dtype, global_only=global_only, request_id=rid
    ),
    st.lists(texts, max_size=5) | st.lists(texts, max_size=10),
    dtype_codes,
    st.booleans(),
    st.text(max_size=8),
)


@st.composite
def image_inputs(draw):
    kind = draw(st.sampled_from(["file"] * 4 + ["regions"] * 3 + ["truncated", "bytes", "empty"]))
    if kind == "file":
        return encoder_pb2.ImageInput(encoded=draw(st.sampled_from(IMAGES)))
    if kind == "truncated":
        data = draw(st.sampled_from(IMAGES))
        return encoder_pb2.ImageInput(encoded=data[: draw(st.integers(0, len(data) - 1))])
    if kind == "bytes":
        return encoder_pb2.ImageInput(encoded=draw(st.binary(max_size=300)))
    if kind == "empty":
        return encoder_pb2.ImageInput()
    width, height = draw(st.sampled_from([(0, 0), (0, 0), (640, 480), (10, 0), (100000, 5)]))
    rows = draw(st.integers(0, 70))
    regions = encoder_pb2.RegionFeatures(
        features=draw(tensors(REGION_DIM, rows)), boxes=draw(tensors(4, rows)), image_width=width, image_height=height
    )
    return encoder_pb2.ImageInput(regions=regions)


image_requests = st.builds(
    lambda images, dtype, global_only: encoder_pb2.EncodeImagesRequest(images=images, output_dtype=dtype, global_only=global_only),
    st.lists(image_inputs(), max_size=9).filter(lambda x: len(x) <= 4) | st.lists(image_inputs(), max_size=9),
    dtype_codes,
    st.booleans(),
)


@FUZZ
@given(request=caption_requests)
def test_fuzz_captions(live, request):
    _server, stub = live
    code, response, details = call(stub.EncodeCaptions, request)
    event(f"captions {code.name}")
    assert code in ALLOWED, (code, details)
    if code == grpc.StatusCode.OK:
        assert len(response.captions) == len(request.captions) and response.request_id == request.request_id
        for item in response.captions:
            check_vectors(item, request.output_dtype, request.global_only)
            if not request.global_only:
                assert len(item.word_pieces) == item.concepts.shape[0]
    else:
        assert details and ("captions" in details or "output_dtype" in details)


@FUZZ
@given(request=image_requests)
def test_fuzz_images(live, request):
    _server, stub = live
    code, response, details = call(stub.EncodeImages, request)
    event(f"images {code.name}")
    assert code in ALLOWED, (code, details)
    if code == grpc.StatusCode.OK:
        assert len(response.images) == len(request.images)
        for item in response.images:
            check_vectors(item, request.output_dtype, request.global_only)
    else:
        assert details and ("images" in details or "output_dtype" in details)


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests=st.lists(caption_requests, min_size=1, max_size=4))
def test_fuzz_caption_streams(live, requests):
    _server, stub = live
    try:
        responses = list(stub.StreamEncodeCaptions(iter(requests), timeout=20))
        assert len(responses) == len(requests)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        assert exc.details().startswith("stream message ")


def test_still_serving_after_fuzzing(live):
    server, _stub = live
    with EncoderClient(server.target) as client:
        assert client.health() == "SERVING"
        assert len(client.encode_captions(["after the storm"])) == 1
