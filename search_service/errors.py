"""What the Searcher raises when it refuses or cannot serve a request. Each text is for the client;
the gRPC servicer maps each type to its status code (search_service.server.classify)."""

from __future__ import annotations

from teran.errors import TeranInputError


class InvalidRequest(TeranInputError):
    """The request itself is wrong (INVALID_ARGUMENT): retrying it unchanged fails the same way."""


class PreconditionFailed(Exception):
    """The service or its collections are not in a state to serve this request (FAILED_PRECONDITION)."""


class Unavailable(Exception):
    """Not now: the service is starting or stopping, or a dependency failed; retry (UNAVAILABLE)."""


class Overloaded(Exception):
    """A dependency refused for load (RESOURCE_EXHAUSTED); retry with backoff."""
