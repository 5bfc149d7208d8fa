"""Service settings: command-line flags, each with an environment variable, declared on the config dataclass.

Every setting is one config dataclass field made with `setting(default, help, ...)`: the field holds the
default, its metadata the help text and how flag text converts (the kind, inferred from the field's type
unless given). `Settings` turns the fields into an argparse parser (variable names and defaults in --help)
and a loader with precedence flag > environment variable > default. `EndpointSettings` declares the
settings every endpoint has, gRPC or HTTP (listener, TLS, bearer tokens, shutdown, logs, Prometheus metrics),
`ServiceSettings` adds what every gRPC service has (message and concurrency limits); a service's config inherits
them and gives one its own default by redeclaring the field with a plain value (`port: int = 50051`),
which keeps the declaration's help and kind. Validation stays with the service: the dataclass's
`validate()` is called last and returns the config.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

from teran.errors import TeranInputError

T = TypeVar("T")
MIB = 1024 * 1024
SETTING = "setting"  # the field metadata key of a setting's Declaration

# Kinds inferred from a field's type; a field of another type names its kind: setting(..., kind=...).
KIND_OF_TYPE: dict[Any, str] = {
    bool: "bool", int: "int", float: "float", str: "str", Path | None: "path", list[str]: "csv", list[int]: "csv_int", dict: "json",
}  # fmt: skip


class ConfigError(TeranInputError):
    """A setting has an invalid value: the message names the flag and its variable."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def convert(kind: str, text: str):
    """Convert a flag / variable string to a setting of `kind` (raises ValueError)."""
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "path":
        return Path(text) if text else None
    if kind == "bool":
        return parse_bool(text)
    if kind == "csv":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "csv_int":
        return [int(part) for part in text.split(",") if part.strip()]
    if kind == "json":
        value = json.loads(text) if text.strip() else {}
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    return text


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Declaration:
    """What `setting()` records in a field's metadata."""

    help: str
    kind: str | None = None
    flag: str | None = None
    required: bool = False
    secret: bool = False
    from_file: str | None = None


def setting(
    default: T,
    help: str,
    *,
    kind: str | None = None,
    flag: str | None = None,
    required: bool = False,
    secret: bool = False,
    from_file: str | None = None,
) -> T:
    """A config dataclass field that is a setting: flag --FLAG and variable PREFIX_FLAG, FLAG being the
    field name unless `flag` names another.

    kind: int, float, str, path, bool, csv, csv_int or json (see `convert`); by default from the field's type.
    required: --help says "(required)" instead of a default (the service's validate() enforces it).
    secret: --help never shows the default.
    from_file: the help of a second setting, FLAG_file, naming a file whose non-empty lines are added to
    this list setting's values (e.g. tokens in a mounted secret).
    """
    metadata = {SETTING: Declaration(help, kind, flag, required, secret, from_file)}
    if isinstance(default, (list, dict)):  # mutable: each config gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EndpointSettings:
    """The settings of every network endpoint this project serves, gRPC or HTTP: listener, TLS, bearer
    tokens, shutdown, logs, Prometheus metrics. An endpoint's config inherits them and redeclares a field
    with a plain value to give it its own default (the listener port always: each endpoint has its own)."""

    host: str = setting("0.0.0.0", "listen address")
    port: int = setting(0, "listen port (0: any free port; the chosen one is logged)")
    tls_cert: Path | None = setting(None, "PEM server certificate chain: serve TLS (with --tls-key)")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    auth_tokens: list[str] = setting(
        [],
        "bearer token(s), comma separated: every call but the health checks needs "
        "`authorization: Bearer TOKEN` (else UNAUTHENTICATED, HTTP 401). Prefer the variable or --auth-token-file",
        flag="auth_token",
        secret=True,
        from_file="file holding the bearer token(s), one per line (e.g. a mounted secret)",
    )
    # lifecycle / logs
    shutdown_grace_s: float = setting(20.0, "on SIGTERM/SIGINT: seconds in-flight calls get to finish (health turns NOT_SERVING first)")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("json", "json (one object per line) or text")
    access_log: bool = setting(False, "log every call (method, code, duration; items where the service counts them) at INFO")
    # metrics: a separate plain HTTP listener (no TLS, no token)
    metrics_host: str = setting(
        "127.0.0.1",
        "Prometheus metrics HTTP listen address; the endpoint has no auth, so loopback by default: 0.0.0.0 to let a scraper in",
    )
    metrics_port: int = setting(-1, "Prometheus metrics HTTP port (/metrics); -1 disables, 0 any free port")

    env_prefix: ClassVar[str] = ""  # of the config's variables (e.g. TERAN_SEARCH_), named in validation messages

    def require(self, condition: bool, name: str, what: str) -> None:
        """ConfigError naming setting `name`'s flag and variable, unless `condition` holds."""
        if not condition:
            raise ConfigError(f"{flag_name(name)} ({self.env_prefix}{name.upper()}): {what}")

    def check_common(self) -> None:
        """Validate the settings every endpoint shares; a config's validate() calls it first."""
        self.require(0 <= self.port <= 65535, "port", f"{self.port} is not a TCP port")
        self.require((self.tls_cert is None) == (self.tls_key is None), "tls_cert", "--tls-cert and --tls-key go together")
        self.require(
            self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca", "client certificates need --tls-cert/--tls-key"
        )
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            self.require(path is None or Path(path).is_file(), name, f"{path}: file does not exist")
        tokens_ok = all(t and not any(c.isspace() for c in t) for t in self.auth_tokens)
        self.require(tokens_ok, "auth_token", "tokens must be non-empty without spaces")
        self.require(self.shutdown_grace_s >= 0, "shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")
        self.require(self.log_format in ("json", "text"), "log_format", f"{self.log_format!r} is not one of json, text")
        self.require(-1 <= self.metrics_port <= 65535, "metrics_port", f"{self.metrics_port} is not a TCP port (-1 disables metrics)")


