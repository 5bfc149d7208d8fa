"""Helpers for the search service tests: configs, a search-service subprocess, and request builders
(the Milvus standalone server is `demo.milvus_standalone`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from teran_api._proto import search_pb2
from teran_api.tensors import to_tensor

ROOT = Path(__file__).resolve().parent.parent


def expect_error(code, call, *args, match: str = "", **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value.details()


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
