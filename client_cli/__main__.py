"""`python -m client_cli ...` (the `teran` console script)."""

from __future__ import annotations

import sys

from client_cli.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
