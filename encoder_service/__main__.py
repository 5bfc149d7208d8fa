"""`python -m encoder_service --model-dir DIR`: serve a model directory over gRPC (see --help).

Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 bad configuration or model directory,
1 any other startup failure.
"""

from __future__ import annotations

import sys

from encoder_service.config import from_args
from encoder_service.logs import LOGGING
from serving.runner import run
from teran.errors import TeranInputError


def make_server(config):
    from encoder_service.server import EncoderServer

    return EncoderServer(config)


def main(argv: list[str] | None = None) -> int:
    return run(argv, load_config=from_args, make_server=make_server, logs=LOGGING, startup_errors=((TeranInputError, 2), (OSError, 1)))


if __name__ == "__main__":
    sys.exit(main())
