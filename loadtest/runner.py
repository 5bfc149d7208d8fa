"""Run locust scenarios headless in this process and write a JSON report.

    python -m loadtest --start-local artifacts/teran-flickr8k --scenario all --users 4 --run-time 45 \
        --soak-seconds 180 --fault-seconds 45 --fault-restarts 2 --fault-signal TERM,KILL --output reports/loadtest.json
    python -m loadtest --scenario all --encoder 127.0.0.1:50051 --search 127.0.0.1:50052   # services already running

`run(...)` is the Python API (it imports locust, which gevent-monkey-patches the process);
`run_isolated(...)` runs the same in a fresh interpreter and returns the report. See loadtest/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIO_NAMES = ["encode-captions", "encode-images", "search", "mixed"]
ROOT = Path(__file__).resolve().parent.parent

# Options of `run` / flags of `python -m loadtest` (flag = "--" + name with dashes), with their defaults.
DEFAULTS = {
    "users": 2,
    "spawn_rate": 2.0,
    "run_time": 10.0,
    "encoder": "127.0.0.1:50051",
    "search": "127.0.0.1:50052",
    "timeout": 10.0,
    "start_local": None,
    "encoder_precision": None,
    "workdir": None,
    "data_dir": None,
    "soak_seconds": 0.0,
    "soak_window": 30.0,
    "fault_seconds": 0.0,
    "fault_restarts": 1,
    "fault_signal": "TERM",
}


def command_line(scenario: str, output, **options) -> list[str]:
    """The `python -m loadtest ...` command that runs `run(scenario, output=output, **options)`."""
    opts = {**DEFAULTS, **options}
    argv = ["python", "-m", "loadtest", "--scenario", scenario]
    for name, value in opts.items():
        if value is None or (opts["start_local"] and name in ("encoder", "search")):
            continue
        if (name == "soak_window" and not opts["soak_seconds"]) or (
            name in ("fault_restarts", "fault_signal") and not opts["fault_seconds"]
        ):
            continue
        argv += ["--" + name.replace("_", "-"), str(value)]
    return [*argv, "--output", str(output)]


def machine() -> dict:
    import locust

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "locust": locust.__version__,
    }


def _seed(search: str, timeout: float, samples) -> str | None:
    """Index sample photos (what caption searches find) and captions once (not counted in the stats)."""
    from teran_api.search_client import SearchClient

    try:
        with SearchClient(search, timeout=max(timeout, 120.0)) as client:
            photos = {f"lt-seed-img-{i}": image for i, image in enumerate(samples.images)}
            client.index_images(photos, {k: {"source": "loadtest"} for k in photos})
            captions = {f"lt-seed-{i}": c for i, c in enumerate(samples.captions[:32])}
            client.index_captions(captions, {k: {"source": "loadtest"} for k in captions})
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


def _run_users(user_class, *, users: int, spawn_rate: float, run_time: float, driver=None):
    """Run `users` users of `user_class` for `run_time` s (and until `driver(started, events)`, run in a greenlet
    alongside, has returned). Returns (stats, duration, events, started); `events` holds one
    (monotonic time at completion, method, response ms, status code name) per call."""
    import gevent
    import grpc.experimental.gevent as grpc_gevent
    from locust.env import Environment

    grpc_gevent.init_gevent()
    # quit() lets each user finish the call it is in (up to a deadline more), so that stopping adds no failures
    env = Environment(user_classes=[user_class], stop_timeout=user_class.timeout_s + 5.0)
    events: list[tuple[float, str, float, str]] = []

    def record(request_type, name, response_time, response_length, exception=None, context=None, **_):
        events.append((time.monotonic(), name, response_time, (context or {}).get("code") or ("OK" if exception is None else "ERROR")))

    env.events.request.add_listener(record)
    runner = env.create_local_runner()
    started = time.monotonic()
    runner.start(users, spawn_rate=spawn_rate)
    end = started + run_time
    helper = gevent.spawn(driver, started, events) if driver else None

    def stop_at_end():  # wall clock, not gevent's cached loop time (spawn_later can fire early)
        while time.monotonic() < end or (helper is not None and not helper.ready()):
            gevent.sleep(min(0.1, max(0.01, end - time.monotonic())))
        runner.quit()

    gevent.spawn(stop_at_end)
    runner.greenlet.join()
    if helper is not None:
        helper.get()  # re-raise what the driver raised
    return env.stats, time.monotonic() - started, events, started


def _user_class(base, **attrs):
    return type(base.__name__, (base,), attrs)


def _attrs(encoder: str, search: str, timeout: float, samples) -> dict:
    return {
        "encoder_address": encoder,
        "search_address": search,
        "timeout_s": timeout,
        "captions": samples.captions,
        "images": samples.images,
    }


def run_scenario(
    name: str, *, users: int, spawn_rate: float, run_time: float, encoder: str, search: str, timeout: float = 10.0, samples=None
) -> dict:
    from loadtest.scenarios import SCENARIOS, load_samples

    samples = samples or load_samples()
    user_class = _user_class(SCENARIOS[name], **_attrs(encoder, search, timeout, samples))
    stats, duration, _, _ = _run_users(user_class, users=users, spawn_rate=spawn_rate, run_time=run_time)
    return _summary(name, stats, duration)


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)), 2) if values else 0.0


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def run_soak(*, seconds: float, window: float, users: int, spawn_rate: float, attrs: dict, services: dict) -> dict:
    """The mixed workload for `seconds`: latency per `window` and each service's RSS (process tree) as it goes."""
    import gevent

    from loadtest.scenarios import MixedUser

    count = max(1, round(seconds / window))
    window = seconds / count
    rss = {name: [_mb(service.rss_bytes())] for name, service in services.items()}  # at the start, then after each window

    def sample_memory(started, _events):
        for k in range(1, count + 1):
            while time.monotonic() < started + k * window:
                gevent.sleep(0.2)
            for name, service in services.items():
                rss[name].append(_mb(service.rss_bytes()))

    stats, duration, events, started = _run_users(
        _user_class(MixedUser, **attrs), users=users, spawn_rate=spawn_rate, run_time=seconds, driver=sample_memory
    )
    buckets: list[list[tuple]] = [[] for _ in range(count)]
    for event in events:
        buckets[min(count - 1, int((event[0] - started) // window))].append(event)
    windows = [
        {
            "start_s": round(k * window, 1),
            "requests": len(bucket),
            "failures": sum(1 for e in bucket if e[3] != "OK"),
            "rps": round(len(bucket) / window, 3),
            "p50_ms": _percentile([e[2] for e in bucket], 50),
            "p99_ms": _percentile([e[2] for e in bucket], 99),
            "rss_mb": {name: values[k + 1] for name, values in rss.items()},
        }
        for k, bucket in enumerate(buckets)
    ]
    memory = {
        name: {
            "start": values[0],
            "end": values[-1],
            "growth": None if values[0] is None or values[-1] is None else round(values[-1] - values[0], 1),
        }
        for name, values in rss.items()
    }
    summary = _summary("soak", stats, duration)
    summary["soak"] = {
        "workload": "mixed",
        "seconds": seconds,
        "window_s": round(window, 3),
        "rss_mb": memory,
        "p99_first_window_ms": windows[0]["p99_ms"],
        "p99_last_window_ms": windows[-1]["p99_ms"],
        "windows": windows,
    }
    return summary


def _verify_acked(address: str, ids: list[str], timeout: float) -> tuple[list[str], int]:
    """Get every id back (captions collection); returns (missing ids, stored captions per Stats)."""
    from teran_api.search_client import CAPTION, SearchClient, SearchError

    def retrying(fn, *args):
        for attempt in range(30):
            try:
                return fn(*args)
            except SearchError as exc:
                if exc.code.name != "UNAVAILABLE" or attempt == 29:
                    raise
                time.sleep(1.0)

    missing: list[str] = []
    with SearchClient(address, timeout=max(timeout, 60.0)) as client:
        for start in range(0, len(ids), 500):
            response = retrying(client.get, CAPTION, ids[start : start + 500])
            missing.extend(item.id for item in response if not item.found)
        return missing, retrying(client.stats).captions


def _signals(value: str) -> list[str]:
    """Signal names from a comma list: "TERM,KILL" -> ["SIGTERM", "SIGKILL"] (one fault run each)."""
    names = [f"SIG{part.strip().upper().removeprefix('SIG')}" for part in value.split(",") if part.strip()]
    unknown = [n for n in names if n not in ("SIGTERM", "SIGKILL", "SIGINT")]
    if unknown or not names:
        raise ValueError(f"--fault-signal: expected TERM, KILL or INT (comma separated), got {value!r}")
    return names


def succeeded_since(events: list, since: float) -> bool:
    """Whether a call started at or after `since` (time.monotonic()) has succeeded; `events` as _run_users records them."""
    return any(e[3] == "OK" and e[0] - e[2] / 1000.0 >= since for e in events)


def run_fault(
    *, seconds: float, restarts: int, sig: str, users: int, spawn_rate: float, attrs: dict, search_service, timeout: float
) -> dict:
    """The mixed workload (Index retried until acknowledged) while the search service is stopped with SIGsig and
    started again on the same port and milvus-lite file `restarts` times; then every acknowledged id is looked up."""
    import gevent

    from loadtest.scenarios import RETRYABLE, FaultMixedUser

    signum = signal.Signals[sig]
    acked: list[str] = []
    gave_up: list[str] = []
    timeline: list[dict] = []

    def restart_search(started, events):
        for k in range(restarts):
            at = started + seconds * (k + 1) / (restarts + 1)
            while time.monotonic() < at:
                gevent.sleep(0.05)
            signalled = time.monotonic()
            exit_code = search_service.stop(signum)
            stopped = time.monotonic()
            search_service.start()
            serving = time.monotonic()
            timeline.append(
                {
                    "signal": signum.name,
                    "at_s": round(signalled - started, 3),
                    "exit_code": exit_code,
                    "stopped_after_s": round(stopped - signalled, 3),
                    "serving_after_s": round(serving - signalled, 3),
                    "_signalled": signalled,
                }
            )
        # Load goes on after the last restart too: for a share of the run, and until a call started after the service
        # was back has succeeded (on a loaded machine the first calls after a restart can outlast that share).
        share_end, give_up = serving + seconds / (restarts + 1), serving + seconds + timeout
        while time.monotonic() < share_end or (not succeeded_since(events, serving) and time.monotonic() < give_up):
            gevent.sleep(0.05)

    user_class = _user_class(FaultMixedUser, **attrs, acked=acked, gave_up=gave_up)
    stats, duration, events, started = _run_users(user_class, users=users, spawn_rate=spawn_rate, run_time=seconds, driver=restart_search)
    for entry in timeline:  # what clients saw: the first failure after the signal, then the first success of a call started after it
        signalled = entry.pop("_signalled")
        failed_at = next((e[0] for e in events if e[0] >= signalled and e[3] != "OK"), None)
        recovered = None
        if failed_at is not None:
            recovered = min((e[0] for e in events if e[3] == "OK" and e[0] - e[2] / 1000.0 >= failed_at), default=None)
        entry["first_failure_after_s"] = None if failed_at is None else round(failed_at - signalled, 3)
        entry["client_outage_s"] = None if recovered is None else round(recovered - failed_at, 3)
        entry["recovered_after_s"] = None if recovered is None else round(recovered - signalled, 3)
    codes = collections.Counter(e[3] for e in events if e[3] != "OK")
    unique = list(dict.fromkeys(acked))
    missing, stored = _verify_acked(search_service.address, unique, timeout)
    summary = _summary(f"fault-{signum.name.lower()}", stats, duration)
    summary["fault"] = {
        "workload": "mixed, Index retried with the same ids on a retryable code until acknowledged",
        "restarts": len(timeline),
        "signal": signum.name,
        "timeline": timeline,
        "time_to_recovery_s": max((e["recovered_after_s"] or e["serving_after_s"] for e in timeline), default=None),
        "error_codes": dict(sorted(codes.items())),
        "retryable_errors": sum(n for code, n in codes.items() if code in RETRYABLE),
        "non_retryable_errors": sum(n for code, n in codes.items() if code not in RETRYABLE),
        "acked_index_calls": len(unique) // FaultMixedUser.batch,
        "acked_ids": len(unique),
        "verified_ids": len(unique) - len(missing),
        "missing_ids": len(missing),
        "missing_sample": missing[:10],
        "given_up_ids": len(gave_up),
        "stored_captions": stored,
    }
    return summary


def run(scenario: str = "all", *, output: str | Path | None = None, **options) -> dict:
    """Run one scenario (or "all", one after the other, or "none"), then the soak and fault runs when their
    seconds are set; return (and write, with `output`) the report. Options: see DEFAULTS."""
    from loadtest.scenarios import load_samples
    from loadtest.services import start_local

    unknown_options = set(options) - set(DEFAULTS)
    if unknown_options:
        raise TypeError(f"unknown options {sorted(unknown_options)}")
    opts = {**DEFAULTS, **options}
    names = SCENARIO_NAMES if scenario == "all" else [] if scenario == "none" else [scenario]
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {SCENARIO_NAMES}, 'all' or 'none'")
    users, spawn_rate, run_time, timeout = opts["users"], opts["spawn_rate"], opts["run_time"], opts["timeout"]
    if users < 1 or run_time <= 0 or spawn_rate <= 0 or opts["soak_seconds"] < 0 or opts["fault_seconds"] < 0:
        raise ValueError("users, spawn rate and run time must be positive (soak and fault seconds >= 0)")
    if opts["fault_seconds"] and not opts["start_local"]:
        raise ValueError("the fault run restarts the search service: it needs --start-local MODEL_DIR")
    _signals(opts["fault_signal"])
    if opts["fault_restarts"] < 1:
        raise ValueError("--fault-restarts must be at least 1")
    samples = load_samples(opts["data_dir"])
    report = {
        "command": shlex.join(command_line(scenario, output or "-", **options)),
        "machine": machine(),
        "data": samples.describe(),
        "scenarios": [],
    }
    with contextlib.ExitStack() as stack:
        services = {}
        encoder, search = opts["encoder"], opts["search"]
        if opts["start_local"]:
            workdir = opts["workdir"] or stack.enter_context(tempfile.TemporaryDirectory(prefix="teran-loadtest-"))
            Path(workdir).mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            encoder_service, search_service = stack.enter_context(
                start_local(opts["start_local"], workdir, encoder_precision=opts["encoder_precision"])
            )
            services = {"encoder": encoder_service, "search": search_service}
            encoder, search = encoder_service.address, search_service.address
            report["services"] = {
                "started_by": "--start-local",
                "model_dir": str(opts["start_local"]),
                "encoder_precision": opts["encoder_precision"] or "fp32",
                "milvus": "fresh milvus-lite file" + ("" if opts["workdir"] else " in a temporary directory"),
                "start_s": round(time.monotonic() - started, 3),
            }
        attrs = _attrs(encoder, search, timeout, samples)
        if any(n in ("search", "mixed") for n in names) or opts["soak_seconds"] or opts["fault_seconds"]:
            report["seed_error"] = _seed(search, timeout, samples)
        for name in names:
            report["scenarios"].append(
                run_scenario(
                    name,
                    users=users,
                    spawn_rate=spawn_rate,
                    run_time=run_time,
                    encoder=encoder,
                    search=search,
                    timeout=timeout,
                    samples=samples,
                )
            )
        if opts["soak_seconds"]:
            report["scenarios"].append(
                run_soak(
                    seconds=opts["soak_seconds"],
                    window=opts["soak_window"],
                    users=users,
                    spawn_rate=spawn_rate,
                    attrs=attrs,
                    services=services,
                )
            )
        for sig in _signals(opts["fault_signal"]) if opts["fault_seconds"] else []:
            report["scenarios"].append(
                run_fault(
                    seconds=opts["fault_seconds"],
                    restarts=opts["fault_restarts"],
                    sig=sig,
                    users=users,
                    spawn_rate=spawn_rate,
                    attrs=attrs,
                    search_service=services["search"],
                    timeout=timeout,
                )  # fmt: skip
            )
    if services:
        report["services"]["pids"] = {name: service.pids for name, service in services.items()}
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def run_isolated(scenario: str = "all", *, deadline_s: float = 300.0, **options) -> dict:
    """`run` in a fresh `python -m loadtest` process (keeps gevent's monkey-patching out of the caller)."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "report.json"
        args = command_line(scenario, output, **options)[3:]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run(
            [sys.executable, "-m", "loadtest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline_s
        )
        if done.returncode != 0:
            raise RuntimeError(f"loadtest exited with {done.returncode}: {done.stderr[-3000:]}")
        return json.loads(output.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description="Locust gRPC load tests for the encoder and search services")
    parser.add_argument("--scenario", default="all", choices=[*SCENARIO_NAMES, "all", "none"], help="'none': only the soak / fault runs")
    parser.add_argument("--users", type=int, default=DEFAULTS["users"])
    parser.add_argument("--spawn-rate", type=float, default=DEFAULTS["spawn_rate"])
    parser.add_argument("--run-time", type=float, default=DEFAULTS["run_time"], help="seconds per scenario")
    parser.add_argument("--encoder", default=DEFAULTS["encoder"], help="encoder service address (ignored with --start-local)")
    parser.add_argument("--search", default=DEFAULTS["search"], help="search service address (ignored with --start-local)")
    parser.add_argument("--timeout", type=float, default=DEFAULTS["timeout"], help="deadline of each call, seconds")
    parser.add_argument(
        "--start-local", metavar="MODEL_DIR", default=None,
        help="start the encoder on this exported model and the search service on a fresh milvus-lite file (loopback), stop both after",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-precision", default=None, choices=["fp32", "fp16", "int8"],
        help="with --start-local: the encoder's --precision (default: the service's, fp32; int8: quantized graphs for CPUs)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", default=None,
        help="with --start-local: folder for the milvus-lite file and the service logs, kept (default: a temporary one, removed)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", default=None,
        help="Flickr8k-style folder for real dev captions and photos (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k; "
        "built-in samples when absent)",
    )  # fmt: skip
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="also run the mixed workload this long (soak; 0: no soak)")
    parser.add_argument("--soak-window", type=float, default=DEFAULTS["soak_window"], help="soak latency / memory window, seconds")
    parser.add_argument(
        "--fault-seconds", type=float, default=0.0, help="also run the fault run (mixed load, search service restarted) this long"
    )
    parser.add_argument("--fault-restarts", type=int, default=DEFAULTS["fault_restarts"], help="search service restarts in the fault run")
    parser.add_argument(
        "--fault-signal", default=DEFAULTS["fault_signal"],
        help="signal that stops the search service: TERM (graceful drain), KILL (crash) or INT; comma separated: one fault run each",
    )  # fmt: skip
    parser.add_argument("--output", default="reports/loadtest.json")
    args = vars(parser.parse_args(argv))
    scenario, output = args.pop("scenario"), args.pop("output")
    report = run(scenario, output=output, **args)
    for s in report["scenarios"]:
        print(
            f"{s['name']:16s} requests={s['requests']} failures={s['failures']} rps={s['rps']} "
            f"p50={s['p50_ms']}ms p95={s['p95_ms']}ms p99={s['p99_ms']}ms"
        )
        if "soak" in s:
            soak = s["soak"]
            print(f"  soak: p99 first/last window {soak['p99_first_window_ms']}/{soak['p99_last_window_ms']} ms, RSS MB {soak['rss_mb']}")
        if "fault" in s:
            f = s["fault"]
            print(
                f"  fault: restarts={f['restarts']} acked_ids={f['acked_ids']} missing_ids={f['missing_ids']} "
                f"errors={f['error_codes']} time_to_recovery_s={f['time_to_recovery_s']}"
            )
    return 0
