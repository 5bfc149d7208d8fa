"""Run locust scenarios headless in this process and write a JSON report.

    python -m loadtest --scenario all --users 4 --spawn-rate 4 --run-time 30 \
        --encoder 127.0.0.1:50051 --search 127.0.0.1:50052 --output reports/loadtest.json

`run(...)` is the Python API (it imports locust, which gevent-monkey-patches the process);
`run_isolated(...)` runs the same in a fresh interpreter and returns the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIO_NAMES = ["encode-captions", "encode-images", "search", "mixed"]
ROOT = Path(__file__).resolve().parent.parent


def command_line(scenario, users, spawn_rate, run_time, encoder, search, output, timeout) -> list[str]:
    return [
        "python", "-m", "loadtest", "--scenario", scenario, "--users", str(users), "--spawn-rate", str(spawn_rate),
        "--run-time", str(run_time), "--encoder", encoder, "--search", search, "--output", str(output), "--timeout", str(timeout),
    ]  # fmt: skip


def machine() -> dict:
    import locust

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "locust": locust.__version__,
    }


def _seed(search: str, timeout: float) -> str | None:
    """Index the sample captions once so that search scenarios have hits (not counted in the stats)."""
    from loadtest.scenarios import CAPTIONS
    from search_service.client import SearchClient

    try:
        with SearchClient(search, timeout=timeout) as client:
            client.index_captions(
                {f"lt-seed-{i}": c for i, c in enumerate(CAPTIONS)}, {f"lt-seed-{i}": {"source": "loadtest"} for i in range(len(CAPTIONS))}
            )
        return None
    except Exception as exc:  # noqa: BLE001 - the scenario then records the failures itself
        return str(exc)


def _summary(name: str, stats, duration: float) -> dict:
    total = stats.total
    requests = total.num_requests  # failures are counted in num_requests too
    percentile = total.get_response_time_percentile if requests else (lambda _q: 0)
    methods = [{"name": entry.name, "requests": entry.num_requests, "failures": entry.num_failures} for entry in stats.entries.values()]
    return {
        "name": name,
        "rps": round(requests / duration, 3) if duration > 0 else 0.0,
        "p50_ms": float(percentile(0.50) or 0),
        "p95_ms": float(percentile(0.95) or 0),
        "p99_ms": float(percentile(0.99) or 0),
        "failures": total.num_failures,
        "requests": requests,
        "duration_s": round(duration, 3),
        "methods": sorted(methods, key=lambda m: m["name"]),
        "errors": [f"{e.name}: {e.error}" for e in list(stats.errors.values())[:5]],
    }


def run_scenario(name: str, *, users: int, spawn_rate: float, run_time: float, encoder: str, search: str, timeout: float = 10.0) -> dict:
    import gevent
    import grpc.experimental.gevent as grpc_gevent
    from locust.env import Environment

    from loadtest.scenarios import SCENARIOS

    grpc_gevent.init_gevent()
    attrs = {"encoder_address": encoder, "search_address": search, "timeout_s": timeout}
    user_class = type(SCENARIOS[name].__name__, (SCENARIOS[name],), attrs)
    env = Environment(user_classes=[user_class])
    runner = env.create_local_runner()
    started = time.monotonic()
    runner.start(users, spawn_rate=spawn_rate)
    end = started + run_time

    def stop_at_end():  # wall clock, not gevent's cached loop time (spawn_later can fire early)
        while time.monotonic() < end:
            gevent.sleep(min(0.1, max(0.0, end - time.monotonic())))
        runner.quit()

    gevent.spawn(stop_at_end)
    runner.greenlet.join()
    return _summary(name, env.stats, time.monotonic() - started)


def run(
    scenario: str = "all",
    *,
    users: int = 2,
    spawn_rate: float = 2.0,
    run_time: float = 10.0,
    encoder: str = "127.0.0.1:50051",
    search: str = "127.0.0.1:50052",
    output: str | Path | None = None,
    timeout: float = 10.0,
) -> dict:
    """Run one scenario (or "all", one after the other) and return (and write, with `output`) the report."""
    names = SCENARIO_NAMES if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {SCENARIO_NAMES} or 'all'")
    if users < 1 or run_time <= 0 or spawn_rate <= 0:
        raise ValueError("users, spawn rate and run time must be positive")
    scenarios = []
    for name in names:
        if name in ("search", "mixed"):
            _seed(search, timeout)
        scenarios.append(
            run_scenario(name, users=users, spawn_rate=spawn_rate, run_time=run_time, encoder=encoder, search=search, timeout=timeout)
        )
    report = {
        "command": shlex.join(command_line(scenario, users, spawn_rate, run_time, encoder, search, output or "-", timeout)),
        "machine": machine(),
        "scenarios": scenarios,
    }
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run_isolated(scenario: str = "all", *, deadline_s: float = 300.0, **options) -> dict:
    """`run` in a fresh `python -m loadtest` process (keeps gevent's monkey-patching out of the caller)."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "report.json"
        defaults = {
            "users": 2,
            "spawn_rate": 2.0,
            "run_time": 10.0,
            "encoder": "127.0.0.1:50051",
            "search": "127.0.0.1:50052",
            "timeout": 10.0,
        }
        defaults.update(options)
        args = command_line(scenario, output=output, **defaults)[3:]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run(
            [sys.executable, "-m", "loadtest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline_s
        )
        if done.returncode != 0:
            raise RuntimeError(f"loadtest exited with {done.returncode}: {done.stderr[-3000:]}")
        return json.loads(output.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description="Locust gRPC load tests for the encoder and search services")
    parser.add_argument("--scenario", default="all", choices=[*SCENARIO_NAMES, "all"])
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--spawn-rate", type=float, default=2.0)
    parser.add_argument("--run-time", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--encoder", default="127.0.0.1:50051", help="encoder service address")
    parser.add_argument("--search", default="127.0.0.1:50052", help="search service address")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    parser.add_argument("--output", default="reports/loadtest.json")
    args = parser.parse_args(argv)
    report = run(
        args.scenario, users=args.users, spawn_rate=args.spawn_rate, run_time=args.run_time, encoder=args.encoder,
        search=args.search, output=args.output, timeout=args.timeout,
    )  # fmt: skip
    for s in report["scenarios"]:
        print(
            f"{s['name']:16s} requests={s['requests']} failures={s['failures']} rps={s['rps']} "
            f"p50={s['p50_ms']}ms p95={s['p95_ms']}ms p99={s['p99_ms']}ms"
        )
    return 0
