"""Run a service's asyncio server in a background thread, on its own event loop (tests, benchmarks,
embedding a service in another program).

The server is either service's server object: `await start(**start_kwargs)`, `await stop(grace)`,
`await wait()`, `port`, `metrics_port`, and a `listening` threading.Event set once its port is open.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any


class ServerThread:
    """The constructor returns once the server has started (`wait="ready"`) or once its port is open
    (`wait="listening"`; then call `wait_ready()`). A failed start is raised in the calling thread."""

    def __init__(self, server: Any, *, start_kwargs: dict | None = None, wait: str = "ready", timeout: float = 120.0, name: str = "server"):
        self.server = server
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(start_kwargs or {},), name=name, daemon=True)
        self._thread.start()
        if wait == "listening":
            end = time.monotonic() + timeout
            while not self.server.listening.wait(0.01) and not self._ready.is_set():
                if time.monotonic() > end:
                    raise TimeoutError(f"{name} did not open its port in time")
            self._raise_error()
        else:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start in time")
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            self._thread.join(10)
            raise self._error

    def _run(self, start_kwargs: dict) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            try:
                await self.server.start(**start_kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc
                self._ready.set()
                await self.server.stop(0)
                return
            self._ready.set()
            await self.server.wait()

        self.loop.run_until_complete(main())
        self.loop.close()

    @property
    def port(self) -> int:
        if self.server.port is None:
            raise RuntimeError(f"{self.name} is not listening")
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float | None = 60.0):
        """Run a coroutine on the server's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=None if grace is None else grace + 30)
            self._thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
