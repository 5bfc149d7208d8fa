"""Filter expressions: the names a caller's filter may use, and the id filters the store builds itself.

A caller's filter is checked here against an allow-list first (so it can reach only the metadata and
ids, never the vectors or the store's own fields), then by Milvus itself (MilvusStore.validate_filter).
"""

from __future__ import annotations

import re


class BadFilter(ValueError):
    """The filter expression is invalid (INVALID_ARGUMENT)."""


# Ids go into filter expressions between double quotes, unescaped (id_filter): none may hold a double quote,
# a backslash or a control character.
ID_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')


def id_filter(ids: list[str]) -> str:
    return "id in [" + ", ".join(f'"{i}"' for i in ids) + "]"


# Filters may use only these names outside string literals (case-insensitive).
FILTER_NAMES = {
    "metadata", "id", "and", "or", "not", "in", "like", "true", "false", "is", "null", "exists",
    "json_contains", "json_contains_all", "json_contains_any", "array_contains", "array_contains_all",
    "array_contains_any", "array_length",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_filter_names(expr: str) -> None:
    bare = _STRING.sub(" ", expr)
    if '"' in bare or "'" in bare:
        raise BadFilter("unterminated string literal")
    for name in _NAME.findall(bare):
        if name.lower() not in FILTER_NAMES:
            raise BadFilter(f'unknown name {name!r}: a filter may use metadata["key"], id, operators and json_contains*/array_* functions')
