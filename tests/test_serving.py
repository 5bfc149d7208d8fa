"""Unit tests of the shared serving package (settings, logging, runner exit codes)."""

from __future__ import annotations

import gc
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.logs import ServiceLogging
from serving.runner import run
from serving.settings import ConfigError, ServiceSettings, Settings, setting
from teran.errors import TeranInputError


@dataclass
class _Config(ServiceSettings):
    name: str = setting("", "a name")
    secret: str = setting("hidden", "a secret", secret=True)
    flag: bool = setting(False, "a switch")
    buckets: list[int] = setting([8, 16], "edges")
    options: dict = setting({}, "a JSON object")
    model_dir: Path | None = setting(None, "a directory", required=True)
    port: int = 1  # the common setting, with this config's default

    def validate(self) -> _Config:
        if self.port < 0:
            raise ConfigError("--port: must be >= 0")
        return self


SETTINGS = Settings("T_", _Config, prog="t", description="d")


def test_settings_precedence_conversion_and_errors(tmp_path):
    assert SETTINGS.from_args([], {}).port == 1
    assert SETTINGS.from_args([], {"T_PORT": "5"}).port == 5
    assert SETTINGS.from_args(["--port", "7"], {"T_PORT": "5"}).port == 7
    assert SETTINGS.from_args(["--flag"], {}).flag is True
    assert SETTINGS.from_args([], {"T_FLAG": "yes"}).flag is True
    config = SETTINGS.from_args(["--buckets", "4,32", "--options", '{"a": 1}', "--model-dir", "m"], {})
    assert (config.buckets, config.options, config.model_dir) == ([4, 32], {"a": 1}, Path("m"))
    assert _Config().buckets is not _Config().buckets  # list defaults are not shared
    with pytest.raises(ConfigError, match=r"T_PORT: invalid int value 'x'"):
        SETTINGS.from_args([], {"T_PORT": "x"})
    with pytest.raises(ConfigError, match=r"--options: invalid json value '\[\]'"):
        SETTINGS.from_args(["--options", "[]"], {})
    with pytest.raises(ConfigError, match="must be >= 0"):
        SETTINGS.from_args(["--port", "-1"], {})
    token_file = tmp_path / "tokens"
    token_file.write_text("c\n\n d \n")
    config = SETTINGS.from_args(["--auth-token", "a,b", "--auth-token-file", str(token_file)], {})
    assert config.auth_tokens == ["a", "b", "c", "d"]
    assert SETTINGS.from_args([], {"T_AUTH_TOKEN_FILE": str(token_file)}).auth_tokens == ["c", "d"]
    assert SETTINGS.from_args(["--auth-token-file", ""], {"T_AUTH_TOKEN": "a"}).auth_tokens == ["a"]
    with pytest.raises(ConfigError, match="T_AUTH_TOKEN_FILE: cannot read"):
        SETTINGS.from_args([], {"T_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    assert issubclass(ConfigError, TeranInputError)


def test_settings_help_lists_env_and_defaults():
    text = " ".join(SETTINGS.build_parser().format_help().split())
    assert "listen port (0: any free port; the chosen one is logged) [env T_PORT] (default: 1)" in text
    assert "--buckets N,N edges [env T_BUCKETS] (default: 8,16)" in text
    assert "a directory [env T_MODEL_DIR] (required)" in text
    assert "--auth-token-file PATH file holding the bearer token(s)" in text
    assert "hidden" not in text and "a name [env T_NAME] --secret" in text
    # the config's own settings come first, then the common ones: an endpoint's, then a gRPC service's
    flags = [action.option_strings[0] for action in SETTINGS.build_parser()._actions[1:]]
    assert flags[:3] == ["--name", "--secret", "--flag"] and flags.index("--model-dir") < flags.index("--host") < flags.index("--port")
    assert flags.index("--access-log") < flags.index("--metrics-host") < flags.index("--max-request-id-chars") == len(flags) - 1


def test_settings_need_a_kind_for_other_types():
    @dataclass
    class Odd:
        ratio: complex = setting(1j, "a complex number")

    with pytest.raises(TypeError, match=r"Odd.ratio: no kind for type <class 'complex'>"):
        Settings("T_", Odd, prog="t", description="d").build_parser()

    @dataclass
    class Named:
        ratio: complex = setting(1j, "a complex number", kind="str")

    assert [(o.name, o.kind) for o in Settings("T_", Named, prog="t", description="d").options()] == [("ratio", "str")]


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


@pytest.fixture
def thawed_afterwards():
    """run() freezes the heap once the server is up; this process's heap goes back to the collector afterwards."""
    yield
    gc.unfreeze()


@pytest.mark.parametrize(
    ("error", "code"), [(None, 0), (TeranInputError("bad model"), 2), (OSError("port taken"), 1), (RuntimeError("x"), 3)]
)
def test_runner_exit_codes(error, code, thawed_afterwards):
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


def test_runner_freezes_the_startup_heap_once_the_server_is_up(thawed_afterwards):
    frozen = {}

    class Server(_Server):
        async def start(self) -> None:
            frozen["at_start"] = gc.get_freeze_count()

        async def wait(self) -> None:  # serving
            frozen["serving"] = gc.get_freeze_count()

    gc.unfreeze()
    assert run([], load_config=lambda argv: _Config(), make_server=lambda c: Server(None), logs=ServiceLogging("t"), startup_errors=()) == 0
    assert frozen["at_start"] == 0
    assert frozen["serving"] > 1000  # the modules, the config, the server: everything alive once it started
