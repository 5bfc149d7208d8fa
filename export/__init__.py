"""Training checkpoint -> self-describing model directory (ONNX graphs + manifest + Triton repository).

    python -m export --checkpoint models/teran-flickr8k.pt --output artifacts/teran-flickr8k
    python -m export.parity --model-dir artifacts/teran-flickr8k --checkpoint models/teran-flickr8k.pt \
        --output reports/export-parity.json

Importing this package is cheap (no torch): `export.triton` only needs the manifest.
"""
