"""`python -m search_service --milvus-uri URI --encoder-address HOST:PORT`: serve search over gRPC (see --help).

Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 bad configuration, 1 any other startup
failure (e.g. Milvus unreachable).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from search_service.config import from_args
from search_service.logs import get_logger, setup_logging
from teran.errors import TeranInputError


async def serve(config) -> int:
    from search_service.server import SearchServer

    log = get_logger()
    server = SearchServer(config)
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
    await server.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = from_args(argv)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    log = get_logger()
    try:
        return asyncio.run(serve(config))
    except TeranInputError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - Milvus unreachable, port taken, ...
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
