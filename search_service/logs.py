"""Structured logging for the search service (same formats as the encoder's; see serving.logs)."""

from __future__ import annotations

from serving.logs import ServiceLogging

__all__ = ["LOGGER_NAME", "LOGGING", "get_logger", "setup_logging"]

LOGGER_NAME = "search_service"
LOGGING = ServiceLogging(LOGGER_NAME)
setup_logging = LOGGING.setup_logging
get_logger = LOGGING.get_logger
