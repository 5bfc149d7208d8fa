"""The encoder's contract and process: generated code, no torch, tensors, flags/env, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from encoder_fixtures import build_synthetic_model_dir

from encoder_service.config import ConfigError, EncoderConfig, build_parser, from_args
from teran.errors import FeatureShapeError
from teran_api._proto import common_pb2
from teran_api.tensors import decode, from_tensor, to_tensor

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def test_service_modules_never_import_torch():
    code = (
        "import sys\n"
        "import encoder_service, encoder_service.server, teran_api.encoder_client, encoder_service.backends\n"
        "import encoder_service.model, encoder_service.__main__, tritonclient.grpc, onnxruntime\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_tensor_codec_round_trip_and_errors():
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    tensor = to_tensor(array, "float16")
    assert tensor.dtype == common_pb2.Tensor.FLOAT16 and list(tensor.shape) == [3, 4] and len(tensor.data) == 24
    assert decode(tensor).dtype == np.float16
    np.testing.assert_allclose(from_tensor(tensor), array, atol=1e-3)
    assert np.frombuffer(to_tensor(array).data, "<f4")[5] == array.ravel()[5]  # little-endian float32
    with pytest.raises(FeatureShapeError, match=r"x\.shape: expected 3 dimensions"):
        from_tensor(tensor, "x", ndim=3)
    huge = common_pb2.Tensor(dtype=common_pb2.Tensor.FLOAT32, shape=[2**40, 2**40], data=b"")
    with pytest.raises(FeatureShapeError, match="exceeds the limit of 100 elements"):
        from_tensor(huge, "x", max_elements=100)
    with pytest.raises(FeatureShapeError, match="negative dimension"):
        from_tensor(common_pb2.Tensor(dtype=common_pb2.Tensor.FLOAT32, shape=[-1, 2], data=b""), "x")
    # DTYPE_UNSPECIFIED is FLOAT32 in requests (common.proto); unknown codes are refused by number.
    unspecified = common_pb2.Tensor(shape=[3, 4], data=array.astype("<f4").tobytes())
    assert unspecified.dtype == common_pb2.Tensor.DTYPE_UNSPECIFIED
    np.testing.assert_array_equal(from_tensor(unspecified), array)
    with pytest.raises(FeatureShapeError, match=r"x\.dtype: 5 is not supported; use FLOAT32 or FLOAT16"):
        from_tensor(common_pb2.Tensor(dtype=5, shape=[1], data=b"\0" * 4), "x")


def test_help_documents_every_limit_and_its_variable():
    text = build_parser().format_help()
    for flag in (
        "--max-items", "--max-caption-chars", "--max-tokens", "--max-regions", "--max-image-bytes", "--max-image-pixels",
        "--max-image-side", "--max-message-bytes", "--max-batch", "--max-queue", "--max-queue-delay-ms", "--max-stream-inflight",
        "--max-concurrent-rpcs", "--triton-timeout-s", "--shutdown-grace-s",
    ):  # fmt: skip
        assert flag in text
        assert "TERAN_ENCODER_" + flag[2:].upper().replace("-", "_") in " ".join(text.split())
    assert text.count("LIMIT:") >= 12


def test_flags_and_environment(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("alpha\n\nbeta\n")
    env = {
        "TERAN_ENCODER_MODEL_DIR": str(tmp_path),
        "TERAN_ENCODER_MAX_ITEMS": "5",
        "TERAN_ENCODER_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider",
        "TERAN_ENCODER_AUTH_TOKEN_FILE": str(token_file),
        "TERAN_ENCODER_ACCESS_LOG": "true",
    }
    config = from_args(["--max-items", "7", "--provider-options", '{"CUDAExecutionProvider": {"device_id": 1}}'], env)
    assert config.max_items == 7 and config.model_dir == tmp_path and config.access_log
    assert (
        config.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        and config.provider_options["CUDAExecutionProvider"]["device_id"] == 1
    )
    assert config.auth_tokens == ["alpha", "beta"]
    with pytest.raises(ConfigError, match="TERAN_ENCODER_MAX_BATCH: invalid int"):
        from_args([], {"TERAN_ENCODER_MODEL_DIR": str(tmp_path), "TERAN_ENCODER_MAX_BATCH": "lots"})
    assert config.image_formats == ["JPEG", "PNG", "WEBP"] and config.max_request_id_chars == 128
    assert from_args(["--image-formats", "jpeg,bmp"], env).image_formats == ["JPEG", "BMP"]
    with pytest.raises(ConfigError, match=r"image-formats.*\['HEIF2'\]: give Pillow names"):
        from_args(["--image-formats", "JPEG,HEIF2"], env)
    with pytest.raises(ConfigError, match="--max-items .*must be >= 1"):
        from_args(["--model-dir", str(tmp_path), "--max-items", "0"], {})
    with pytest.raises(ConfigError, match="--model-dir .*required"):
        EncoderConfig().validate()


def test_cli_serves_until_sigterm(tmp_path):
    """`python -m encoder_service`: JSON logs, env settings, bad model dir exit code, clean SIGTERM."""
    from teran_api.encoder_client import EncoderClient, EncoderError

    bad = subprocess.run(
        [PYTHON, "-m", "encoder_service", "--model-dir", str(tmp_path / "missing"), "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "model directory does not exist" in bad.stderr

    model_dir = build_synthetic_model_dir(tmp_path / "model")
    env = dict(os.environ, TERAN_ENCODER_MODEL_DIR=str(model_dir), TERAN_ENCODER_MAX_ITEMS="3", TERAN_ENCODER_ACCESS_LOG="1")
    args = [
        PYTHON,
        "-m",
        "encoder_service",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--intra-op-threads",
        "1",
    ]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        port = None
        end = time.monotonic() + 60
        while port is None and time.monotonic() < end and process.poll() is None:
            for line in list(lines):
                entry = json.loads(line)
                if entry["msg"] == "listening":
                    port = entry["port"]
            time.sleep(0.05)
        assert port, "".join(lines)
        with EncoderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            assert len(client.encode_captions(["a dog", "a cat"], request_id="cli-1")) == 2
            with pytest.raises(EncoderError, match="4 captions exceeds the limit of 3"):
                client.encode_captions(["a"] * 4)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(5)
    entries = [json.loads(line) for line in lines]
    messages = [e["msg"] for e in entries]
    assert {"listening", "model ready", "serving", "signal received", "shutting down", "stopped"} <= set(messages)
    access = [e for e in entries if e.get("request_id") == "cli-1"]
    assert access and access[0]["code"] == "OK" and access[0]["items"] == 2 and access[0]["level"] == "INFO"
