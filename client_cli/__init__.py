"""`teran`: a command-line client over the TERAN gRPC API (search, index, encode, stats, get, delete).

    python -m client_cli search --caption "a dog on the beach" --top-k 5 --explain
    python -m client_cli index --images photos/ --metadata '{"split": "test"}'
    python -m client_cli index --captions captions.txt      # Flickr8k "image,caption" or "id,caption"
    python -m client_cli encode --caption "a dog" --json

Addresses: --encoder (TERAN_ENCODER_ADDRESS, localhost:50051), --search (TERAN_SEARCH_ADDRESS,
localhost:50052); --token (TERAN_TOKEN). Exit codes: 0 ok, 2 usage / bad input, 1 RPC error
(printed as `error: <STATUS_CODE>: <details>` on stderr, then a `hint:` line when the service looks
unreachable or the address is another service's), 141 when the reader of the output stops early
(`teran stats | head -3`). Caption items are indexed with their text in metadata "text", which a
search for captions prints next to each id.
"""

from client_cli.cli import build_parser, main

__all__ = ["build_parser", "main"]
