"""Hypothesis throws random (mostly malformed) requests and raw bytes at a live search service (with
a live encoder, on milvus-lite): every answer carries a documented status (OK, INVALID_ARGUMENT,
FAILED_PRECONDITION; never INTERNAL / UNKNOWN / UNAVAILABLE), every refused request leaves the stored
data exactly as it was, and the service keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from encoder_fixtures import build_synthetic_model_dir, image_bytes, make_config
from fuzz_strategies import tensors
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from search_fixtures import search_config

from encoder_service.server import ServerThread as EncoderThread
from search_service.server import ServerThread as SearchThread
from teran_api._proto import common_pb2, search_pb2, search_pb2_grpc

FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
DIM = 8  # the synthetic model's joint dimension
KNOWN_CAPTIONS = {"known-c0": "a dog runs on the beach", "known-c1": "two cats sleep on a red sofa"}
KNOWN_IMAGES = {"known-i0": image_bytes(64, 48, "JPEG", 1), "known-i1": image_bytes(40, 40, "PNG", 2)}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-fuzz")
    model_dir = build_synthetic_model_dir(root / "model", joint_dim=DIM)
    with EncoderThread(make_config(model_dir), warmup=False) as encoder:
        config = search_config(str(root / "fuzz.db"), encoder.target, max_index_items=8, max_top_k=20, max_metadata_bytes=512)
        with SearchThread(config) as search:
            channel = grpc.insecure_channel(search.target)
            stub = search_pb2_grpc.SearchServiceStub(channel)
            items = [search_pb2.IndexItem(id=i, caption=c, metadata_json='{"n": 1}') for i, c in KNOWN_CAPTIONS.items()]
            items += [search_pb2.IndexItem(id=i, image=data) for i, data in KNOWN_IMAGES.items()]
            assert stub.Index(search_pb2.IndexRequest(items=items), timeout=60).indexed == 4
            yield channel, stub
            channel.close()


def state(stub) -> tuple:
    """What is stored: the counts, and the known items with their vectors."""
    stats = stub.Stats(search_pb2.StatsRequest(), timeout=30)
    known = [
        stub.Get(search_pb2.GetRequest(modality=m, ids=list(ids), include_vectors=True), timeout=30).SerializeToString()
        for m, ids in ((search_pb2.CAPTION, KNOWN_CAPTIONS), (search_pb2.IMAGE, KNOWN_IMAGES))
    ]
    return stats.images, stats.captions, *known


def call(method, request):
    try:
        method(request, timeout=30)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def check(stub, method, request) -> grpc.StatusCode:
    before = state(stub)
    code, details = call(method, request)
    event(f"{getattr(method, '_method', b'?').decode().rsplit('/', 1)[-1]}: {code.name}")
    assert code in ALLOWED, f"{code.name}: {details} for {request!r:.400}"
    if code != grpc.StatusCode.OK:
        assert details and state(stub) == before, "a refused request changed the stored data"
    return code


plain_ids = st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True)
ids = st.one_of(
    *[plain_ids] * 8,
    st.text(max_size=12),
    st.sampled_from(["", "x" * 600, 'quote"d', "back\\slash", "ctl\x01", "known-c0"]),
)
good_metadata = st.sampled_from(["", "{}", '{"split": "test", "n": 3}', '{"tags": ["a", "b"], "deep": {"x": [1, 2]}}'])
metadata = st.one_of(
    good_metadata,
    good_metadata,
    good_metadata,
    st.sampled_from(['{"x": 1e999}', '{"x": 100000000000000000000000}', '{"x": NaN}', "[1, 2]", '{"x": ' * 40, "{" + '"k": 1,' * 90]),
    st.text(max_size=30),
)
modalities = st.sampled_from([search_pb2.IMAGE, search_pb2.CAPTION] * 3 + [0, 7])
models = st.one_of(
    st.none(),
    st.builds(
        common_pb2.ModelRef, name=st.sampled_from(["synthetic", "other", ""]), version=st.integers(-1, 3), dimension=st.integers(0, 16)
    ),
)


@st.composite
def vectors(draw):
    rows = draw(st.integers(1, 6)) if draw(st.integers(0, 9)) else 0
    message = search_pb2.Vectors(
        modality=draw(modalities),
        global_vector=draw(tensors(DIM, None, unit=True)),
        concepts=draw(tensors(DIM, rows, unit=True)),
        word_pieces=draw(st.lists(st.text(max_size=6), max_size=rows + 1)),
    )
    if draw(st.integers(0, 9)) < (8 if message.modality == search_pb2.IMAGE else 1):  # boxes are for image vectors
        message.boxes.CopyFrom(draw(tensors(4, rows)))
    model = draw(models)
    if model is not None:
        message.model.CopyFrom(model)
    return message


@st.composite
def index_items(draw):
    item = search_pb2.IndexItem(id=draw(ids), metadata_json=draw(metadata))
    kind = draw(st.sampled_from(["vectors"] * 6 + ["caption", "image", "garbage image", "none"]))
    if kind == "vectors":
        item.vectors.CopyFrom(draw(vectors()))
    elif kind == "caption":
        item.caption = draw(st.sampled_from(["a man on a bike", "", "   ", "word " * 200]) | st.text(max_size=20))
    elif kind == "image":
        item.image = draw(st.sampled_from(list(KNOWN_IMAGES.values())))
    elif kind == "garbage image":
        item.image = draw(st.binary(max_size=200))
    return item


filters = st.one_of(
    st.just(""),
    st.sampled_from(['metadata["n"] == 1', 'metadata["split"] == "test"', 'id != "x"', 'json_contains(metadata["tags"], "a")']),
    st.sampled_from(['metadata["n"] >>> 2', "global_vector == 1", 'model == "x"', 'metadata["a"] == "b', "id in [" + '"a",' * 500 + "]"]),
    st.text(max_size=25),
)


@st.composite
def search_requests(draw):
    request = search_pb2.SearchRequest(
        top_k=draw(st.one_of(st.integers(1, 20), st.integers(1, 20), st.integers(-3, 40))),
        rerank_multiplier=draw(st.one_of(st.integers(0, 10), st.integers(0, 10), st.integers(-2, 150))),
        filter=draw(filters),
        first_stage=draw(st.sampled_from([0] * 9 + [1, 2, 3, 9])),
        disable_rerank=draw(st.booleans()),
        skip_explanation=draw(st.booleans()),
        request_id=draw(st.sampled_from(["", "", "", "q1", "r" * 200])),
    )
    kind = draw(st.sampled_from(["vectors"] * 3 + ["caption", "image", "none"]))
    if kind == "vectors":
        request.vectors.CopyFrom(draw(vectors()))
    elif kind == "caption":
        request.caption = draw(st.sampled_from(["a dog", ""]) | st.text(max_size=20))
    elif kind == "image":
        request.image = draw(st.sampled_from(list(KNOWN_IMAGES.values())) | st.binary(max_size=100))
    return request


@FUZZ
@given(request=st.builds(search_pb2.IndexRequest, items=st.lists(index_items(), max_size=3) | st.lists(index_items(), max_size=10)))
def test_fuzz_index(live, request):
    check(live[1], live[1].Index, request)


def unit_rows(rng, rows: int, scale: float = 1.0) -> bytes:
    matrix = rng.standard_normal((rows, DIM))
    return (scale * matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype("<f4").tobytes()


CORRUPTIONS = ["none", "huge int", "nan metadata", "nan vector", "scaled concepts", "wrong dimension", "repeated id", "quote id"]


@st.composite
def mostly_valid_index_requests(draw):
    """Valid caption-vector items, then at most one corrupted in one way: where partial writes would show."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    items = []
    for n in range(draw(st.integers(1, 6))):
        rows = int(rng.integers(1, 5))
        vectors = search_pb2.Vectors(
            modality=search_pb2.CAPTION,
            global_vector=common_pb2.Tensor(dtype=1, shape=[DIM], data=unit_rows(rng, 1)),
            concepts=common_pb2.Tensor(dtype=1, shape=[rows, DIM], data=unit_rows(rng, rows)),
        )
        items.append(search_pb2.IndexItem(id=f"v{draw(st.integers(0, 30))}-{n}", metadata_json='{"n": 1}', vectors=vectors))
    corruption, last = draw(st.sampled_from(CORRUPTIONS)), items[-1]
    if corruption == "huge int":
        last.metadata_json = '{"x": 1000000000000000000000000000000}'
    elif corruption == "nan metadata":
        last.metadata_json = '{"x": NaN}'
    elif corruption == "nan vector":
        last.vectors.global_vector.data = np.full(DIM, np.nan, "<f4").tobytes()
    elif corruption == "scaled concepts":
        last.vectors.concepts.data = unit_rows(rng, last.vectors.concepts.shape[0], scale=100.0)
    elif corruption == "wrong dimension":
        last.vectors.global_vector.CopyFrom(common_pb2.Tensor(dtype=1, shape=[DIM + 1], data=np.ones(DIM + 1, "<f4").tobytes()))
    elif corruption == "repeated id" and len(items) > 1:
        last.id = items[0].id
    elif corruption == "quote id":
        last.id = 'x"y'
    return search_pb2.IndexRequest(items=items)


