"""Structured logging for the search service (same formats as the encoder's)."""

from __future__ import annotations

import logging
import sys

from encoder_service.logs import JsonFormatter, TextFormatter

LOGGER_NAME = "search_service"


def setup_logging(level: str = "INFO", fmt: str = "json", stream=None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
