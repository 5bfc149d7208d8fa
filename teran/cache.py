"""Where derived artefacts (feature caches) live: TERAN_CACHE_DIR or ~/.cache/teran."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("TERAN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "teran")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(settings: dict) -> str:
    """Short stable hash of the settings a cached artefact depends on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
