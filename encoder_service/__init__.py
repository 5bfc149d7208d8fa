"""gRPC encoder service for exported TERAN models (torch-free).

    python -m encoder_service --model-dir DIR      # serve (see --help for every limit)

Modules: `config` (flags + TERAN_ENCODER_* environment), `backends` (ONNX Runtime in-process,
remote Triton), `batching` (dynamic batcher), `model` (validation, tokenization, decoding and
the batched graphs), `server` (gRPC servicer, health, reflection, auth, metrics, shutdown).
Its client, the tensor codec and the generated protobuf code live in the shared API package
`teran_api` (regenerate the protobuf code with `python proto/generate.py`).
"""

__version__ = "0.1.0"
