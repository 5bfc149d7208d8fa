"""`python -m webui --search-address HOST:PORT [--images-dir DIR]`: serve the search page and the JSON API
(see --help).

Exit codes: 0 after a clean shutdown (SIGTERM / SIGINT), 2 bad configuration, 1 any other startup
failure (e.g. the port is taken).
"""

from __future__ import annotations

import sys

from serving.logs import ServiceLogging
from serving.runner import run
from teran.errors import TeranInputError
from webui.config import from_args

LOGGING = ServiceLogging("webui")


def make_server(config):
    from webui.server import WebServer

    return WebServer(config, LOGGING.get_logger())


def main(argv: list[str] | None = None) -> int:
    return run(argv, load_config=from_args, make_server=make_server, logs=LOGGING, startup_errors=((TeranInputError, 2), (Exception, 1)))


if __name__ == "__main__":
    sys.exit(main())
