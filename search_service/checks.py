"""What the search service accepts in metadata and vectors, checked before anything is stored.

Plain Python (no gRPC): each check raises ValueError with a message that names the field, what is
wrong and what is allowed; the servicer turns it into INVALID_ARGUMENT. Everything refused here
would otherwise fail inside Milvus halfway through a batch, or be stored and then corrupt rankings.
"""

from __future__ import annotations

import json
import math

import numpy as np

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# JSON nesting Milvus and this service accept; deeper documents are refused before parsing them.
MAX_METADATA_DEPTH = 32


def parse_metadata(text: str, where: str) -> dict:
    """A JSON object whose numbers Milvus can store: integers within int64, finite floats (no NaN or
    Infinity, which Python's JSON parser accepts but JSON does not), nested at most MAX_METADATA_DEPTH."""
    depth = _nesting_depth(text)
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"{where}: nested {depth} levels deep; at most {MAX_METADATA_DEPTH} allowed")

    def reject_constant(name: str):
        raise ValueError(f"{where}: {name} is not a JSON number; give finite numbers (or null)")

    try:
        value = json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(value).__name__}")
    _check_numbers(value, where)
    return value


def _nesting_depth(text: str) -> int:
    """The deepest [ / { nesting of a JSON text, outside strings (counted without parsing it)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _check_numbers(value, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"{where}: integer {value} is outside the 64-bit range Milvus stores ({INT64_MIN}..{INT64_MAX})")
    elif isinstance(value, float):
        if not math.isfinite(value):  # e.g. 1e999, which the parser turns into infinity
            raise ValueError(f"{where}: number {value} is not finite; give finite numbers")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_numbers(item, f"{where}[{i}]")


def check_unit_rows(array: np.ndarray, where: str, tolerance: float) -> None:
    """Every row of `array` ([D] or [N, D]) must have L2 norm 1 within `tolerance`, as the encoder
    returns them: the ranking scores are cosines, and one scaled item would top every search."""
    rows = np.atleast_2d(np.asarray(array, dtype=np.float64))
    norms = np.linalg.norm(rows, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > tolerance)
    if bad.size:
        row = int(bad[0])
        at = f" row {row}" if np.ndim(array) == 2 else ""
        raise ValueError(
            f"{where}:{at} L2 norm {norms[row]:.6g}; vectors must be L2-normalised (norm 1 within {tolerance:g}, "
            "--vector-norm-tolerance), as the encoder returns them"
        )
