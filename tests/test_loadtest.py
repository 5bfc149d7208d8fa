"""The locust load tests (loadtest/) against real encoder and search servers on loopback.

The scenario tests run the servers in this process (ServerThread); the --start-local, soak and
fault tests let the runner start them as subprocesses on a synthetic model. The load generator
always runs in a fresh interpreter (`run_isolated`), because locust gevent-monkey-patches the
process that imports it."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Not importorskip: importing locust would gevent-monkey-patch this pytest process.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust (the loadtest dev dependency) is not installed", allow_module_level=True)

from encoder_fixtures import build_synthetic_model_dir, make_config  # noqa: E402
from search_fixtures import search_config, unique_prefix  # noqa: E402

from encoder_service.server import ServerThread as EncoderThread  # noqa: E402
from loadtest.runner import SCENARIO_NAMES, _verify_acked, run_isolated  # noqa: E402
from search_service.server import ServerThread as SearchThread  # noqa: E402
from teran_api.search_client import SearchClient  # noqa: E402

pytestmark = pytest.mark.slow  # locust runs against both services started in subprocesses

RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"}  # as loadtest.scenarios.RETRYABLE


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    model_dir = build_synthetic_model_dir(tmp_path_factory.mktemp("loadtest-model") / "model", joint_dim=8)
    with EncoderThread(make_config(model_dir, max_items=16)) as encoder:
        uri = str(tmp_path_factory.mktemp("loadtest-lite") / "search.db")
        search = SearchThread(search_config(uri, encoder.target, collection_prefix=unique_prefix("lt")))
        try:
            yield encoder.target, search.target
        finally:
            search.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_synthetic_model_dir(tmp_path_factory.mktemp("loadtest-local") / "model", joint_dim=8)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    """A Flickr8k-style folder: 3 dev photos with 5 captions each."""
    root = tmp_path_factory.mktemp("flickr8k-mini")
    (root / "images").mkdir()
    rng = np.random.default_rng(1)
    names = [f"photo{i}.jpg" for i in range(3)]
    rows = ["image,caption"]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / "images" / name, format="JPEG")
        rows += [f"{name},photo {i} caption {j}, with a comma" for j in range(5)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "dev_images.txt").write_text("\n".join(names) + "\n")
    return root


def assert_stopped(pids: list[int]) -> None:
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"service process {pid} still runs"


def test_every_scenario_runs_clean(services, monkeypatch):
    encoder, search = services
    monkeypatch.setenv("TERAN_FLICKR8K_DIR", "/nonexistent/flickr8k")  # -> the built-in samples
    report = run_isolated("all", users=2, spawn_rate=2, run_time=3, encoder=encoder, search=search, timeout=20, deadline_s=120)
    assert set(report) >= {"command", "machine", "scenarios"}
    assert "--scenario all" in report["command"]
    assert report["data"] == {"source": "built-in", "captions": 8, "images": 4}
    assert "services" not in report  # not started by the runner
    assert [s["name"] for s in report["scenarios"]] == SCENARIO_NAMES
    for s in report["scenarios"]:
        assert s["requests"] > 0, s
        assert s["failures"] == 0, s
        assert 0 <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], s
        assert s["rps"] > 0, s
    mixed = {m["name"] for m in report["scenarios"][-1]["methods"]}
    assert mixed == {"Index", "Search"}


def test_unreachable_server_records_failures():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    report = run_isolated("encode-captions", users=2, spawn_rate=2, run_time=1.5, encoder=address, search=address, timeout=2, deadline_s=60)
    (s,) = report["scenarios"]
    assert s["requests"] > 0 and s["failures"] == s["requests"], s
    assert s["errors"], s


def test_verify_acked_queries_every_id(services):
    """The fault run's check asks the service: indexed ids are found, an id never indexed is reported missing."""
    _, search = services
    ids = [f"lt-verify-{i}" for i in range(3)]
    with SearchClient(search, timeout=30) as client:
        client.index_captions({i: "a dog runs on the beach" for i in ids})
    missing, stored = _verify_acked(search, [*ids, "lt-never-indexed"], timeout=30)
    assert missing == ["lt-never-indexed"]
    assert stored >= 3


