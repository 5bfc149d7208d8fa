"""The TERAN gRPC API as Python: what the services, their clients, the CLI, the demo, the
benchmarks and the load tests share, and the only place where the two services meet.

Modules: `_proto` (generated from proto/teran/v1/*.proto by `python proto/generate.py`: common,
encoder and search messages and stubs), `tensors` (the `teran.v1.Tensor` codec), `encoder_client`
(typed sync / asyncio client of teran.v1.EncoderService), `search_client` (client of
teran.v1.SearchService). Torch-free: grpcio, protobuf and numpy.
"""