@dataclass
class ServiceSettings(EndpointSettings):
    """The settings every gRPC service has beyond an endpoint's: message and concurrency limits."""

    max_message_bytes: int = setting(64 * MIB, "LIMIT: largest gRPC message received or sent, bytes (larger: RESOURCE_EXHAUSTED)")
    max_concurrent_rpcs: int = setting(256, "LIMIT: RPCs served at once; more are refused with RESOURCE_EXHAUSTED")
    max_request_id_chars: int = setting(128, "LIMIT: characters of a client's request_id (longer: INVALID_ARGUMENT)")

    def check_common(self) -> None:
        super().check_common()
        self.require(self.max_message_bytes >= 64 * 1024, "max_message_bytes", f"must be >= 65536, got {self.max_message_bytes}")
        for name in ("max_concurrent_rpcs", "max_request_id_chars"):
            self.require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Option:
    """One flag / environment variable pair, filling the config field `attr`."""

    name: str
    attr: str
    kind: str
    help: str
    required: bool = False
    secret: bool = False
    from_file: bool = False  # the value names a file of values for `attr`, one per line


def _declaration(cls: type, name: str) -> tuple[int, Declaration] | None:
    """The `setting()` declaring field `name` nearest to `cls` along its MRO, with its depth there (0: cls
    itself); None for a plain field. A class that redeclares a field with a plain value has no declaration
    of it, so the base's applies."""
    for depth, klass in enumerate(cls.__mro__):
        declared = vars(klass).get("__dataclass_fields__", {}).get(name)
        if name in vars(klass).get("__annotations__", {}) and declared is not None and SETTING in declared.metadata:
            return depth, declared.metadata[SETTING]
    return None


def default_text(value) -> str | None:
    """A default as --help shows it; None for an empty one."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or None
    if isinstance(value, dict):
        return json.dumps(value) if value else None
    return None if value is None or value == "" else str(value)


def read_values(path: Path, source: str) -> list[str]:
    """The non-empty lines of a --*-file setting, stripped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {path} ({exc.strerror})") from None
    return [line.strip() for line in lines if line.strip()]


@dataclass(frozen=True)
class Settings:
    """The flags and environment variables (PREFIX_NAME) of a config dataclass's settings."""

    env_prefix: str
    config_class: type
    prog: str
    description: str

    def env_name(self, name: str) -> str:
        return self.env_prefix + name.upper()

    def options(self) -> list[Option]:
        """The settings in --help order: the class's own first, then the inherited ones (a service's
        settings before the ones every service has)."""
        declared = []
        for f in fields(self.config_class):
            found = _declaration(self.config_class, f.name)
            if found is not None:
                declared.append((found[0], f.name, found[1]))
        # the class's own, then the inherited ones from the most basic class down; stable: declaration order within a class
        declared.sort(key=lambda item: (item[0] > 0, -item[0]))
        hints = get_type_hints(self.config_class)
        options = []
        for _depth, attr, declaration in declared:
            kind = declaration.kind or KIND_OF_TYPE.get(hints[attr])
            if kind is None:
                raise TypeError(f"{self.config_class.__name__}.{attr}: no kind for type {hints[attr]}; give setting(..., kind=...)")
            name = declaration.flag or attr
            options.append(Option(name, attr, kind, declaration.help, declaration.required, declaration.secret))
            if declaration.from_file:
                options.append(Option(name + "_file", attr, "path", declaration.from_file, from_file=True))
        return options

    def build_parser(self) -> argparse.ArgumentParser:
        defaults = self.config_class()
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        for option in self.options():
            help_text = f"{option.help} [env {self.env_name(option.name)}]"
            default = None if option.secret or option.from_file else default_text(getattr(defaults, option.attr))
            if option.required:
                help_text += " (required)"
            elif default is not None:
                help_text += f" (default: {default})"
            if option.kind == "bool":
                parser.add_argument(
                    flag_name(option.name), dest=option.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            else:
                metavar = option.kind.upper().replace("CSV_INT", "N,N")
                parser.add_argument(flag_name(option.name), dest=option.name, default=None, metavar=metavar, help=help_text)
        return parser

    def from_args(self, argv: list[str] | None = None, environ: Mapping[str, str] | None = None):
        """Flags, then environment variables, then defaults -> a validated config."""
        environ = os.environ if environ is None else environ
        args = self.build_parser().parse_args(argv)
        config = self.config_class()
        for option in self.options():
            value = getattr(args, option.name)
            source = flag_name(option.name)
            if value is None and self.env_name(option.name) in environ:
                value, source = environ[self.env_name(option.name)], self.env_name(option.name)
            if value is None:
                continue
            if option.from_file:  # an empty file name: no file
                converted = getattr(config, option.attr) + (read_values(Path(value), source) if value else [])
            else:
                try:
                    converted = value if isinstance(value, bool) else convert(option.kind, value)
                except (ValueError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"{source}: invalid {option.kind} value {value!r} ({exc})") from None
            setattr(config, option.attr, converted)
        return config.validate()
