"""Helpers for the search service tests: a real Milvus standalone server (PyPI `milvus`), configs,
a search-service subprocess, and request builders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from encoder_service.tensors import to_tensor
from search_service._proto import search_pb2

ROOT = Path(__file__).resolve().parent.parent


def expect_error(code, call, *args, match: str = "", **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value.details()


class MilvusStandalone:
    """The Milvus standalone binary shipped by the PyPI `milvus` package, on loopback ports chosen free.

    Stopped with the package's stop() (SIGTERM, then SIGKILL after 1 s); the process group is killed
    as a last resort."""

    def __init__(self, base_dir: Path, start_timeout_s: float = 120.0):
        from milvus import MilvusServer, MilvusServerConfig

        # The embedded etcd would listen on its fixed default ports (client 2379, peer 2380), so a
        # second server on this machine (another test run) would crash: give it free ones, through
        # an etcd config file (Milvus's etcd.config.path, a key the package's template lacks).
        client_port, peer_port = free_ports(2)
        self.server = MilvusServer(MilvusServerConfig(etcd_port=client_port), wait_for_started=False)
        self.server.set_base_dir(str(base_dir))
        self.base_dir = base_dir
        etcd_config = base_dir / "embedded-etcd.yaml"
        etcd_config.write_text(
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer_port}\n"
        )
        template = self.server.config.template_text
        anchor = "  use:\n    embed: true"
        assert anchor in template, "the milvus package's config template changed: update MilvusStandalone"
        self.server.config.template_text = template.replace(anchor, f"  config:\n    path: {etcd_config}\n{anchor}", 1)
        self.server.start()
        self.pid = self.server.server_proc.pid
        try:
            self.server.wait_started(timeout=int(start_timeout_s * 1000))
        except BaseException:
            self.stop()
            raise
        self.uri = f"http://127.0.0.1:{self.server.listen_port}"
        self._wait_usable(start_timeout_s)

    def _wait_usable(self, timeout: float) -> None:
        from pymilvus import MilvusClient

        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            code = self.server.server_proc.poll()
            if code is not None:  # it died (e.g. a port taken meanwhile): say so now, not after the timeout
                raise RuntimeError(f"Milvus standalone exited with code {code} while starting (logs under {self.base_dir})")
            try:
                client = MilvusClient(uri=self.uri, timeout=10)
                client.list_collections()
                client.close()
                return
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"Milvus standalone at {self.uri} not usable after {timeout}s: {last}")

    def kill(self) -> None:
        """SIGKILL the server (a crash); its data stays for restart()."""
        self.server.server_proc.kill()
        self.server.server_proc.wait(30)
        self.server.server_proc = None

    def restart(self, timeout_s: float = 120.0) -> None:
        """Start the binary again on the same data and ports (after kill())."""
        # The package re-checks its ports by binding them without SO_REUSEADDR, which fails while the
        # killed server's connections sit in TIME_WAIT; its config file is already written: keep it.
        resolve, self.server.config.resolve = self.server.config.resolve, lambda: None
        try:
            self.server.start()
        finally:
            self.server.config.resolve = resolve
        self.pid = self.server.server_proc.pid
        self.server.wait_started(timeout=int(timeout_s * 1000))
        assert f"http://127.0.0.1:{self.server.listen_port}" == self.uri, "the restarted server took other ports"
        self._wait_usable(timeout_s)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, 0)
            os.kill(self.pid, signal.SIGKILL)  # last resort: the binary survived stop()


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def drop_collections(uri: str, prefix: str) -> None:
    from pymilvus import MilvusClient

    with contextlib.suppress(Exception):
        client = MilvusClient(uri=uri, timeout=30)
        for name in (f"{prefix}_images", f"{prefix}_captions", f"{prefix}_meta", f"{prefix}_filter_check"):
            if client.has_collection(name):
                client.drop_collection(name)
        client.close()


def unique_prefix(base: str = "t") -> str:
    return f"{base}_{uuid.uuid4().hex[:10]}"


def search_config(uri: str, encoder_target: str = "", **overrides):
    from search_service.config import SearchConfig

    values = dict(
        milvus_uri=uri, encoder_address=encoder_target, host="127.0.0.1", port=0, metrics_port=-1, max_index_items=32,
        max_ids=64, max_top_k=50, max_metadata_bytes=2048, shutdown_grace_s=2.0, milvus_workers=2, encoder_timeout_s=30,
    )  # fmt: skip
    values.update(overrides)
    return SearchConfig(**values).validate()


# --------------------------------------------------------------------------- requests


def vectors_message(modality: str, global_vector, concepts, *, boxes=None, word_pieces=(), model=None, dtype=np.float32):
    v = search_pb2.Vectors(modality=search_pb2.IMAGE if modality == "images" else search_pb2.CAPTION)
    v.global_vector.CopyFrom(to_tensor(np.asarray(global_vector), dtype))
    v.concepts.CopyFrom(to_tensor(np.asarray(concepts), dtype))
    if boxes is not None:
        v.boxes.CopyFrom(to_tensor(np.asarray(boxes), np.float32))
    v.word_pieces.extend(word_pieces)
    if model is not None:
        v.model.name, v.model.version, v.model.dimension = model
    return v


def random_unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def vector_item(item_id: str, modality: str, dim: int, seed: int, n: int = 5, metadata: dict | None = None, model=None):
    rng = np.random.default_rng(seed)
    boxes = rng.random((n, 4), dtype=np.float32) if modality == "images" else None
    pieces = [f"w{i}" for i in range(n)] if modality == "captions" else ()
    vectors = vectors_message(modality, random_unit(rng, dim), random_unit(rng, n, dim), boxes=boxes, word_pieces=pieces, model=model)
    return search_pb2.IndexItem(id=item_id, metadata_json=json.dumps(metadata or {}), vectors=vectors)


# --------------------------------------------------------------------------- a subprocess


class SearchProcess:
    """`python -m search_service` in a subprocess; stderr (JSON logs) goes to a file that is polled for the port."""

    def __init__(self, log_path: Path, args: list[str], timeout: float = 60.0):
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "search_service", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log, env=env
        )
        self.port = self._wait_serving(timeout)

    def _wait_serving(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        port = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"search service exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("msg") == "listening":
                        port = entry["port"]
                    if entry.get("msg") == "serving" and port:
                        return int(port)
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"search service not serving after {timeout}s: {self.log_path.read_text()[-2000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
