"""Bytes that are not a protobuf message of the method's type, sent to both real services: every call
shape answers INVALID_ARGUMENT saying so (grpc alone answers UNKNOWN or INTERNAL), nothing is stored,
the refusal is counted, and the services keep serving."""

from __future__ import annotations

import grpc
import pytest
from encoder_fixtures import build_synthetic_model_dir, make_config, metrics_text
from search_fixtures import search_config

from encoder_service.server import ServerThread as EncoderThread
from search_service.server import ServerThread as SearchThread
from teran_api._proto import encoder_pb2, search_pb2
from teran_api.search_client import SearchClient

GARBAGE = b"\xff\xff\xff\xff"  # field 31 with wire type 7: no protobuf parser accepts it
PROBLEM = "the request bytes are not a valid teran.v1 protobuf message for this method"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    model_dir = build_synthetic_model_dir(root / "model", joint_dim=16)
    with EncoderThread(make_config(model_dir), warmup=False) as encoder:
        with SearchThread(search_config(str(root / "search.db"), encoder.target)) as search:
            yield encoder, search


def raw(target: str):
    return grpc.insecure_channel(target)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert PROBLEM in info.value.details()
    return info.value


def test_encoder_unary_and_streams(services):
    encoder, _ = services
    with raw(encoder.target) as channel:
        error = refused(lambda: channel.unary_unary("/teran.v1.EncoderService/EncodeCaptions")(GARBAGE, timeout=10))
        assert error.details().startswith("EncodeCaptions: ")
        good = encoder_pb2.EncodeCaptionsRequest(captions=["a dog"]).SerializeToString()
        stream = channel.stream_stream("/teran.v1.EncoderService/StreamEncodeCaptions")
        refused(lambda: list(stream(iter([good, GARBAGE]), timeout=10)))
        answer = channel.unary_unary("/teran.v1.EncoderService/EncodeCaptions")(good, timeout=10)  # still serving
        assert len(encoder_pb2.EncodeCaptionsResponse.FromString(answer).captions) == 1
    assert 'teran_encoder_errors_total{code="INVALID_ARGUMENT",method="EncodeCaptions"}' in metrics_text(encoder)


def test_search_unary_and_client_stream_store_nothing(services):
    _, search = services
    with raw(search.target) as channel:
        refused(lambda: channel.unary_unary("/teran.v1.SearchService/Search")(GARBAGE, timeout=10))
        refused(lambda: channel.unary_unary("/teran.v1.SearchService/Index")(GARBAGE, timeout=10))
        item = search_pb2.IndexItem(id="c1", caption="a dog runs")
        good = search_pb2.IndexRequest(items=[item]).SerializeToString()
        refused(lambda: channel.stream_unary("/teran.v1.SearchService/StreamIndex")(iter([GARBAGE, good]), timeout=30))
    with SearchClient(search.target, timeout=60) as client:
        assert client.stats().captions == 0  # nothing stored by a refused request
        assert client.index_captions({"c1": "a dog runs"}).indexed == 1  # still serving
    with raw(search.target) as channel:  # a bad message after a good one: the error says what was stored
        good = search_pb2.IndexRequest(items=[search_pb2.IndexItem(id="c2", caption="a cat sleeps")]).SerializeToString()
        error = refused(lambda: channel.stream_unary("/teran.v1.SearchService/StreamIndex")(iter([good, GARBAGE]), timeout=30))
        assert error.details().startswith("stream message 1: StreamIndex: the request bytes are not a valid"), error.details()
        assert error.details().endswith("; messages 0..0 (1 items) were stored"), error.details()
