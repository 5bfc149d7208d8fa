"""gRPC encoder service for exported TERAN models (torch-free).

    python -m encoder_service --model-dir DIR      # serve (see --help for every limit)

Modules: `config` (flags + TERAN_ENCODER_* environment), `backends` (ONNX Runtime in-process,
remote Triton), `batching` (dynamic batcher), `model` (validation, tokenization, decoding and
the batched graphs), `server` (gRPC servicer, health, reflection, auth, metrics, shutdown),
`client` (typed sync / asyncio client), `tensors` (the `teran.v1.Tensor` codec). Generated
protobuf code lives in `encoder_service._proto` (regenerate with `python proto/generate.py`).
"""

__version__ = "0.1.0"
