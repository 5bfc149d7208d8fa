"""The locust load tests (loadtest/) against real encoder and search servers on loopback.

The servers run in this process (ServerThread); the load generator runs in a fresh interpreter
(`run_isolated`), because locust gevent-monkey-patches the process that imports it."""

from __future__ import annotations

import importlib.util
import socket

import pytest

# Not importorskip: importing locust would gevent-monkey-patch this pytest process.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust (the loadtest dev dependency) is not installed", allow_module_level=True)

from encoder_fixtures import build_synthetic_model_dir, make_config  # noqa: E402
from search_fixtures import search_config, unique_prefix  # noqa: E402

from encoder_service.server import ServerThread as EncoderThread  # noqa: E402
from loadtest.runner import SCENARIO_NAMES, run_isolated  # noqa: E402
from search_service.server import ServerThread as SearchThread  # noqa: E402


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


def test_every_scenario_runs_clean(services):
    encoder, search = services
    report = run_isolated("all", users=2, spawn_rate=2, run_time=3, encoder=encoder, search=search, timeout=20, deadline_s=120)
    assert set(report) >= {"command", "machine", "scenarios"}
    assert "--scenario all" in report["command"]
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
