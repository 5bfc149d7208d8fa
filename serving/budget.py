"""A bound on the request bytes a service holds in flight (received, not yet answered).

Unary calls `try_take` and are refused past the limit (RESOURCE_EXHAUSTED: the client backs off);
stream messages `take`, which waits: the stream stops reading until bytes are released, so HTTP/2
flow control holds the sender back instead of the server buffering its messages. Used from one
event loop; `release` is synchronous so that cleanup paths (cancellation) can always run it.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """`gauge` (optional, a prometheus Gauge) follows `used`."""

    def __init__(self, limit: int, gauge=None):
        self.limit = limit
        self.used = 0
        self._gauge = gauge
        self._waiters: list[asyncio.Future] = []

    def _add(self, size: int) -> None:
        self.used += size
        if self._gauge is not None:
            self._gauge.set(self.used)

    def try_take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self._add(size)
        return True

    async def take(self, size: int) -> None:
        """Wait until `size` bytes fit, then hold them (callers refuse size > limit first)."""
        while self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._add(size)

    def release(self, size: int) -> None:
        self._add(-size)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each re-checks whether it fits now
            if not waiter.done():
                waiter.set_result(None)