def test_start_local_scenario_and_soak_on_real_photos(model_dir, photos_dir):
    report = run_isolated(
        "encode-images", start_local=str(model_dir), data_dir=str(photos_dir), users=2, spawn_rate=2, run_time=2,
        soak_seconds=4, soak_window=2, timeout=20, deadline_s=180,
    )  # fmt: skip
    assert f"--start-local {model_dir}" in report["command"] and "--encoder" not in report["command"]
    assert report["data"]["captions"] == 15 and report["data"]["images"] == 3
    assert str(photos_dir.resolve()) in report["data"]["source"]
    assert report["seed_error"] is None
    assert report["services"]["started_by"] == "--start-local"
    pids = report["services"]["pids"]
    assert len(pids["encoder"]) == 1 and len(pids["search"]) == 1
    assert_stopped(pids["encoder"] + pids["search"])  # stopped when the run ended
    images, soak = report["scenarios"]
    assert images["name"] == "encode-images" and images["requests"] > 0 and images["failures"] == 0
    assert soak["name"] == "soak" and soak["requests"] > 0 and soak["failures"] == 0
    assert {m["name"] for m in soak["methods"]} == {"Index", "Search"}
    details = soak["soak"]
    assert details["workload"] == "mixed" and len(details["windows"]) == 2
    assert sum(w["requests"] for w in details["windows"]) == soak["requests"]
    for name in ("encoder", "search"):
        memory = details["rss_mb"][name]
        assert memory["start"] > 10 and memory["end"] > 10, memory
        assert memory["growth"] == pytest.approx(memory["end"] - memory["start"], abs=0.11)
        assert all(w["rss_mb"][name] > 10 for w in details["windows"])
    assert details["p99_first_window_ms"] == details["windows"][0]["p99_ms"] > 0
    assert details["p99_last_window_ms"] == details["windows"][-1]["p99_ms"] > 0


@pytest.mark.parametrize(("signal", "exit_code"), [("TERM", 0), ("KILL", -9)])
def test_fault_run_loses_nothing_acknowledged(model_dir, photos_dir, signal, exit_code):
    """The search service is stopped (graceful SIGTERM / crash SIGKILL) and restarted twice under load."""
    report = run_isolated(
        "none", start_local=str(model_dir), data_dir=str(photos_dir), users=2, spawn_rate=2, run_time=1, fault_seconds=4,
        fault_restarts=2, fault_signal=signal, timeout=10, deadline_s=180,
    )  # fmt: skip
    (fault,) = report["scenarios"]
    assert fault["name"] == f"fault-sig{signal.lower()}"
    details = fault["fault"]
    assert details["restarts"] == 2 and details["signal"] == f"SIG{signal}"
    assert [entry["exit_code"] for entry in details["timeline"]] == [exit_code, exit_code]
    assert details["acked_ids"] > 0 and details["acked_ids"] == 4 * details["acked_index_calls"]
    # every acknowledged id was looked up with Get on the restarted service and found
    assert details["missing_ids"] == 0 and details["missing_sample"] == []
    assert details["verified_ids"] == details["acked_ids"]
    assert details["stored_captions"] >= details["acked_ids"]
    # the restarts were seen by the clients, only as retryable codes, each one counted as a locust failure
    assert fault["failures"] > 0 and set(details["error_codes"]) <= RETRYABLE, details["error_codes"]
    assert details["retryable_errors"] == fault["failures"] == sum(details["error_codes"].values())
    assert details["non_retryable_errors"] == 0 and details["given_up_ids"] == 0
    for entry in details["timeline"]:  # and they recovered: a call started after the outage began succeeded
        assert entry["recovered_after_s"] is not None and entry["recovered_after_s"] >= entry["first_failure_after_s"]
    assert details["time_to_recovery_s"] == max(entry["recovered_after_s"] for entry in details["timeline"])
    pids = report["services"]["pids"]
    assert len(pids["search"]) == 3 and len(set(pids["search"])) == 3  # started, then restarted twice
    assert_stopped(pids["encoder"] + pids["search"])


def test_fault_run_needs_start_local():
    with pytest.raises(RuntimeError, match="needs --start-local"):
        run_isolated("none", fault_seconds=2, deadline_s=60)
