import os

# The runner starts (and, in the fault run, restarts) the services with fork+exec while gRPC channels are
# open; gRPC's fork support would restart its pollers in the forked child, whose fd cleanup then aborts it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# locust must be imported (it gevent-monkey-patches the process) before grpc and the clients.
import locust  # noqa: F401, E402, I001

from loadtest.runner import main  # noqa: E402

raise SystemExit(main())
