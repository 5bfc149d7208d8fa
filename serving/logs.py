"""Structured logging: one JSON object per line on stderr (or plain text), one logger tree per service."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
        text = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class ServiceLogging:
    """The logger tree of one service, named `logger_name` (e.g. "encoder_service").

    `adopted`: loggers of libraries that install their own plain-text handlers (pymilvus does, at
    import): setup_logging imports `import_first` and then gives those loggers the service's handler,
    so their records come out in the service's format, one record per line. `filters`: (logger name,
    filter) pairs, each filter added to its logger by setup_logging (e.g. to reword a library's records)."""

    def __init__(
        self,
        logger_name: str,
        adopted: tuple[str, ...] = (),
        import_first: str = "",
        filters: tuple[tuple[str, logging.Filter], ...] = (),
    ):
        self.logger_name = logger_name
        self.adopted = adopted
        self.import_first = import_first
        self.filters = filters

    def setup_logging(self, level: str = "INFO", fmt: str = "json", stream=None) -> logging.Logger:
        """Configure the service logger (not the root logger, so embedding apps keep theirs)."""
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        logger = logging.getLogger(self.logger_name)
        logger.setLevel(level.upper())
        if self.import_first:
            importlib.import_module(self.import_first)  # it configures its loggers when imported: before we do
        for target in (logger, *(logging.getLogger(name) for name in self.adopted)):
            for old in list(target.handlers):
                target.removeHandler(old)
            target.addHandler(handler)
            target.propagate = False
        for name, record_filter in self.filters:
            logging.getLogger(name).addFilter(record_filter)  # once: addFilter skips a filter already there
        return logger

    def get_logger(self, name: str = "") -> logging.Logger:
        return logging.getLogger(f"{self.logger_name}.{name}" if name else self.logger_name)
