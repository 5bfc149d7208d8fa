"""The encoder gRPC service on loopback with real ONNX Runtime (synthetic model directories)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from encoder_fixtures import (
    Reference,
    SlowBackend,
    bomb_png,
    build_synthetic_model_dir,
    image_bytes,
    make_config,
    metrics_text,
    ort_backend,
    regions,
    self_signed_cert,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.server import ServerThread
from teran_api._proto import common_pb2, encoder_pb2, encoder_pb2_grpc
from teran_api.encoder_client import AsyncEncoderClient, EncoderClient, EncoderError, RegionFeatures

CAPTIONS = ["a dog runs on the beach", "two cats", "a man in a red shirt is climbing a very tall rock wall near the sea"]
ATOL = 2e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_synthetic_model_dir(tmp_path_factory.mktemp("encoder") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(make_config(model_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with EncoderClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield encoder_pb2_grpc.EncoderServiceStub(channel)
    channel.close()


def assert_unit(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=-1), 1.0, atol=2e-3)


# --------------------------------------------------------------------------- results equal the ONNX graphs


def test_captions_equal_the_onnx_graph_run_directly(client, reference):
    results = client.encode_captions(CAPTIONS, request_id="r1")
    assert len(results) == len(CAPTIONS)
    for caption, result in zip(CAPTIONS, results, strict=True):
        glob, concepts, pieces = reference.caption(caption)
        assert result.word_pieces == pieces and result.word_pieces[:2] == caption.split()[:2]
        assert result.global_vector.dtype == np.float32 and result.global_vector.shape == (8,)
        np.testing.assert_allclose(result.global_vector, glob, atol=ATOL)
        np.testing.assert_allclose(result.concepts, concepts, atol=ATOL)
        assert result.num_tokens == len(pieces) + 2 and result.token_positions == list(range(1, len(pieces) + 1))
        assert result.model.name == "synthetic" and result.model.version == 1 and result.model.dimension == 8


@pytest.mark.gpu
def test_cuda_provider_serves_what_the_cpu_graphs_compute(model_dir, reference):
    """On a GPU machine: the service on the CUDA execution provider answers like the CPU graphs."""
    config = make_config(model_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with ServerThread(config) as running, EncoderClient(running.target, timeout=60) as gpu:
        assert "CUDAExecutionProvider" in gpu.model_info().backend_detail
        for caption, result in zip(CAPTIONS, gpu.encode_captions(CAPTIONS), strict=True):
            glob, concepts, _ = reference.caption(caption)
            np.testing.assert_allclose(result.global_vector, glob, atol=1e-3)
            np.testing.assert_allclose(result.concepts, concepts, atol=1e-3)


def test_images_encoded_and_precomputed_equal_the_onnx_graphs(client, reference):
    jpeg, png, webp = image_bytes(64, 48, "JPEG", 1), image_bytes(40, 90, "PNG", 2), image_bytes(50, 50, "WEBP", 3)
    feats3, boxes3 = regions(3, 12, seed=4)
    feats20, boxes20 = regions(20, 12, seed=5, width=640, height=480)
    results = client.encode_images([jpeg, RegionFeatures(feats3, boxes3), png, RegionFeatures(feats20, boxes20, 640, 480), webp])
    for data, result in zip([jpeg, png, webp], [results[0], results[2], results[4]], strict=True):
        glob, concepts, boxes = reference.image_from_bytes(data)
        np.testing.assert_allclose(result.global_vector, glob, atol=ATOL)
        np.testing.assert_allclose(result.concepts, concepts, atol=ATOL)
        np.testing.assert_allclose(result.boxes, boxes, atol=1e-6)
    assert (results[0].width, results[0].height) == (64, 48) and (results[2].width, results[2].height) == (40, 90)
    glob, concepts = reference.image_from_regions(feats3, boxes3)
    np.testing.assert_allclose(results[1].global_vector, glob, atol=ATOL)
    np.testing.assert_allclose(results[1].concepts, concepts, atol=ATOL)
    assert results[1].concepts.shape == (3, 8) and (results[1].width, results[1].height) == (0, 0)
    glob, concepts = reference.image_from_regions(feats20, boxes20, 640, 480)
    np.testing.assert_allclose(results[3].global_vector, glob, atol=ATOL)
    np.testing.assert_allclose(results[3].boxes, boxes20 / [640, 480, 640, 480], atol=1e-6)
    assert (results[3].width, results[3].height) == (640, 480)


def test_fp16_responses_and_global_only(client):
    full = client.encode_captions(CAPTIONS[:2])
    half = client.encode_captions(CAPTIONS[:2], dtype="float16")
    for a, b in zip(full, half, strict=True):
        assert b.global_vector.dtype == np.float16 and b.concepts.dtype == np.float16
        np.testing.assert_allclose(b.concepts.astype(np.float32), a.concepts, atol=1e-3)
    only = client.encode_images([image_bytes()], global_only=True, dtype="float16")[0]
    assert only.concepts is None and only.boxes is None and only.global_vector.dtype == np.float16
    assert client.encode_captions(["a dog"], global_only=True)[0].concepts is None


def test_streams_return_one_response_per_message_in_order(client, reference):
    batches = [[c] for c in CAPTIONS] + [CAPTIONS, ["one more caption"]]
    outputs = list(client.stream_encode_captions(batches))
    assert [len(o) for o in outputs] == [len(b) for b in batches]
    for batch, output in zip(batches, outputs, strict=True):
        for caption, result in zip(batch, output, strict=True):
            np.testing.assert_allclose(result.global_vector, reference.caption(caption)[0], atol=ATOL)
    images = [[image_bytes(seed=i)] for i in range(3)] + [[RegionFeatures(*regions(4, 12, seed=9))]]
    outputs = list(client.stream_encode_images(images, dtype="float16"))
    assert [len(o) for o in outputs] == [1, 1, 1, 1]
    np.testing.assert_allclose(outputs[1][0].global_vector.astype(np.float32), reference.image_from_bytes(images[1][0])[0], atol=2e-3)


def test_async_client(server, reference):
    async def main():
        async with AsyncEncoderClient(server.target) as c:
            captions, info = await asyncio.gather(c.encode_captions(CAPTIONS), c.model_info())
            streamed = [r async for r in c.stream_encode_images([[image_bytes(seed=7)], [image_bytes(seed=8)]])]
            return captions, info, streamed, await c.health()

    captions, info, streamed, health = asyncio.run(main())
    np.testing.assert_allclose(captions[2].global_vector, reference.caption(CAPTIONS[2])[0], atol=ATOL)
    assert info.model.dimension == 8 and info.limits["max_items"] == 8 and info.accepts_encoded_images
    assert len(streamed) == 2 and health == "SERVING"


def test_model_info_and_reflection(client, server):
    info = client.model_info()
    assert info.backend == "onnxruntime" and "CPUExecutionProvider" in info.backend_detail
    assert info.limits["max_tokens"] == 32 and info.limits["max_regions"] == 64 and info.region_dim == 12 and info.region_count == 0
    assert info.limits["image_size"] == 224 and info.concept_mode == "words" and info.checkpoint_kind == "project"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "teran.v1.EncoderService" in services and "grpc.health.v1.Health" in services


def test_concurrent_requests_are_batched_by_length_bucket(model_dir):
    backend = SlowBackend(ort_backend(model_dir), delay=0.03)
    short, long = "a dog", " ".join(["word"] * 20)  # 3..4 and 22 word pieces: buckets 8 and 32
    with ServerThread(make_config(model_dir, max_queue_delay_ms=20), backend=backend) as running:
        backend.runs.clear()
        with EncoderClient(running.target) as c, ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: c.encode_captions([short if i % 2 else long]), range(16)))
        sizes = running.server.model.batchers["text_encoder"].stats.sizes
        text = metrics_text(running)
    assert len(results) == 16 and max(sizes) > 1
    for graph, _shapes, lengths in backend.runs:
        if graph == "text_encoder":
            assert max(lengths) <= 8 or min(lengths) > 8, f"a batch mixed length buckets: {lengths}"
    assert 'teran_encoder_batch_size_bucket{graph="text_encoder",le="1.0"}' in text


def test_a_lone_request_takes_the_idle_fast_path_with_the_batched_results(model_dir):
    backend = SlowBackend(ort_backend(model_dir), delay=0.03)
    caption, others = "a dog runs on the beach", ["a cat runs on the grass", "two dogs play in the snow"]
    with ServerThread(make_config(model_dir, max_queue_delay_ms=20), backend=backend) as running:
        batcher = running.server.model.batchers["text_encoder"]
        with EncoderClient(running.target) as c:
            before = batcher.stats.immediate
            alone = c.encode_captions([caption])[0]
            assert batcher.stats.immediate == before + 1 and batcher.stats.sizes[-1] == 1
            # the same caption again, now merged with concurrent ones into one queued batch
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(c.encode_captions, [text]) for text in [caption, *others] * 4]
                merged = [f.result(30)[0] for f in futures]
        sizes = batcher.stats.sizes
        text = metrics_text(running)
    assert max(sizes) > 1, f"concurrent requests were not batched: {sizes}"
    for result in merged[::3]:
        np.testing.assert_allclose(result.global_vector, alone.global_vector, atol=ATOL)
        np.testing.assert_allclose(result.concepts, alone.concepts, atol=ATOL)
        assert result.word_pieces == alone.word_pieces and result.token_positions == alone.token_positions
    assert 'teran_encoder_queue_wait_seconds_count{graph="text_encoder"}' in text


def test_batcher_fast_path_only_when_idle_and_merges_what_queues_meanwhile():
    from encoder_service.batching import DynamicBatcher

    release = threading.Event()
    runs: list[list[int]] = []

    def run_batch(payloads):
        runs.append(list(payloads))
        if payloads == [0]:
            release.wait(10)  # the first (fast path) batch runs until the others have queued
        return [p * 10 for p in payloads]

    async def scenario():
        calls = {"active": 0}
        with ThreadPoolExecutor(2) as executor:
            batcher = DynamicBatcher(
                "g", run_batch, executor=executor, max_batch=8, max_delay_s=0.05, max_queue=64, active_calls=lambda: calls["active"]
            )
            batcher.start()

            async def call(value):
                calls["active"] += 1
                try:
                    return await batcher.submit([value])
                finally:
                    calls["active"] -= 1

            first = asyncio.ensure_future(call(0))
            await asyncio.sleep(0.05)
            assert batcher.stats.immediate == 1 and runs == [[0]]
            rest = [asyncio.ensure_future(call(v)) for v in (1, 2, 3)]
            await asyncio.sleep(0.05)
            assert runs == [[0]], "a batch ran while the fast-path batch held the only worker"
            release.set()
            results = await asyncio.gather(first, *rest)
            lone = await call(4)  # idle again: fast path
            await batcher.close()
        return results, lone, batcher.stats

    results, lone, stats = asyncio.run(scenario())
    assert results == [[0], [10], [20], [30]] and lone == [40]
    assert runs == [[0], [1, 2, 3], [4]]
    assert stats.immediate == 2 and stats.sizes == [1, 3, 1] and stats.items == 5


@pytest.mark.parametrize("inline", [True, False])
def test_batcher_inline_fast_path_runs_on_the_loop_thread_and_frees_its_slot(inline):
    from encoder_service.batching import DynamicBatcher

    threads: list[str] = []

    def run_batch(payloads):
        threads.append(threading.current_thread().name)
        if payloads == [-1]:
            raise ValueError("bad batch")
        return [p * 10 for p in payloads]

    async def scenario():
        with ThreadPoolExecutor(1, thread_name_prefix="runner") as executor:
            batcher = DynamicBatcher(
                "g", run_batch, executor=executor, max_batch=8, max_delay_s=0.05, max_queue=64, active_calls=lambda: 1, inline_idle=inline
            )
            batcher.start()
            first = await batcher.submit([1])
            with pytest.raises(ValueError, match="bad batch"):
                await batcher.submit([-1])
            after_failure = await batcher.submit([2])  # the failed run gave its slot back: fast path again
            await batcher.close()
        return first, after_failure, batcher.stats, threading.current_thread().name

    first, after_failure, stats, loop_thread = asyncio.run(scenario())
    assert first == [10] and after_failure == [20] and stats.immediate == 3
    assert threads == [loop_thread] * 3 if inline else all(name.startswith("runner") for name in threads)


def test_inline_fast_path_is_for_in_process_captions_only(model_dir):
    with ServerThread(make_config(model_dir)) as running:
        batchers = running.server.model.batchers
        assert batchers["text_encoder"].inline_idle and not batchers["image_encoder"].inline_idle
    with ServerThread(make_config(model_dir, inline_lone_captions=False)) as running:
        assert not running.server.model.batchers["text_encoder"].inline_idle


# --------------------------------------------------------------------------- bad input


def _region_input(features=None, boxes=None, width=0, height=0, fdtype=common_pb2.Tensor.FLOAT32, fshape=None, fdata=None):
    feats, bx = regions(4, 12)
    features = feats if features is None else features
    boxes = bx if boxes is None else boxes
    f = common_pb2.Tensor(
        dtype=fdtype,
        shape=list(fshape if fshape is not None else features.shape),
        data=fdata if fdata is not None else features.astype("<f4").tobytes(),
    )
    b = common_pb2.Tensor(dtype=common_pb2.Tensor.FLOAT32, shape=list(boxes.shape), data=boxes.astype("<f4").tobytes())
    return encoder_pb2.ImageInput(regions=encoder_pb2.RegionFeatures(features=f, boxes=b, image_width=width, image_height=height))


def _nan_features():
    feats, _ = regions(4, 12)
    feats[2, 3] = np.nan
    return feats


BAD_CAPTIONS = [
    ([], {}, "captions: no captions"),
    ([""], {}, "captions[0]: empty caption"),
    (["ok", "   "], {}, "captions[1]: empty caption"),
    (["x" * 1001], {}, "captions[0]: 1001 characters exceeds the limit of 1000"),
    (["word " * 40], {}, "captions[0]: 42 word pieces exceeds the limit of 32"),
    (["a"] * 9, {}, "captions: 9 captions exceeds the limit of 8"),
    (["\x00\x01"], {}, "captions[0]: no word pieces"),
    (["a dog"], {"output_dtype": 7}, "output_dtype: unknown dtype code 7"),
    (["a dog"], {"request_id": "r" * 129}, "request_id: 129 characters exceeds the limit of 128 (--max-request-id-chars)"),
]


@pytest.mark.parametrize(("captions", "extra", "message"), BAD_CAPTIONS)
def test_bad_captions_are_invalid_argument(stub, captions, extra, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeCaptions(encoder_pb2.EncodeCaptionsRequest(captions=captions, **extra), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


BAD_IMAGES = [
    ([], "images: no images"),
    ([encoder_pb2.ImageInput()], "images[0]: set either encoded"),
    ([encoder_pb2.ImageInput(encoded=b"")], "images[0].encoded: empty image data"),
    ([encoder_pb2.ImageInput(encoded=b"GIF89a not really")], "images[0].encoded: not a decodable"),
    ([encoder_pb2.ImageInput(encoded=image_bytes(fmt="GIF"))], "images[0].encoded: not a decodable image of the allowed formats JPEG/PNG"),
    ([encoder_pb2.ImageInput(encoded=image_bytes(200, 200)[:300])], "images[0].encoded: corrupt or truncated"),
    ([encoder_pb2.ImageInput(encoded=bomb_png(20000))], "images[0].encoded: image exceeds the limit of 40000000 pixels"),
    ([encoder_pb2.ImageInput(encoded=bomb_png(7000))], "images[0].encoded: 7000x7000 pixels exceeds the limit of 40000000"),
    ([encoder_pb2.ImageInput(encoded=b"\xff" * 2_000_001)], "images[0].encoded: 2000001 bytes exceeds the limit of 2000000 bytes"),
    ([encoder_pb2.ImageInput(encoded=image_bytes())] * 9, "images: 9 images exceeds the limit of 8"),
    ([_region_input(fdtype=5)], "images[0].regions.features.dtype: 5 is not supported"),
    ([_region_input(fshape=[4, 12, 1])], "images[0].regions.features.shape: expected 2 dimensions"),
    ([_region_input(fshape=[4, 13], fdata=b"\0" * 4 * 13 * 4)], "images[0].regions.features.shape: expected [regions, 12], got [4, 13]"),
    ([_region_input(fdata=b"\0" * 10)], "images[0].regions.features.data: 10 bytes, but shape [4, 12] of FLOAT32 needs 192 bytes"),
    ([_region_input(features=_nan_features())], "images[0].regions.features: non-finite value"),
    ([_region_input(features=np.zeros((0, 12), np.float32), boxes=np.zeros((0, 4), np.float32))], "images[0].regions.features: no regions"),
    ([_region_input(*regions(65, 12))], "images[0].regions.features.shape: [65, 12] exceeds the limit of 768 elements"),
    ([_region_input(boxes=np.zeros((3, 4), np.float32))], "images[0].regions.boxes.shape: expected [4, 4]"),
    ([_region_input(boxes=np.full((4, 4), np.inf, np.float32))], "images[0].regions.boxes: non-finite value"),
    ([_region_input(boxes=np.tile(np.array([[0.1, 0.1, 1.5, 0.5]], np.float32), (4, 1)))], "images[0].regions.boxes: row 0"),
    ([_region_input(boxes=np.tile(np.array([[0.5, 0.1, 0.2, 0.5]], np.float32), (4, 1)))], "is not a box x1<=x2"),
    ([encoder_pb2.ImageInput(encoded=image_bytes()), _region_input(width=640)], "images[1].regions.image_width/image_height: 640x0"),
    ([_region_input(width=20000, height=10)], "1..16384 (--max-image-side)"),
]


@pytest.mark.parametrize(("images", "message"), BAD_IMAGES)
def test_bad_images_are_invalid_argument(stub, images, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeImages(encoder_pb2.EncodeImagesRequest(images=images), timeout=20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_bad_stream_message_names_its_index(client):
    with pytest.raises(EncoderError) as info:
        list(client.stream_encode_captions([["fine"], ["also fine", ""]]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream message 1: captions[1]: empty caption" in info.value.details
    with pytest.raises(EncoderError) as info:
        list(client.stream_encode_images([[image_bytes()], [b"junk"]]))
    assert "stream message 1: images[0].encoded" in info.value.details


def test_over_long_request_id_in_a_stream_is_refused(stub):
    messages = [
        encoder_pb2.EncodeImagesRequest(images=[encoder_pb2.ImageInput(encoded=image_bytes())], request_id=rid) for rid in ("ok", "r" * 200)
    ]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamEncodeImages(iter(messages), timeout=20))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id: 200 characters exceeds the limit of 128" in info.value.details()


def test_message_size_limits_on_both_ends(server, client):
    with pytest.raises(EncoderError) as info:  # server receive limit 4 MiB
        client.encode_images([b"\0" * (5 * 1024 * 1024)])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with EncoderClient(server.target, max_message_bytes=4096) as small:  # client receive limit
        with pytest.raises(EncoderError) as info:
            small.encode_images([image_bytes()] * 8)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_keeps_serving_and_counts_errors(client, server):
    assert client.health() == "SERVING"
    assert len(client.encode_captions(["still serving"])) == 1
    text = metrics_text(server)
    assert 'teran_encoder_errors_total{code="INVALID_ARGUMENT",method="EncodeImages"}' in text
    assert 'teran_encoder_requests_total{code="OK",method="EncodeCaptions"}' in text
    for name in (
        "teran_encoder_request_seconds_bucket",
        "teran_encoder_queue_depth",
        "teran_encoder_inference_seconds",
        "teran_encoder_items_total",
    ):
        assert name in text
    assert "teran_encoder_ready 1.0" in text


# --------------------------------------------------------------------------- lifecycle, deadlines, overload


def test_health_transitions_and_graceful_shutdown(model_dir):
    gate = threading.Event()
    backend = SlowBackend(ort_backend(model_dir), gate=gate)
    starter = ThreadPoolExecutor(1)
    running = ServerThread(make_config(model_dir), backend=backend, wait="listening")
    # the port opens before the model is loaded: NOT_SERVING and UNAVAILABLE until warmed up
    port = running.port
    target = f"127.0.0.1:{port}"
    with EncoderClient(target) as c:
        assert c.health() == "NOT_SERVING" and c.health("") == "NOT_SERVING"
        with pytest.raises(EncoderError) as info:
            c.encode_captions(["too early"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "warming up" in info.value.details
        gate.set()
        running.wait_ready(30)
        c.wait_until_serving(20)
        backend.delay = 0.6
        watch_channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
            health_pb2.HealthCheckRequest(service="teran.v1.EncoderService"), timeout=20
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        inflight = starter.submit(c.encode_captions, ["finish me please"])
        time.sleep(0.2)  # the request is running in the backend
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert len(inflight.result(10)) == 1  # in-flight work finished
        stopper.join(20)
        watch_channel.close()
        with pytest.raises(EncoderError) as info:
            c.health(timeout=2)
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    starter.shutdown()


def test_deadlines_are_honoured_and_expired_items_dropped(model_dir):
    backend = SlowBackend(ort_backend(model_dir), delay=0.4)
    with ServerThread(make_config(model_dir), backend=backend, warmup=False) as running, EncoderClient(running.target) as c:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(c.encode_captions, ["occupies the worker"])
            time.sleep(0.1)
            with pytest.raises(EncoderError) as info:
                c.encode_captions(["waits too long"], timeout=0.2)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(slow.result(10)) == 1
        runs_before = len(backend.runs)
        time.sleep(0.5)
        assert len(backend.runs) == runs_before  # the expired caption never ran
        backend.delay = 0.0
        assert len(c.encode_captions(["after the deadline"])) == 1
        assert "teran_encoder_expired_items_total" in metrics_text(running)


def test_overload_is_resource_exhausted(model_dir):
    backend = SlowBackend(ort_backend(model_dir), delay=0.3)
    with ServerThread(make_config(model_dir, max_queue=3, max_batch=1), backend=backend, warmup=False) as running:
        with EncoderClient(running.target) as c, ThreadPoolExecutor(6) as pool:

            def call(i):
                try:
                    return len(c.encode_captions([f"caption {i}", "second caption"]))
                except EncoderError as exc:
                    return exc

            outcomes = list(pool.map(call, range(6)))
        errors = [o for o in outcomes if isinstance(o, EncoderError)]
        assert errors and all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert "queue limit of 3 (--max-queue)" in errors[0].details
        assert any(o == 2 for o in outcomes)
        assert 'teran_encoder_rejected_items_total{graph="text_encoder"}' in metrics_text(running)


def noise_png(side: int = 256, seed: int = 0) -> bytes:
    """An incompressible PNG: about 3 x side^2 bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_request_bytes_in_flight_are_bounded(model_dir):
    """--max-inflight-bytes: unary calls that find no room within --max-inflight-wait-ms get RESOURCE_EXHAUSTED
    naming both flags (counted); with a longer wait they queue and are all answered; the messages of a stream
    wait for room (flow control) and are all answered; the gauge returns to 0."""
    image = noise_png()
    assert 150_000 < len(image) < 250_000
    backend = SlowBackend(ort_backend(model_dir), delay=0.4)
    config = make_config(
        model_dir, max_message_bytes=256 * 1024, max_inflight_bytes=300 * 1024, max_inflight_wait_ms=0, max_batch=1, max_stream_inflight=4
    )
    with ServerThread(config, backend=backend, warmup=False) as running, EncoderClient(running.target, timeout=60) as c:

        def call(_):
            try:
                return len(c.encode_images([image]))
            except EncoderError as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(call, range(4)))
        errors = [o for o in outcomes if isinstance(o, EncoderError)]
        assert errors and all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert "(--max-inflight-bytes; waited 0 ms, --max-inflight-wait-ms): retry with backoff" in errors[0].details and 1 in outcomes
        running.server.config.max_inflight_wait_ms = 30_000  # one at a time (0.4 s each), each waiting its turn
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(call, range(4))) == [1, 1, 1, 1]
        answered = list(c.stream_encode_images([[image]] * 4))  # one message in flight at a time: all answered
        assert [len(r) for r in answered] == [1, 1, 1, 1]
        text = metrics_text(running)
        assert "teran_encoder_inflight_bytes 0.0" in text
        assert 'teran_encoder_errors_total{code="RESOURCE_EXHAUSTED",method="EncodeImages"}' in text


