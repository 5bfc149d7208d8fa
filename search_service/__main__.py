"""`python -m search_service --milvus-uri URI --encoder-address HOST:PORT`: serve search over gRPC (see --help).

Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 bad configuration, 1 any other startup
failure (e.g. Milvus unreachable).
"""

from __future__ import annotations

import sys

from search_service.config import from_args
from search_service.logs import LOGGING
from serving.runner import run
from teran.errors import TeranInputError


def make_server(config):
    from search_service.server import SearchServer

    return SearchServer(config)


def main(argv: list[str] | None = None) -> int:
    # Exception: Milvus unreachable, port taken, ...
    return run(argv, load_config=from_args, make_server=make_server, logs=LOGGING, startup_errors=((TeranInputError, 2), (Exception, 1)))


if __name__ == "__main__":
    sys.exit(main())
