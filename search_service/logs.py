"""Structured logging for the search service (same formats as the encoder's; see serving.logs)."""

from __future__ import annotations

from serving.logs import ServiceLogging

__all__ = ["LOGGER_NAME", "LOGGING", "get_logger", "setup_logging"]

LOGGER_NAME = "search_service"
# pymilvus installs plain-text handlers on these loggers when imported: its records (e.g. a failed
# call's error) go through the service's JSON handler instead, one record per failure.
LOGGING = ServiceLogging(LOGGER_NAME, adopted=("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"), import_first="pymilvus")
setup_logging = LOGGING.setup_logging
get_logger = LOGGING.get_logger
