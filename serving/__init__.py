"""Shared, torch-free serving infrastructure of the gRPC services (encoder_service, search_service).

- `serving.settings`: a settings table -> argparse flags with environment variables (flag > env > default).
- `serving.logs`: JSON / text log formatters and per-service logger setup.
- `serving.metrics`: the Prometheus registry and its /metrics HTTP server.
- `serving.grpc_server`: gRPC server construction (options, bearer-token auth, health, reflection, ports).
- `serving.runner`: the `python -m <service>` run loop (signals, exit codes).
"""
