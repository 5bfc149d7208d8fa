"""Server-side dynamic batching on asyncio.

Concurrent requests put their items into one queue per graph; worker tasks take up to
`max_batch` items (waiting at most `max_delay_s` after the oldest item for more to arrive),
run them as one batch in a thread (ONNX Runtime / tritonclient release the GIL) and hand each
item its row of the result. Items carry a bucket key (caption length bucket, region count
bucket): a batch never mixes buckets, so short captions are not padded to long ones. The queue
is bounded: `submit` raises Overloaded when it is full. Items whose deadline has passed, or
whose caller went away, are dropped before they run. With `active_calls` (the RPCs in flight)
a batch does not wait for more items when every call in flight has already queued its items,
and a call that finds the batcher idle (nothing queued, no batch of this graph running, no other
call in flight) runs its items at once from `submit`, without the queue / worker-task hop.
`workers` bounds the batches of one graph running at a time, the fast path included. With
`inline_idle` that fast path runs on the event loop thread itself, saving the two thread
wake-ups of the hand-off to the executor and back (about half a millisecond on a small CPU);
meant for cheap graphs, since nothing else runs on the loop meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from encoder_service.metrics import Metrics

INLINE_SETTLE_TURNS = 3


class Overloaded(Exception):
    """The batch queue is full (maps to RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The item's deadline passed before its batch ran (maps to DEADLINE_EXCEEDED)."""


@dataclass
class _Item:
    payload: Any
    bucket: Hashable
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() value


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    sizes: list[int] = field(default_factory=list)
    immediate: int = 0  # batches started by the idle fast path (no queueing)


class DynamicBatcher:
    """`run_batch(payloads) -> results` (a plain function, run in `executor`) behind a queue."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        executor: Executor,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        workers: int = 1,
        metrics: Metrics | None = None,
        active_calls: Callable[[], int] | None = None,
        inline_idle: bool = False,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch, max_queue and workers must be >= 1")
        self.name = name
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.workers = workers
        self.metrics = metrics
        self.active_calls = active_calls
        self.inline_idle = inline_idle
        self.stats = BatcherStats()
        self._waiting_calls = 0  # submit() calls with items queued or running
        self._buckets: dict[Hashable, deque[_Item]] = {}
        self._pending = 0
        self._running = 0  # batches of this graph running now (workers and the idle fast path)
        self._wakeup = asyncio.Event()  # bound to a loop at first use; start() makes a fresh one
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-{self.name}-{i}") for i in range(self.workers)]

    async def close(self) -> None:
        """Stop taking items, run what is queued, then stop the workers."""
        self._closed = True
        while self._pending and self._tasks and not all(t.done() for t in self._tasks):
            self._wakeup.set()
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(RuntimeError(f"{self.name}: batcher closed"))

    @property
    def depth(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ submitting

    async def submit(self, payloads: Sequence[Any], buckets: Sequence[Hashable] | None = None, deadline: float | None = None) -> list[Any]:
        """Queue `payloads` (all or none) and wait for their results, in order."""
        if self._closed or not self._tasks:
            raise Overloaded(f"{self.name}: the server is shutting down")
        if self._pending + len(payloads) > self.max_queue:
            if self.metrics:
                self.metrics.rejected.labels(self.name).inc(len(payloads))
            raise Overloaded(
                f"server overloaded: {self._pending} items queued for {self.name}, {len(payloads)} more would exceed "
                f"the queue limit of {self.max_queue} (--max-queue); retry with backoff"
            )
        if self.inline_idle and self._idle_for(payloads, buckets):
            # An inline run blocks the loop, so RPCs that arrived meanwhile have not reached their
            # handlers yet and the batcher would look idle to each of them in turn (no batching
            # ever). A few loop turns let those handlers start and count as active calls first.
            for _ in range(INLINE_SETTLE_TURNS):
                await asyncio.sleep(0)
        if self._idle_for(payloads, buckets):
            return await self._run_now(list(payloads), deadline)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = []
        for index, payload in enumerate(payloads):
            bucket = buckets[index] if buckets is not None else 0
            item = _Item(payload, bucket, loop.create_future(), now, deadline)
            self._buckets.setdefault(bucket, deque()).append(item)
            items.append(item)
        self._pending += len(items)
        self._waiting_calls += 1
        self._update_depth()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            for item in items:  # caller gone or one item failed: do not run the rest
                if not item.future.done():
                    item.future.cancel()
            raise
        finally:
            self._waiting_calls -= 1

    def _idle_for(self, payloads: Sequence[Any], buckets: Sequence[Hashable] | None) -> bool:
        """True when `payloads` can run as one batch right now: nothing queued, no batch of this
        graph running, no other call in flight that could add items, one bucket, <= max_batch."""
        if self._pending or self._running >= self.workers or self.active_calls is None or not payloads:
            return False
        if len(payloads) > self.max_batch or self.active_calls() > self._waiting_calls + 1:
            return False
        return buckets is None or all(b == buckets[0] for b in buckets)

    async def _run_now(self, payloads: list[Any], deadline: float | None) -> list[Any]:
        """The idle fast path: the same batch a worker would form (these items alone), run without queueing."""
        if deadline is not None and time.monotonic() >= deadline:
            if self.metrics:
                self.metrics.expired.labels(self.name).inc(len(payloads))
            raise DeadlineExpired(f"{self.name}: deadline passed while queued")
        self._running += 1
        self._waiting_calls += 1
        self.stats.immediate += 1
        started = time.monotonic()
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(len(payloads))
            for _ in payloads:
                self.metrics.queue_wait.labels(self.name).observe(0.0)

        def release() -> None:
            self._running -= 1
            if self.metrics:
                self.metrics.inference.labels(self.name).observe(time.monotonic() - started)
            if self._pending:  # items queued meanwhile: a worker runs them now
                self._wakeup.set()

        if self.inline_idle:
            try:
                results = self.run_batch(payloads)  # blocks the event loop for one run: see inline_idle
            finally:
                self._waiting_calls -= 1
                release()
        else:

            def finished(done: asyncio.Future) -> None:  # the run is over (not merely its caller gone): free the slot
                if not done.cancelled():
                    done.exception()  # retrieved here too, so a caller that went away leaves no "never retrieved" warning
                release()

            future = asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, payloads)
            future.add_done_callback(finished)
            try:
                results = await asyncio.shield(future)
            finally:
                self._waiting_calls -= 1
        if len(results) != len(payloads):
            raise RuntimeError(f"{self.name}: batch of {len(payloads)} items returned {len(results)} results")
        self._record(len(payloads))
        return list(results)

    def _record(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.items += size
        if len(self.stats.sizes) < 100_000:
            self.stats.sizes.append(size)

    def _more_expected(self) -> bool:
        """Could more items arrive soon? Not when every call in flight already has its items here
        (a lone request at low load runs at once instead of waiting max_delay)."""
        return self.active_calls is None or self.active_calls() > self._waiting_calls

    # ------------------------------------------------------------------ workers

    def _update_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._pending)

    def _oldest_bucket(self) -> Hashable | None:
        best, best_time = None, None
        for key, queue in self._buckets.items():
            if queue and (best_time is None or queue[0].enqueued < best_time):
                best, best_time = key, queue[0].enqueued
        return best

    def _take(self, bucket: Hashable) -> list[_Item]:
        queue = self._buckets[bucket]
        taken: list[_Item] = []
        now = time.monotonic()
        while queue and len(taken) < self.max_batch:
            item = queue.popleft()
            self._pending -= 1
            if item.future.done():  # cancelled by its caller
                if self.metrics:
                    self.metrics.expired.labels(self.name).inc()
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExpired(f"{self.name}: deadline passed while queued"))
                if self.metrics:
                    self.metrics.expired.labels(self.name).inc()
                continue
            taken.append(item)
        if not queue:
            del self._buckets[bucket]
        self._update_depth()
        return taken

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            bucket = self._oldest_bucket()
            if bucket is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._buckets[bucket][0].enqueued
            wait_until = oldest + self.max_delay_s
            while not self._closed and len(self._buckets.get(bucket, ())) < self.max_batch and self._more_expected():
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if bucket not in self._buckets:  # another worker took it
                continue
            if self._running >= self.workers:  # the idle fast path is running a batch: wait for it
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            items = self._take(bucket)
            if not items:
                continue
            started = time.monotonic()
            if self.metrics:
                self.metrics.batch_size.labels(self.name).observe(len(items))
                for item in items:
                    self.metrics.queue_wait.labels(self.name).observe(started - item.enqueued)
            self._running += 1
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [item.payload for item in items])
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: batch of {len(items)} items returned {len(results)} results")
            except asyncio.CancelledError:
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError(f"{self.name}: batcher stopped"))
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._running -= 1
                if self.metrics:
                    self.metrics.inference.labels(self.name).observe(time.monotonic() - started)
            self._record(len(items))
            for item, result in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    def _fail_all(self, exc: Exception) -> None:
        for queue in self._buckets.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(exc)
        self._buckets.clear()
        self._pending = 0
        self._update_depth()
