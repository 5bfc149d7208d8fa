"""Locust load tests for the encoder and search gRPC services (see loadtest/README.md).

Importing this package does not import locust (which monkey-patches the process with gevent);
`loadtest.runner.run_isolated` runs a load test in a fresh interpreter for such callers.
"""
