"""The one service launcher (`demo.launcher.LocalService`) and its two users: the demo's `service`
context manager and the load test's `start_local` (the latter runs in tests/test_loadtest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from encoder_fixtures import build_synthetic_model_dir

from demo import steps
from demo.launcher import REPO, LocalService, ServiceStartError
from teran_api.encoder_client import EncoderClient, EncoderError

pytestmark = pytest.mark.slow  # starts and restarts service processes

ENCODER_HEALTH = "teran.v1.EncoderService"
ONE_THREAD = ["--intra-op-threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_synthetic_model_dir(tmp_path_factory.mktemp("launcher") / "model", joint_dim=8)


def health(address: str) -> str:
    with EncoderClient(address, timeout=5) as client:
        try:
            return client.health(timeout=2)
        except EncoderError as error:
            return error.code.name


def test_launcher_modules_import_no_locust_gevent_or_grpc():
    code = "import sys, demo.steps, loadtest.services; print(sorted({'locust', 'gevent', 'grpc'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_demo_service_serves_then_stops_with_a_fresh_log(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steps, "REPO", tmp_path)  # the log goes to tmp_path/artifacts/demo, not the repository's
    log_path = tmp_path / "artifacts" / "demo" / "encoder_service.log"
    for _ in range(2):
        with steps.service("encoder_service", ENCODER_HEALTH, ["--model-dir", str(model_dir), *ONE_THREAD]) as address:
            assert address.startswith("127.0.0.1:")
            assert health(address) == "SERVING"
        assert health(address) == "UNAVAILABLE"  # stopped on exit
        assert log_path.read_text().count("--- start 1: ") == 1  # each run starts a fresh log
    assert f"encoder_service: SERVING on {address} after " in capsys.readouterr().out


def test_demo_service_that_cannot_start_stops_the_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "REPO", tmp_path)
    with pytest.raises(SystemExit, match=r"^\[demo\] encoder_service exited with code 2; see .*artifacts/demo/encoder_service\.log$"):
        with steps.service("encoder_service", ENCODER_HEALTH, ["--model-dir", str(tmp_path / "missing")]):
            pytest.fail("yielded a service that never started")


def test_local_service_restarts_on_the_same_port(model_dir, tmp_path):
    service = LocalService("encoder_service", ENCODER_HEALTH, ["--model-dir", str(model_dir), *ONE_THREAD], tmp_path / "encoder.log")
    try:
        assert service.start() > 0
        first, port = service.pid, service.port
        assert first and service.rss_bytes() > 10 * 2**20
        assert service.stop(signal.SIGKILL) == -signal.SIGKILL
        assert service.pid is None and service.rss_bytes() is None and not os.path.exists(f"/proc/{first}")
        service.start()
        assert service.port == port and health(service.address) == "SERVING"
        assert service.pids == [first, service.pid] and first != service.pid
        assert service.stop() == 0  # SIGTERM: graceful
        assert "--- start 2: " in (tmp_path / "encoder.log").read_text()
    finally:
        service.stop(signal.SIGKILL)


def test_local_service_start_error_names_the_reason_and_the_log_tail(tmp_path):
    service = LocalService("encoder_service", ENCODER_HEALTH, ["--model-dir", str(tmp_path / "missing")], tmp_path / "encoder.log")
    with pytest.raises(ServiceStartError) as caught:
        service.start()
    error = caught.value
    assert isinstance(error, RuntimeError) and error.reason == "encoder_service exited with code 2"
    assert str(error).startswith(error.reason + ": --- start 1: ") and "model directory does not exist" in str(error)
    assert service.pid is None
