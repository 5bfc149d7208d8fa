"""Structured logging: one JSON object per line on stderr (or plain text); see serving.logs."""

from __future__ import annotations

from serving.logs import JsonFormatter, ServiceLogging, TextFormatter

__all__ = ["LOGGER_NAME", "LOGGING", "JsonFormatter", "TextFormatter", "get_logger", "setup_logging"]

LOGGER_NAME = "encoder_service"
LOGGING = ServiceLogging(LOGGER_NAME)
setup_logging = LOGGING.setup_logging
get_logger = LOGGING.get_logger
