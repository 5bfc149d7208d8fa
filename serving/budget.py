"""A bound on the request bytes a service holds in flight (received, not yet answered).

Bytes are taken before a request message is read, so a waiting request costs nothing but its
HTTP/2 window: flow control holds the sender back instead of the server buffering its messages.
Unary calls wait a bounded time (`take_within`) and are then refused (RESOURCE_EXHAUSTED: the
client backs off); stream messages wait (`take`). Used from one event loop; `release` is
synchronous so that cleanup paths (cancellation) can always run it.
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

    async def take_within(self, size: int, seconds: float) -> bool:
        """Take `size` bytes once they fit, waiting at most `seconds`; False if they did not fit in time."""
        if self.try_take(size):
            return True
        try:
            await asyncio.wait_for(self.take(size), seconds)
        except TimeoutError:
            return False
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