def test_unary_request_is_not_read_past_the_budget(model_dir):
    """A unary encode call is refused before its request is read when the budget is spent: garbage bytes
    get RESOURCE_EXHAUSTED (budget) rather than INVALID_ARGUMENT (parsed), and are parsed once bytes free up."""
    config = make_config(model_dir, max_message_bytes=256 * 1024, max_inflight_bytes=300 * 1024, max_inflight_wait_ms=50)
    with ServerThread(config, warmup=False) as running, grpc.insecure_channel(running.target) as channel:
        budget = running.server.budget
        raw = channel.unary_unary("/teran.v1.EncoderService/EncodeImages")  # bytes in, bytes out
        garbage = b"\xff" * 1000

        async def on_loop(action):  # the budget belongs to the server's event loop
            action()

        running.call(on_loop(lambda: budget.try_take(budget.limit)))
        with pytest.raises(grpc.RpcError) as refused:
            raw(garbage, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-inflight-bytes" in refused.value.details()
        running.call(on_loop(lambda: budget.release(budget.limit)))
        with pytest.raises(grpc.RpcError) as parsed:
            raw(garbage, timeout=10)
        assert parsed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid teran.v1 protobuf" in parsed.value.details()
        for _ in range(100):  # the status can reach the client just before the handler unwinds
            if budget.used == 0:
                break
            time.sleep(0.02)
        assert budget.used == 0


# --------------------------------------------------------------------------- auth and TLS


def test_bearer_token_auth_over_tls(model_dir, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    config = make_config(model_dir, auth_tokens=["s3cret", "rotated"], tls_cert=cert, tls_key=key)
    with ServerThread(config, warmup=False) as running:
        target = f"localhost:{running.port}"
        with EncoderClient(target, root_cert=cert) as anonymous:
            assert anonymous.health() == "SERVING"  # health checks need no token (probes)
            for call in (
                lambda: anonymous.encode_captions(["a dog"]),
                anonymous.model_info,
                lambda: list(anonymous.stream_encode_captions([["a"]])),
            ):
                with pytest.raises(EncoderError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in info.value.details
        with EncoderClient(target, root_cert=cert, token="wrong") as wrong, pytest.raises(EncoderError) as info:
            wrong.encode_captions(["a dog"])
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        for token in ("s3cret", "rotated"):
            with EncoderClient(target, root_cert=cert, token=token) as good:
                assert len(good.encode_captions(["a dog"])) == 1
        with EncoderClient(target, token="s3cret") as plaintext, pytest.raises(EncoderError) as info:
            plaintext.encode_captions(["a dog"], timeout=3)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert 'teran_encoder_errors_total{code="UNAUTHENTICATED",method="EncodeCaptions"}' in metrics_text(running)


# --------------------------------------------------------------------------- original TERAN layout and fp16 graphs


def test_original_checkpoint_layout_pixel_boxes(tmp_path):
    model_dir = build_synthetic_model_dir(tmp_path / "original", kind="original", region_dim=16, max_regions=40)
    reference = Reference(model_dir)
    with ServerThread(make_config(model_dir)) as running, EncoderClient(running.target) as c:
        info = c.model_info()
        assert not info.accepts_encoded_images and info.checkpoint_kind == "original" and info.limits["image_size"] == 0
        feats, boxes = regions(36, 16, seed=3, width=500, height=375)
        feats2, boxes2 = regions(10, 16, seed=4)
        a, b = c.encode_images([RegionFeatures(feats, boxes, 500, 375), RegionFeatures(feats2.astype(np.float16), boxes2)])
        np.testing.assert_allclose(a.global_vector, reference.image_from_regions(feats, boxes, 500, 375)[0], atol=ATOL)
        np.testing.assert_allclose(
            b.global_vector, reference.image_from_regions(feats2.astype(np.float16).astype(np.float32), boxes2)[0], atol=ATOL
        )
        with pytest.raises(EncoderError) as err:
            c.encode_images([image_bytes()])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "has no image backbone" in err.value.details


def test_fp16_graphs(model_dir):
    reference = Reference(model_dir, "fp16")
    with ServerThread(make_config(model_dir, precision="fp16"), warmup=False) as running, EncoderClient(running.target) as c:
        assert c.model_info().precision == "fp16"
        result = c.encode_captions([CAPTIONS[0]])[0]
        np.testing.assert_allclose(result.global_vector, reference.caption(CAPTIONS[0])[0], atol=1e-3)
        assert_unit(result.concepts)
