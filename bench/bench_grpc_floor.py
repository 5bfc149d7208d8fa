"""The gRPC floor of this machine: what a Python gRPC call costs around a handler of a given length.

    .venv/bin/python bench/bench_grpc_floor.py [--work-ms 0.05 1 2.5 4.5 10] [--output reports/bench-grpc-floor.json]

A server process with no model at all (grpc.aio, or grpc.server with a thread pool) answers
one method whose handler keeps the CPU busy for `work_ms` and returns a 12 KB reply (the size of
a caption's response); a blocking client in this process calls it sequentially. For each
setting: client latency p50, handler time p50, and the gRPC share 1 - handler / client, the
same definition as `grpc_overhead_fraction_batch1` in `reports/bench-encoder.json`. The
encoder service cannot do better than this floor at the same handler time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "floor.Floor"
handler_seconds: list[float] = []


def busy(work_ms: float) -> None:
    """Keep one core busy for `work_ms` (pure Python: no extra threads, like an inline model run)."""
    end = time.perf_counter() + work_ms / 1000
    while time.perf_counter() < end:
        pass


def make_handlers(kind: str, reply: bytes):
    def handle(request: bytes) -> bytes:
        started = time.perf_counter()
        busy(float(request.decode()))
        handler_seconds.append(time.perf_counter() - started)
        return reply

    def drain() -> bytes:
        out = json.dumps(handler_seconds).encode()
        handler_seconds.clear()
        return out

    if kind == "aio":

        async def call(request, context):
            return handle(request)

        async def stats(request, context):
            return drain()
    else:

        def call(request, context):
            return handle(request)

        def stats(request, context):
            return drain()

    methods = {"Call": grpc.unary_unary_rpc_method_handler(call), "Stats": grpc.unary_unary_rpc_method_handler(stats)}
    return [grpc.method_handlers_generic_handler(SERVICE, methods)]


def serve(kind: str, reply_bytes: int) -> None:
    reply = b"\0" * reply_bytes
    if kind == "aio":

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(make_handlers(kind, reply))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(port, flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers(make_handlers(kind, reply))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        server.wait_for_termination()


def measure(kind: str, work_ms: list[float], calls: int, reply_bytes: int) -> list[dict]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--reply-bytes", str(reply_bytes)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(process.stdout.readline())
        rows = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call, stats = channel.unary_unary(f"/{SERVICE}/Call"), channel.unary_unary(f"/{SERVICE}/Stats")
            for work in work_ms:
                request = str(work).encode()
                for _ in range(20):  # warm the connection and both processes
                    call(request)
                stats(b"")
                latencies = []
                for _ in range(calls):
                    started = time.perf_counter()
                    call(request)
                    latencies.append(time.perf_counter() - started)
                handler = statistics.median(json.loads(stats(b"")))
                client = statistics.median(latencies)
                rows.append(
                    {
                        "server": kind,
                        "work_ms": work,
                        "calls": calls,
                        "client_p50_ms": round(client * 1000, 3),
                        "handler_p50_ms": round(handler * 1000, 3),
                        "grpc_ms": round((client - handler) * 1000, 3),
                        "grpc_share": round(1 - handler / client, 4),
                    }
                )
                print(
                    f"  {kind:4s} handler {work:5.2f} ms: client p50 {client * 1000:.3f} ms, gRPC {(client - handler) * 1000:.3f} ms "
                    f"({1 - handler / client:.1%})",
                    file=sys.stderr,
                )
        return rows
    finally:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-ms", type=float, nargs="+", default=[0.05, 1.0, 2.5, 4.5, 10.0], help="handler times to measure")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per setting")
    parser.add_argument("--reply-bytes", type=int, default=12_000, help="reply size (a caption's response is about 12 KB)")
    parser.add_argument("--servers", nargs="+", choices=["aio", "sync"], default=["aio", "sync"])
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench-grpc-floor.json")
    parser.add_argument("--serve", choices=["aio", "sync"], help=argparse.SUPPRESS)  # internal: the server process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.reply_bytes)
        return 0
    rows = []
    for kind in args.servers:
        print(f"{kind} server ...", file=sys.stderr)
        rows += measure(kind, args.work_ms, args.calls, args.reply_bytes)
    report = {
        "command": "python bench/bench_grpc_floor.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "reply_bytes": args.reply_bytes,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
