"""Structured logging for the search service (same formats as the encoder's; see serving.logs)."""

from __future__ import annotations

import logging

from serving.logs import ServiceLogging

__all__ = ["LOGGER_NAME", "LOGGING", "MilvusCallErrors", "get_logger", "setup_logging"]

LOGGER_NAME = "search_service"


class MilvusCallErrors(logging.Filter):
    """pymilvus logs every failed call at ERROR, with a traceback of its own frames inside the message,
    and then raises the error to the store. The store either handles it (a client's bad filter becomes
    INVALID_ARGUMENT; a released collection is loaded) or turns it into an error that the service logs
    itself with Milvus's text. So these records are duplicates, and for a client's bad input, false
    alarms: they are cut to their first part (call, Milvus's error, time) and kept at DEBUG."""

    _TRACEBACK = "\nTraceback:\n"  # how pymilvus.decorators appends the traceback to its message

    def __init__(self, service_logger: str):
        super().__init__()
        self.service_logger = service_logger

    def filter(self, record: logging.LogRecord) -> bool:
        head, cut, _ = record.getMessage().partition(self._TRACEBACK)
        if not cut:
            return True
        record.msg, record.args = head, ()
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(self.service_logger).isEnabledFor(logging.DEBUG)


# pymilvus installs plain-text handlers on its loggers when imported, and milvus-lite's (the embedded
# Milvus of file URIs) reach the root logger's last-resort plain-text handler: their records (e.g. a
# failed call's error) go through the service's JSON handler instead, one record per failure.
LOGGING = ServiceLogging(
    LOGGER_NAME,
    adopted=("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer", "milvus_lite"),
    import_first="pymilvus",
    filters=(("pymilvus.decorators", MilvusCallErrors(LOGGER_NAME)),),
)
setup_logging = LOGGING.setup_logging
get_logger = LOGGING.get_logger
