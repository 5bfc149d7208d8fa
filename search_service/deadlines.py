"""Milvus calls bounded by the deadline of the request they serve.

pymilvus waits up to `--milvus-timeout-s` per call (and retries inside it). Without a bound from the
request, a call whose client already gave up keeps a Milvus worker for that long: while Milvus is
down every worker ends up waiting for requests nobody awaits any more, and once Milvus is back,
fresh reads queue behind them. The service runs each Milvus job with `within(deadline, ...)`, and
`DeadlineBoundClient` cuts the timeout of every call made meanwhile to what is left of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

_local = threading.local()

# MilvusClient methods that talk to the server and take `timeout=` (the others pass through as they are).
BOUNDED_METHODS = frozenset(
    {
        "create_collection",
        "delete",
        "describe_collection",
        "drop_collection",
        "flush",
        "get_load_state",
        "get_server_version",
        "has_collection",
        "insert",
        "list_collections",
        "load_collection",
        "query",
        "release_collection",
        "search",
        "upsert",
    }
)


class DeadlinePassed(Exception):
    """The request's deadline passed before a Milvus call could start."""


def within(deadline: float | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` (in a Milvus worker thread) with its Milvus calls bounded by `deadline`
    (time.monotonic(); None: no bound beyond each call's own timeout)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlinePassed("the request's deadline passed while it waited for a Milvus worker")
    previous, _local.deadline = getattr(_local, "deadline", None), deadline
    try:
        return fn(*args)
    finally:
        _local.deadline = previous


class DeadlineBoundClient:
    """A MilvusClient whose server calls get `timeout=min(own timeout, time left before the deadline)`."""

    def __init__(self, client: Any, timeout: float):
        self._client = client
        self._timeout = timeout

    def _call_timeout(self) -> float:
        deadline = getattr(_local, "deadline", None)
        if deadline is None:
            return self._timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed("the request's deadline passed before this Milvus call")
        return min(self._timeout, left)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in BOUNDED_METHODS:
            return attribute

        def bounded(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self._call_timeout())
            return attribute(*args, **kwargs)

        return bounded
