"""Unit tests of the shared serving package (settings, logging, runner exit codes)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pytest

from serving.logs import ServiceLogging
from serving.runner import run
from serving.settings import ConfigError, Settings
from teran.errors import TeranInputError


@dataclass
class _Config:
    port: int = 1
    name: str = ""
    secret: str = "hidden"
    flag: bool = False
    auth_tokens: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    log_format: str = "json"

    def validate(self) -> _Config:
        if self.port < 0:
            raise ConfigError("--port: must be >= 0")
        return self


_TABLE = [
    ("port", "int", "the port"),
    ("name", "str", "a name"),
    ("secret", "str", "a secret"),
    ("flag", "bool", "a switch"),
    ("auth_token", "csv", "tokens"),
    ("auth_token_file", "path", "token file"),
]
SETTINGS = Settings(_TABLE, "T_", _Config, prog="t", description="d", hidden_defaults={"secret"}, hide_empty_defaults=True)


def test_settings_precedence_conversion_and_errors(tmp_path):
    assert SETTINGS.from_args([], {}).port == 1
    assert SETTINGS.from_args([], {"T_PORT": "5"}).port == 5
    assert SETTINGS.from_args(["--port", "7"], {"T_PORT": "5"}).port == 7
    assert SETTINGS.from_args(["--flag"], {}).flag is True
    with pytest.raises(ConfigError, match=r"T_PORT: invalid int value 'x'"):
        SETTINGS.from_args([], {"T_PORT": "x"})
    with pytest.raises(ConfigError, match="must be >= 0"):
        SETTINGS.from_args(["--port", "-1"], {})
    token_file = tmp_path / "tokens"
    token_file.write_text("c\n\n d \n")
    config = SETTINGS.from_args(["--auth-token", "a,b", "--auth-token-file", str(token_file)], {})
    assert config.auth_tokens == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="cannot read"):
        SETTINGS.from_args([], {"T_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    assert issubclass(ConfigError, TeranInputError)


def test_settings_help_lists_env_and_defaults():
    text = SETTINGS.build_parser().format_help()
    assert "[env T_PORT] (default: 1)" in text
    assert "hidden" not in text and "[env T_NAME]\n" in text.replace("  ", "")


def test_service_logging_json():
    logs = ServiceLogging("serving_test")
    stream = io.StringIO()
    logs.setup_logging("info", "json", stream)
    logs.get_logger("child").info("hello", extra={"k": 1})
    entry = json.loads(stream.getvalue())
    assert entry["msg"] == "hello" and entry["k"] == 1 and entry["logger"] == "serving_test.child"


def test_search_logging_takes_over_the_pymilvus_loggers():
    """pymilvus configures plain-text handlers on import; the search service's logging routes its records
    through the JSON handler: one JSON line per record, even for a multi-line message with a traceback."""
    import logging

    from search_service.logs import LOGGING

    names = (LOGGING.logger_name, *LOGGING.adopted)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names}
    stream = io.StringIO()
    LOGGING.setup_logging("info", "json", stream)
    try:
        try:
            raise RuntimeError("<MilvusException: (code=101, message=collection not loaded)>")
        except RuntimeError:
            logging.getLogger("pymilvus.decorators").error("RPC error: [search]\nsecond line", exc_info=True)
        logging.getLogger("pymilvus.milvus_client").warning("from the client")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2
        first, second = (json.loads(line) for line in lines)
        assert first["logger"] == "pymilvus.decorators" and first["msg"] == "RPC error: [search]\nsecond line"
        assert "collection not loaded" in first["exc"] and second["logger"] == "pymilvus.milvus_client"
    finally:  # as they were, for the tests that follow
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)


class _Server:
    def __init__(self, error: BaseException | None):
        self.error = error
        self.stopping = False

    async def start(self) -> None:
        if self.error:
            raise self.error

    async def stop(self, grace=None) -> None:
        self.stopping = True

    async def wait(self) -> None:
        return None


@pytest.mark.parametrize(
    ("error", "code"), [(None, 0), (TeranInputError("bad model"), 2), (OSError("port taken"), 1), (RuntimeError("x"), 3)]
)
def test_runner_exit_codes(error, code):
    logs = ServiceLogging("serving_test_runner")
    result = run(
        [],
        load_config=lambda argv: _Config(),
        make_server=lambda config: _Server(error),
        logs=logs,
        startup_errors=((TeranInputError, 2), (OSError, 1), (Exception, 3)),
    )
    assert result == code


def test_runner_config_error(capsys):
    def load(argv):
        raise ConfigError("--port: nope")

    assert run([], load_config=load, make_server=None, logs=ServiceLogging("x"), startup_errors=()) == 2
    assert "error: --port: nope" in capsys.readouterr().err
