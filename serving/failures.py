"""Backend failures told to clients without internals: what failed and an error id; the cause goes to the log."""

from __future__ import annotations

import logging
import uuid


def hide_cause(public: str, cause: object, log: logging.Logger) -> str:
    """What a client is told of a backend failure: `public` and an error id. The cause (a backend's
    exception text, internal addresses) goes only to the service log, under the same id."""
    error_id = uuid.uuid4().hex[:12]
    log.warning("backend failure %s: %s", error_id, public, extra={"error_id": error_id, "cause": str(cause)})
    return f"{public} [error id {error_id}: the cause is in the service log]"


def without_cause(exc: BaseException) -> str:
    """The text of an exception raised as `Wrapper(f"...: {cause}") from cause`, minus the cause's own text."""
    text, cause = str(exc), exc.__cause__
    if cause is not None and str(cause):
        text = text.replace(str(cause), "").replace("  ", " ").rstrip(" :").replace(": ;", ";").replace(":;", ";")
    return text
