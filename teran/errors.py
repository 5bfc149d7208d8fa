"""Errors raised for bad user input: each names the file or field and what was wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TeranInputError(ValueError):
    """Bad input given by a user (file, caption, tensor): the message says what and why."""


class ImageDecodeError(TeranInputError):
    """An image file or buffer is missing, unreadable, corrupt or too large."""


class CaptionError(TeranInputError):
    """A caption is empty or longer than the configured limit."""


class FeatureShapeError(TeranInputError):
    """Region features or boxes have the wrong shape, dtype or non-finite values."""


class CheckpointError(TeranInputError):
    """A checkpoint file is missing, unreadable, or holds another model."""


def run_tool(work: Callable[[], None]) -> int:
    """The exit code of a command-line tool that runs `work()`: 0 when it returns, 2 after bad input
    (TeranInputError), 1 after any other failure (e.g. a service unreachable); the message goes to stderr."""
    try:
        work()
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a tool reports any failure as its exit code
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
