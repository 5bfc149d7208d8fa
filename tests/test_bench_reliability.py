"""bench/bench_reliability.py: its write parts run end to end against real search service processes
(milvus-lite) and report what the hardening promises: nothing stored by refused requests, nothing
acknowledged lost to a SIGKILL."""

from __future__ import annotations

import json

import pytest
from bench_modules import load_bench

pytestmark = pytest.mark.slow  # starts, kills and restarts search service processes


def test_partial_write_and_crash_parts(tmp_path):
    bench = load_bench("bench_reliability")
    output = tmp_path / "reliability.json"
    assert bench.main(["--parts", "partial_write,crash", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["command"].startswith("python bench/bench_reliability.py --parts partial_write,crash")
    cases = report["partial_write"]["cases"]
    assert set(cases) == {"huge int", "nan vector", "scaled concepts"}
    assert all(c == {"status": "INVALID_ARGUMENT", "stored": 0} for c in cases.values())
    assert report["partial_write"]["stored_after_refusal"] == 0
    assert report["crash"]["acknowledged"] > 0 and report["crash"]["acknowledged_lost"] == 0
    assert "load" not in report


def test_milvus_restart_part(tmp_path):
    """Milvus standalone SIGKILLed under indexing and restarted: nothing acknowledged lost, and the report
    says how long Milvus took to serve the collection again and how long the service's reads took after."""
    pytest.importorskip("milvus")
    bench = load_bench("bench_reliability")
    output = tmp_path / "reliability.json"
    assert bench.main(["--parts", "milvus_restart", "--restarts", "1", "--output", str(output)]) == 0
    part = json.loads(output.read_text())["milvus_restart"]
    assert part["cycles"] == 1 and part["acknowledged"] > 0 and part["acknowledged_lost"] == 0
    assert len(part["milvus_query_ready_s_each"]) == len(part["read_recovery_s_each"]) == 1
    assert part["read_recovery_s"] == part["read_recovery_s_each"][0] >= 0


def test_unknown_part_is_a_usage_error(capsys):
    bench = load_bench("bench_reliability")
    with pytest.raises(SystemExit) as info:
        bench.main(["--parts", "load,chaos"])
    assert info.value.code == 2 and "unknown parts: ['chaos']" in capsys.readouterr().err
