"""Failed Milvus calls as the store's errors: `milvus_call` wraps a block of pymilvus calls and turns
whatever it raises into StoreError (UNAVAILABLE) or a subtype, the message saying what failed, then
Milvus's own text. The calls are bounded by the request's deadline meanwhile (DeadlineBoundClient in
search_service.deadlines): a deadline passing during the block fails it like any other Milvus failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StoreError(Exception):
    """Milvus failed or cannot be reached (UNAVAILABLE; the caller may retry)."""


class WriteFailed(StoreError):
    """An upsert failed after `stored` of its rows (the first ones, in order) were acknowledged.
    `permanent`: Milvus refused the data itself (retrying the same rows fails the same way)."""

    def __init__(self, message: str, stored: int, permanent: bool):
        super().__init__(message)
        self.stored = stored
        self.permanent = permanent


def _store_error(message: str, cause: Exception) -> StoreError:
    return StoreError(message)


@contextmanager
def milvus_call(
    failure: str,
    *,
    error: Callable[[str, Exception], StoreError] = _store_error,
    passing: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Run a block of Milvus calls: an exception it raises becomes `error(f"{failure}: {exception}", exception)`
    (a StoreError by default), chained to it; exceptions of the types `passing` propagate unchanged."""
    try:
        yield
    except passing:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the calls raise: pymilvus, grpc, a passed deadline
        raise error(f"{failure}: {exc}", exc) from exc


def is_not_loaded(exc: Exception) -> bool:
    """Milvus says the collection is not in memory (error code 101: released, e.g. after a restart)."""
    return getattr(exc, "code", None) == 101 or "not loaded" in str(exc).lower()


def refuses_data(exc: Exception) -> bool:
    """Milvus refused the rows themselves (e.g. a value its schema cannot hold): the same rows fail again."""
    from pymilvus.exceptions import DataNotMatchException, DataTypeNotMatchException, ParamError

    return isinstance(exc, DataNotMatchException | DataTypeNotMatchException | ParamError)
