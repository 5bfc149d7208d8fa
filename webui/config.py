"""Settings of the search page gateway (`python -m webui --help`): flags and TERAN_WEB_* variables.

The listener, TLS, bearer token, log and metrics settings are the same as the gRPC services'
(`serving.settings.EndpointSettings`; metrics are off unless --metrics-port is given); the rest say where
the search service is and what a request may send.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from serving.settings import MIB, EndpointSettings, Settings, setting

ENV_PREFIX = "TERAN_WEB_"


@dataclass
class WebConfig(EndpointSettings):
    port: int = 8080
    search_address: str = setting("", "teran.v1.SearchService host:port the page and the JSON API call", required=True)
    search_token: str = setting("", "bearer token for the search service; prefer the variable", secret=True)
    search_tls: bool = setting(False, "connect to the search service over TLS (system CA bundle unless --search-root-cert)")
    search_root_cert: Path | None = setting(None, "PEM CA bundle that signed the search service's certificate (implies TLS)")
    search_client_cert: Path | None = setting(None, "PEM client certificate for a search service that requires mutual TLS")
    search_client_key: Path | None = setting(None, "PEM private key of --search-client-cert")
    search_timeout_s: float = setting(30.0, "LIMIT: seconds per search service call (then HTTP 504)")
    images_dir: Path | None = setting(
        None, "folder of the indexed photos, served at /photos/ID (ID: an image item's id, or a caption's metadata.image)"
    )
    default_top_k: int = setting(12, "hits when a request gives no top_k")
    max_upload_bytes: int = setting(20 * MIB, "LIMIT: bytes of a photo query (larger: HTTP 413, refused before it is read)")
    max_json_bytes: int = setting(64 * 1024, "LIMIT: bytes of a JSON request body (larger: HTTP 413)")
    max_inflight_requests: int = setting(32, "LIMIT: API requests served at once; more are refused with HTTP 429")
    read_timeout_s: float = setting(30.0, "LIMIT: seconds a client may take to send its request (then the connection is closed)")

    env_prefix = ENV_PREFIX

    def validate(self) -> WebConfig:
        self.check_common()
        need = self.require
        need(bool(self.search_address), "search_address", "required: the search service's host:port (python -m search_service)")
        for name in ("default_top_k", "max_upload_bytes", "max_json_bytes", "max_inflight_requests"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("search_timeout_s", "read_timeout_s"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(self.images_dir is None or Path(self.images_dir).is_dir(), "images_dir", f"{self.images_dir}: not a folder")
        need(
            (self.search_client_cert is None) == (self.search_client_key is None),
            "search_client_cert",
            "--search-client-cert and --search-client-key go together",
        )
        for name in ("search_root_cert", "search_client_cert", "search_client_key"):
            path = getattr(self, name)
            need(path is None or Path(path).is_file(), name, f"{path}: file does not exist")
        return self


SETTINGS = Settings(
    ENV_PREFIX,
    WebConfig,
    prog="python -m webui",
    description="TERAN search page and JSON HTTP API: a gateway to teran.v1.SearchService. GET / is the page; "
    "POST /api/v1/search (JSON caption query), POST /api/v1/search/image (photo bytes); GET /api/v1/stats; "
    "GET /photos/ID; GET /healthz and /readyz for probes. Errors are JSON with the search service's status "
    "code and message. Every flag can be set by the environment variable shown.",
)


def build_parser() -> argparse.ArgumentParser:
    return SETTINGS.build_parser()


def from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> WebConfig:
    """Flags, then TERAN_WEB_* variables, then defaults -> a validated WebConfig."""
    return SETTINGS.from_args(argv, environ)
