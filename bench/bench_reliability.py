"""Reliability under hostile and careless clients: memory under a flood of large streams, writes that
store all or nothing, and no acknowledged item lost to a crash. Writes reports/reliability.json.

    .venv/bin/python bench/bench_reliability.py --model-dir artifacts/teran-flickr8k --output reports/reliability.json

Parts (`--parts`, all by default), each with its command in the report:
- load: the encoder service (a subprocess on --model-dir, --max-inflight-bytes as given) under
  --streams concurrent StreamEncodeImages calls, each --messages messages of 4 noise JPEGs of about
  5 MB (global_only, 300 s deadline), and as many concurrent unary EncodeImages calls of one such
  message; the service's RSS sampled every 50 ms: before, warm peak (while a few such messages are
  served one at a time, after one request at the model's largest batch), peak under the load, and
  idle after it; statuses by code.
  The flood may add at most the budget to the warm peak (`peak_within_budget`). Refused work must be
  RESOURCE_EXHAUSTED; stream messages wait for the budget instead.
- partial_write: a search service (subprocess, milvus-lite, vectors only) gets Index requests of 256
  caption vectors whose last item is refused (an integer beyond int64 in its metadata, a NaN in its
  vector, a concept row of norm 100): items stored by each refused request (must be 0).
- crash: the search service SIGKILLed while 4 clients index; restarted on the same file; the
  acknowledged ids that Get no longer finds (must be 0).
- milvus_restart: the Milvus standalone server (PyPI `milvus`) SIGKILLed --restarts times (2) while 4 clients index
  through the search service, restarted on the same data each time: acknowledged ids lost (must be
  0); seconds from the restarted Milvus answering until it serves a query on the collection itself
  (`milvus_query_ready_s_each`: Milvus loading its collection again, the service plays no part), and
  from then until Get, Stats and Search through the service all succeed (`read_recovery_s`, the
  worst of the restarts).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.launcher import LocalService, tree_rss_bytes  # noqa: E402

MIB = 2**20


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def noise_jpegs(count: int = 4, width: int = 2560, height: int = 1920) -> list[bytes]:
    """Incompressible photos: about 5 MB each as JPEG (quality 95)."""
    from PIL import Image

    out = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


class RssSampler:
    """Samples the resident memory of a process tree every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid) or 0)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load(model_dir: Path, workdir: Path, streams: int, messages: int, budget_mib: int) -> dict:
    from teran_api._proto import encoder_pb2, encoder_pb2_grpc

    images = noise_jpegs()
    message = encoder_pb2.EncodeImagesRequest(images=[encoder_pb2.ImageInput(encoded=b) for b in images], global_only=True)
    message_bytes = message.ByteSize()
    args = ["--model-dir", str(model_dir), "--max-inflight-bytes", str(budget_mib * MIB), "--log-format", "json"]
    service = LocalService("encoder_service", "teran.v1.EncoderService", args, workdir / "encoder.log")
    service.start()
    statuses: Counter = Counter()
    lock = threading.Lock()

    def record(code: grpc.StatusCode) -> None:
        with lock:
            statuses[code.name] += 1

    try:
        time.sleep(2)
        before = tree_rss_bytes(service.pid) or 0
        options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
        channels = [grpc.insecure_channel(service.address, options=options) for _ in range(8)]
        # The warm working set: the peak RSS while these messages are served one at a time, after the
        # model ran its largest batch (decoder buffers, the runtime's arenas). The flood may add at most
        # the budget on top of it: that is the memory concurrency costs.
        warm_stub = encoder_pb2_grpc.EncoderServiceStub(channels[0])
        largest_batch = warm_stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=60).max_batch
        small = noise_jpegs(largest_batch, 224, 224)
        warm_stub.EncodeImages(encoder_pb2.EncodeImagesRequest(images=[encoder_pb2.ImageInput(encoded=b) for b in small]), timeout=300)
        with RssSampler(service.pid) as warm_sampler:
            for _ in range(3):
                warm_stub.EncodeImages(message, timeout=300)
            list(warm_stub.StreamEncodeImages(iter([message] * 3), timeout=300))
        warm = warm_sampler.peak
        log(f"load: {streams} streams x {messages} messages of {message_bytes / MIB:.1f} MiB and {streams} unary calls")

        def stream(index: int) -> None:
            stub = encoder_pb2_grpc.EncoderServiceStub(channels[index % len(channels)])
            try:
                answers = sum(1 for _ in stub.StreamEncodeImages(iter([message] * messages), timeout=300))
                record(grpc.StatusCode.OK if answers == messages else grpc.StatusCode.UNKNOWN)
            except grpc.RpcError as exc:
                record(exc.code())

        def unary(index: int) -> None:
            stub = encoder_pb2_grpc.EncoderServiceStub(channels[index % len(channels)])
            try:
                stub.EncodeImages(message, timeout=300)
                record(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                record(exc.code())

        started = time.monotonic()
        with RssSampler(service.pid) as sampler, ThreadPoolExecutor(2 * streams) as pool:
            futures = [pool.submit(stream, i) for i in range(streams)] + [pool.submit(unary, i) for i in range(streams)]
            for future in futures:
                future.result()
        seconds = time.monotonic() - started
        for channel in channels:
            channel.close()
        time.sleep(10)
        idle = tree_rss_bytes(service.pid) or 0
    finally:
        service.stop()
    unexpected = sum(n for code, n in statuses.items() if code not in ("OK", "RESOURCE_EXHAUSTED"))
    result = {
        "streams": streams,
        "messages_per_stream": messages,
        "unary_calls": streams,
        "message_mb": round(message_bytes / MIB, 1),
        "budget_mb": budget_mib,
        "rss_before_mb": round(before / MIB, 1),
        "warm_peak_rss_mb": round(warm / MIB, 1),
        "peak_rss_mb": round(sampler.peak / MIB, 1),
        "peak_growth_mb": round((sampler.peak - before) / MIB, 1),
        "peak_over_warm_mb": round((sampler.peak - warm) / MIB, 1),
        "peak_within_budget": sampler.peak - warm <= budget_mib * MIB,
        "idle_rss_mb": round(idle / MIB, 1),
        "statuses": dict(statuses),
        "unexpected_statuses": unexpected,
        "seconds": round(seconds, 1),
    }
    log(f"load: {result}")
    return result


def caption_vectors(rng, dim: int, count: int, bad: str | None = None):
    """IndexItems of caption vectors (model unset); the last one corrupted by `bad`."""
    from teran_api._proto import common_pb2, search_pb2

    def unit(rows: int, scale: float = 1.0) -> np.ndarray:
        matrix = rng.standard_normal((rows, dim))
        return (scale * matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype("<f4")

    items = []
    for n in range(count):
        concepts = unit(4, 100.0 if bad == "scaled concepts" and n == count - 1 else 1.0)
        vector = unit(1)[0]
        if bad == "nan vector" and n == count - 1:
            vector[0] = np.nan
        metadata = '{"x": 1000000000000000000000000000000}' if bad == "huge int" and n == count - 1 else '{"n": 1}'
        items.append(
            search_pb2.IndexItem(
                id=f"c{rng.integers(1 << 40)}",
                metadata_json=metadata,
                vectors=search_pb2.Vectors(
                    modality=search_pb2.CAPTION,
                    global_vector=common_pb2.Tensor(dtype=1, shape=[dim], data=vector.tobytes()),
                    concepts=common_pb2.Tensor(dtype=1, shape=[4, dim], data=concepts.tobytes()),
                ),
            )
        )
    return items


def count_found(stub, ids: list[str], chunk: int = 1024) -> int:
    """How many of the caption `ids` Get finds (in requests of at most --max-ids)."""
    from teran_api._proto import search_pb2

    found = 0
    for start in range(0, len(ids), chunk):
        request = search_pb2.GetRequest(modality=search_pb2.CAPTION, ids=ids[start : start + chunk])
        found += sum(1 for item in stub.Get(request, timeout=60).items if item.found)
    return found


def search_service(workdir: Path, name: str) -> LocalService:
    args = ["--milvus-uri", str(workdir / f"{name}.db"), "--max-index-items", "512", "--log-format", "json"]
    return LocalService("search_service", "teran.v1.SearchService", args, workdir / f"{name}.log")


def partial_write(workdir: Path, dim: int = 64) -> dict:
    from teran_api._proto import search_pb2, search_pb2_grpc

    service = search_service(workdir, "partial")
    service.start()
    rng = np.random.default_rng(0)
    out = {}
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            stub.Index(search_pb2.IndexRequest(items=caption_vectors(rng, dim, 4)), timeout=60)  # the collections exist
            for bad in ("huge int", "nan vector", "scaled concepts"):
                items = caption_vectors(rng, dim, 256, bad)
                try:
                    stub.Index(search_pb2.IndexRequest(items=items), timeout=120)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                out[bad] = {"status": code, "stored": count_found(stub, [i.id for i in items])}
    finally:
        service.stop()
    result = {"cases": out, "stored_after_refusal": sum(c["stored"] for c in out.values() if c["status"] != "OK")}
    log(f"partial_write: {result}")
    return result


def crash(workdir: Path, dim: int = 64, writers: int = 4, seconds: float = 8.0) -> dict:
    from teran_api._proto import search_pb2, search_pb2_grpc

    service = search_service(workdir, "crash")
    service.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            while not stop.is_set():
                items = caption_vectors(rng, dim, 32)
                try:
                    stub.Index(search_pb2.IndexRequest(items=items), timeout=30)
                except grpc.RpcError:
                    return  # the service died: only what was acknowledged counts
                with lock:
                    acknowledged.extend(i.id for i in items)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(writers)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    service.stop(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(60)
    service.start()
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            found = count_found(stub, acknowledged)
    finally:
        service.stop()
    result = {"writers": writers, "acknowledged": len(acknowledged), "acknowledged_lost": len(acknowledged) - found}
    log(f"crash: {result}")
    return result


def milvus_queryable(uri: str) -> bool:
    """Whether Milvus itself answers a query on the captions collection (after a restart it first
    answers "collection not loaded" while it loads the collection again on its own)."""
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri=uri, timeout=3)
        try:
            client.query("teran_captions", filter='id != ""', output_fields=["id"], limit=1, consistency_level="Strong", timeout=3)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - not yet
        return False
    return True


def milvus_restart(workdir: Path, dim: int = 64, writers: int = 4, cycles: int = 2) -> dict:
    """The Milvus standalone server SIGKILLed under a search service that 4 clients keep indexing into,
    then restarted on the same data, `cycles` times: acknowledged ids lost, and how long after Milvus
    answers again (restart() returns once it serves list_collections) Get, Stats and Search succeed."""
    from demo.milvus_standalone import MilvusStandalone
    from teran_api._proto import common_pb2, search_pb2, search_pb2_grpc

    milvus = MilvusStandalone(workdir / "milvus")
    args = ["--milvus-uri", milvus.uri, "--max-index-items", "512", "--log-format", "json"]
    service = LocalService("search_service", "teran.v1.SearchService", args, workdir / "milvus-restart.log")
    acknowledged: list[str] = []
    refused: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    recoveries: list[float] = []
    milvus_ready: list[float] = []
    failures: Counter = Counter()  # why reads failed after Milvus answered again
    query = search_pb2.SearchRequest(
        vectors=search_pb2.Vectors(
            modality=search_pb2.IMAGE,
            global_vector=common_pb2.Tensor(dtype=1, shape=[dim], data=np.full(dim, dim**-0.5, "<f4").tobytes()),
            concepts=common_pb2.Tensor(dtype=1, shape=[1, dim], data=np.full(dim, dim**-0.5, "<f4").tobytes()),
        ),
        top_k=5,
    )

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            while not stop.is_set():
                items = caption_vectors(rng, dim, 32)
                try:
                    stub.Index(search_pb2.IndexRequest(items=items), timeout=10)
                except grpc.RpcError as exc:  # Milvus is down: back off, try new items
                    with lock:
                        refused[exc.code().name] += 1
                    time.sleep(0.2)
                    continue
                with lock:
                    acknowledged.extend(i.id for i in items)

    def reads_work(stub) -> bool:
        with lock:
            some = acknowledged[:8] or ["none-yet"]
        try:
            found = stub.Get(search_pb2.GetRequest(modality=search_pb2.CAPTION, ids=some), timeout=2).items
            stub.Stats(search_pb2.StatsRequest(), timeout=2)
            stub.Search(query, timeout=2)
        except grpc.RpcError as exc:
            failures[f"{exc.code().name}: {exc.details()[:160]}"] += 1
            return False
        return all(item.found for item in found) or some == ["none-yet"]

    service.start()
    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(writers)]
    try:
        for thread in threads:
            thread.start()
        waited = time.monotonic()
        while not acknowledged:  # the first Index creates the collections
            if time.monotonic() - waited > 120:
                raise TimeoutError("no Index acknowledged within 120 s")
            time.sleep(0.1)
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for cycle in range(cycles):
                time.sleep(4)
                log(f"milvus_restart: cycle {cycle + 1}: SIGKILL Milvus ({len(acknowledged)} ids acknowledged)")
                milvus.kill()
                time.sleep(3)
                milvus.restart()
                answering = time.monotonic()
                queryable, back = None, None
                while back is None:
                    if queryable is None and milvus_queryable(milvus.uri):
                        queryable = time.monotonic()
                    if queryable is not None and reads_work(stub):
                        back = time.monotonic()
                    elif time.monotonic() - answering > 180:
                        raise TimeoutError("reads did not recover within 180 s of Milvus answering again")
                    time.sleep(0.05)
                milvus_ready.append(round(queryable - answering, 2))
                recoveries.append(round(back - queryable, 2))
                log(f"milvus_restart: Milvus queryable {milvus_ready[-1]} s after it answered; service reads {recoveries[-1]} s later")
            time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(60)
        with grpc.insecure_channel(service.address) as channel:
            found = count_found(search_pb2_grpc.SearchServiceStub(channel), acknowledged)
    finally:
        stop.set()
        service.stop()
        milvus.stop()
    result = {
        "cycles": cycles,
        "writers": writers,
        "acknowledged": len(acknowledged),
        "acknowledged_lost": len(acknowledged) - found,
        "index_refusals": dict(refused),
        "milvus_query_ready_s_each": milvus_ready,
        "read_recovery_s": max(recoveries),
        "read_recovery_s_each": recoveries,
        "read_failures": dict(failures.most_common(5)),
    }
    log(f"milvus_restart: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_reliability.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "teran-flickr8k", help="exported model directory")
    parser.add_argument(
        "--parts", default="load,partial_write,crash,milvus_restart", help="comma-separated: load, partial_write, crash, milvus_restart"
    )
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (and unary calls) of the load part")
    parser.add_argument("--messages", type=int, default=4, help="messages per stream")
    parser.add_argument("--budget-mib", type=int, default=256, help="the encoder's --max-inflight-bytes, MiB")
    parser.add_argument("--restarts", type=int, default=2, help="Milvus kills and restarts of the milvus_restart part")
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "reliability.json")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the services' logs and data (printed at the end)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"load", "partial_write", "crash", "milvus_restart"}
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    if "load" in parts and not (args.model_dir / "manifest.json").is_file():
        parser.error(f"{args.model_dir}: not an exported model directory (python -m export)")
    command = "python bench/bench_reliability.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    try:
        if "load" in parts:
            report["load"] = load(args.model_dir, workdir, args.streams, args.messages, args.budget_mib)
        if "partial_write" in parts:
            report["partial_write"] = partial_write(workdir)
        if "crash" in parts:
            report["crash"] = crash(workdir)
        if "milvus_restart" in parts:
            report["milvus_restart"] = milvus_restart(workdir, cycles=args.restarts)
    finally:
        if args.keep_workdir:
            log(f"kept {workdir} (service logs, data)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
