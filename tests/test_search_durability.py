"""Crash durability under concurrent writers on milvus-lite.

milvus-lite 3.x appends concurrent writes to a collection's write-ahead log without a lock; two
Index calls at once could interleave there, and after a SIGKILL recovery stopped at the damage,
losing acknowledged items. The store serialises lite writes; this test holds it to that.
"""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from encoder_fixtures import build_synthetic_model_dir, make_config
from search_fixtures import search_process, vector_item

from encoder_service.server import ServerThread as EncoderThread
from teran_api._proto import search_pb2, search_pb2_grpc

pytestmark = pytest.mark.slow  # kills and restarts a search service process

DIM = 16
WRITERS = 8
CALLS_PER_WRITER = 50
ITEMS_PER_CALL = 8


def test_sigkill_after_concurrent_index_calls_loses_nothing_acknowledged(tmp_path):
    model_dir = build_synthetic_model_dir(tmp_path / "model", joint_dim=DIM)
    args = ["--milvus-uri", str(tmp_path / "search.db")]
    with EncoderThread(make_config(model_dir, max_items=64)) as encoder:
        args += ["--encoder-address", encoder.target, "--log-format", "json"]
        process = search_process(args, tmp_path / "search.log")
        acked: list[str] = []
        acked_lock = threading.Lock()
        try:
            channel = grpc.insecure_channel(process.address)
            stub = search_pb2_grpc.SearchServiceStub(channel)

            def writer(w: int) -> None:
                for call in range(CALLS_PER_WRITER):
                    seed = (w * 1000 + call) * 10
                    items = [vector_item(f"w{w}-{call}-{i}", "captions", DIM, seed=seed + i, n=64) for i in range(ITEMS_PER_CALL)]
                    stub.Index(search_pb2.IndexRequest(items=items), timeout=60)
                    with acked_lock:
                        acked.extend(item.id for item in items)

            threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            channel.close()
        finally:
            process.stop(signal.SIGKILL)  # no graceful close of milvus-lite
        assert len(acked) == WRITERS * CALLS_PER_WRITER * ITEMS_PER_CALL

        process.start()  # the same service again, on the same port
        try:
            with grpc.insecure_channel(process.address) as channel:
                stub = search_pb2_grpc.SearchServiceStub(channel)
                missing = []
                for start in range(0, len(acked), 200):
                    reply = stub.Get(search_pb2.GetRequest(modality=search_pb2.CAPTION, ids=acked[start : start + 200]), timeout=60)
                    missing += [item.id for item in reply.items if not item.found]
                assert missing == []
                assert stub.Stats(search_pb2.StatsRequest(), timeout=60).captions == len(acked)
            assert "WAL recovery stopped" not in (tmp_path / "search.log").read_text()
        finally:
            process.stop(signal.SIGKILL)