@FUZZ
@given(request=mostly_valid_index_requests())
def test_fuzz_nearly_valid_index_requests_store_all_or_nothing(live, request):
    stub = live[1]
    if check(stub, stub.Index, request) == grpc.StatusCode.OK:  # refused: check() saw nothing change; else all of it stored
        found = stub.Get(search_pb2.GetRequest(modality=search_pb2.CAPTION, ids=[i.id for i in request.items]), timeout=30).items
        assert all(i.found for i in found)


@FUZZ
@given(request=search_requests())
def test_fuzz_search(live, request):
    check(live[1], live[1].Search, request)


@FUZZ
@given(modality=modalities, chosen=st.lists(ids, max_size=3) | st.lists(ids, max_size=12), vectors_too=st.booleans())
def test_fuzz_get_and_delete(live, modality, chosen, vectors_too):
    stub = live[1]
    check(stub, stub.Get, search_pb2.GetRequest(modality=modality, ids=chosen, include_vectors=vectors_too))
    chosen = [i for i in chosen if not i.startswith("known-")]  # the known items stay for the state checks
    check(stub, stub.Delete, search_pb2.DeleteRequest(modality=modality, ids=chosen))


@FUZZ
@given(data=st.binary(max_size=300), method=st.sampled_from(["Index", "Search", "Get", "Delete", "Stats"]))
def test_fuzz_raw_bytes(live, data, method):
    channel, stub = live
    raw = channel.unary_unary(f"/teran.v1.SearchService/{method}")
    check(stub, raw, data)


def test_still_serving_after_fuzzing(live):
    _, stub = live
    assert len(stub.Search(search_pb2.SearchRequest(caption="a dog runs on the beach", top_k=2), timeout=30).hits) == 2
    found = stub.Get(search_pb2.GetRequest(modality=search_pb2.CAPTION, ids=list(KNOWN_CAPTIONS)), timeout=30).items
    assert all(i.found for i in found)
