"""The `python -m <service>` run loop: config, logging, server start, signal handling, exit codes.

Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 bad configuration (the config loader
raised TeranInputError: printed to stderr), otherwise as mapped by `startup_errors`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Callable, Sequence

from serving.logs import ServiceLogging
from teran.errors import TeranInputError


async def serve(server, log) -> int:
    """Start `server` (start/stop/wait/stopping), stop it on SIGTERM / SIGINT, return 0 once stopped."""
    loop = asyncio.get_running_loop()
    stop_task: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        if not stop_task:
            stop_task.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
    except BaseException:
        if not server.stopping:
            await server.stop(0)
        raise
    freeze_startup_heap()
    await server.wait()
    return 0


def freeze_startup_heap() -> None:
    """Once the server is up, move every object then alive (modules, the model, clients, caches: about 115,000 in
    the search service) to the collector's permanent generation. A full collection walks every tracked object and
    holds the GIL while it does: with the startup heap in it, one took 55-125 ms in the search service process,
    pausing whichever requests it fell in (the latency tail); afterwards it walks only what requests left behind.
    Frozen objects are still freed when their last reference goes, only cycles among them are never collected: the
    startup heap lives as long as the process anyway."""
    gc.collect()
    gc.freeze()


MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB (what MALLOC_MMAP_THRESHOLD_ does): by default it rises
    after large blocks are freed, after which multi-megabyte request buffers come from the heap and
    stay in the process after the load is gone (measured on the encoder after a burst of 22 MB
    messages: about 2.9 GB idle, about 2 GB with the fixed threshold; bench/bench_reliability.py)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD_BYTES)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def run(
    argv: list[str] | None,
    *,
    load_config: Callable,
    make_server: Callable,
    logs: ServiceLogging,
    startup_errors: Sequence[tuple[type[BaseException], int]],
) -> int:
    """Parse the config, set up logging, serve until signalled; return the process exit code.

    load_config(argv) -> config; make_server(config) -> server (import the server module there so
    `--help` stays light). startup_errors: (exception type, exit code) pairs tried in order for
    failures while starting, each logged as "cannot start: ...".
    """
    try:
        config = load_config(argv)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.setup_logging(config.log_level, config.log_format)
    log = logs.get_logger()
    return_large_blocks_to_the_os()

    async def main() -> int:
        return await serve(make_server(config), log)

    try:
        return asyncio.run(main())
    except BaseException as exc:
        for kind, code in startup_errors:
            if isinstance(exc, kind):
                log.error("cannot start: %s", exc)
                return code
        raise
