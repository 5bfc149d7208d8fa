"""Table-driven service settings: command-line flags, each with an environment variable.

A service describes its settings as `(name, kind, help)` rows and a config dataclass whose fields
carry the defaults; `Settings` turns them into an argparse parser (variable names and defaults in
--help) and a loader with precedence flag > environment variable > default. The `auth_token`
(csv) and `auth_token_file` (path) rows fill the dataclass's `auth_tokens` list. Validation stays
with the service: the dataclass's `validate()` is called last and returns the config.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import cast

from teran.errors import TeranInputError


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
class Settings:
    """One service's settings table, environment prefix and config dataclass.

    required: settings shown as "(required)" in --help instead of a default.
    hidden_defaults: settings whose default --help never shows (secrets).
    hide_empty_defaults: do not show "" defaults in --help.
    """

    table: Sequence[tuple[str, str, str]]
    env_prefix: str
    config_class: type
    prog: str
    description: str
    required: Collection[str] = ()
    hidden_defaults: Collection[str] = ()
    hide_empty_defaults: bool = False

    def env_name(self, name: str) -> str:
        return self.env_prefix + name.upper()

    def build_parser(self) -> argparse.ArgumentParser:
        defaults = self.config_class()
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        for name, kind, text in self.table:
            attr = "auth_tokens" if name == "auth_token" else name
            default = getattr(defaults, attr, None)
            if isinstance(default, list):
                default = ",".join(map(str, default)) or None
            elif isinstance(default, dict):
                default = json.dumps(default) if default else None
            elif name in self.hidden_defaults or (self.hide_empty_defaults and default == ""):
                default = None
            help_text = f"{text} [env {self.env_name(name)}]"
            if name in self.required:
                help_text += " (required)"
            elif default is not None:
                help_text += f" (default: {default})"
            if kind == "bool":
                parser.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                metavar = kind.upper().replace("CSV_INT", "N,N")
                parser.add_argument(flag_name(name), dest=name, default=None, metavar=metavar, help=help_text)
        return parser

    def from_args(self, argv: list[str] | None = None, environ: Mapping[str, str] | None = None):
        """Flags, then environment variables, then defaults -> a validated config."""
        environ = os.environ if environ is None else environ
        args = self.build_parser().parse_args(argv)
        config = self.config_class()
        known = {f.name for f in fields(self.config_class)}
        tokens: list[str] = []
        for name, kind, _text in self.table:
            value = getattr(args, name)
            source = flag_name(name)
            if value is None and self.env_name(name) in environ:
                value, source = environ[self.env_name(name)], self.env_name(name)
            if value is None:
                continue
            try:
                converted = value if isinstance(value, bool) else convert(kind, value)
            except (ValueError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{source}: invalid {kind} value {value!r} ({exc})") from None
            if name == "auth_token":
                tokens.extend(cast(list[str], converted))
            elif name == "auth_token_file":
                try:
                    lines = Path(cast(str, converted)).read_text(encoding="utf-8").splitlines()
                except OSError as exc:
                    raise ConfigError(f"{source}: cannot read {converted} ({exc.strerror})") from None
                tokens.extend(line.strip() for line in lines if line.strip())
            elif name in known:
                setattr(config, name, converted)
        config.auth_tokens = tokens
        return config.validate()
