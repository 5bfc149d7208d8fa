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


@pytest.fixture(scope="session")
def shipped_model_dir(tmp_path_factory):
    """The shipped checkpoint's export with its int8 graphs: artifacts/teran-flickr8k when it is that
    export (the demo writes it), else a fresh one in a temporary folder (a clean clone, as in CI)."""
    import subprocess
    import sys
    from pathlib import Path

    from teran.cache import file_digest
    from teran.errors import TeranInputError
    from teran.manifest import load_manifest

    root = Path(__file__).resolve().parents[1]
    checkpoint = root / "models" / "teran-flickr8k.pt"
    shipped = root / "artifacts" / "teran-flickr8k"
    try:
        manifest = load_manifest(shipped, verify=False)
        if manifest.source.sha256 == file_digest(checkpoint) and all(entry.int8 for entry in manifest.graphs.values()):
            return shipped
    except TeranInputError:
        pass
    out = tmp_path_factory.mktemp("shipped") / "teran-flickr8k"
    command = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--output", str(out), "--name", "teran-flickr8k"]
    subprocess.run(command + ["--no-triton"], cwd=root, check=True, capture_output=True)
    return out
