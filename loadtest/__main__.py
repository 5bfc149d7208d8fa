# locust must be imported (it gevent-monkey-patches the process) before grpc and the clients.
import locust  # noqa: F401, I001

from loadtest.runner import main

raise SystemExit(main())
