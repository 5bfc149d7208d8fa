"""What the markers mean when the suite runs (declared in pyproject.toml):

- `slow`: takes seconds to minutes (the Milvus standalone server, exports, container images, load
  tests). `pytest -m "not slow"` is the quick lane for the edit-test loop; CI runs everything.
- `gpu`: needs an NVIDIA GPU and onnxruntime with the CUDA execution provider; skipped, with the
  reason, everywhere else (CI has no GPU).
"""

from __future__ import annotations

import pytest


def cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="needs onnxruntime's CUDAExecutionProvider and an NVIDIA GPU")
        for item in gpu_items:
            item.add_marker(skip)
