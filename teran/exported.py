"""Run an exported model directory's graphs with ONNX Runtime over whole data sets (offline
evaluation: export parity, the grounding evaluation). The encoder service has its own batched
runtime; this is the plain loop the offline tools share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from teran.manifest import Manifest, load_manifest
from teran.tokenization import CaptionTokenizer

Encoded3 = tuple[np.ndarray, np.ndarray, np.ndarray]  # global [N, D], concepts [N, L, D], mask [N, L]
OUTPUTS = ["global", "concepts", "concept_mask"]


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pad_cat(parts: list[np.ndarray], width: int) -> np.ndarray:
    """Concatenate [B, n, ...] arrays along dim 0 after zero-padding dim 1 to `width`."""
    padded = []
    for p in parts:
        pad = [(0, 0)] * p.ndim
        pad[1] = (0, width - p.shape[1])
        padded.append(np.pad(p, pad))
    return np.concatenate(padded)


def run_batches(batches: Iterable[tuple], run: Callable[[tuple], tuple]) -> Encoded3:
    """run(inputs) -> (global, concepts, mask) per batch; concatenated, concepts padded to the widest batch."""
    globals_, concepts, masks = [], [], []
    for inputs in batches:
        g, c, m = run(inputs)
        globals_.append(np.asarray(g, dtype=np.float32))
        concepts.append(np.asarray(c, dtype=np.float32))
        masks.append(np.asarray(m).astype(bool))
    width = max(c.shape[1] for c in concepts)
    return np.concatenate(globals_), pad_cat(concepts, width), pad_cat(masks, width)


def ort_runner(session, input_names: list[str]) -> Callable[[tuple], tuple]:
    def run(inputs):
        return tuple(session.run(OUTPUTS, dict(zip(input_names, inputs, strict=True))))

    return run


def caption_batches(tokenizer: CaptionTokenizer, captions: list[str], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask) batches; over-long captions truncated as in training."""
    out = []
    for start in range(0, len(captions), batch_size):
        batch = tokenizer.encode(captions[start : start + batch_size], truncate=True)
        out.append((batch.input_ids, batch.attention_mask))
    return out


def region_batches(regions: np.ndarray, boxes: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(regions, boxes, mask) batches of cached region features, all regions real."""
    out = []
    for start in range(0, len(regions), batch_size):
        r = regions[start : start + batch_size].astype(np.float32)
        out.append((r, boxes[start : start + batch_size].astype(np.float32), np.ones(r.shape[:2], dtype=bool)))
    return out


class ExportedModel:
    """One precision of a model directory's text and image encoder graphs, on the CPU."""

    def __init__(self, model_dir: str | Path, precision: str = "fp32", threads: int = 0, manifest: Manifest | None = None):
        self.model_dir = Path(model_dir)
        self.manifest = manifest or load_manifest(self.model_dir, verify=True)
        self.precision = precision
        self.tokenizer = CaptionTokenizer(self.model_dir / self.manifest.tokenizer_file, max_tokens=self.manifest.limits.max_tokens)
        self._text = ort_session(self.manifest.graph_path(self.model_dir, "text_encoder", precision), threads)
        self._image = ort_session(self.manifest.graph_path(self.model_dir, "image_encoder", precision), threads)
        self._text_inputs = [t.name for t in self.manifest.graph("text_encoder").inputs]
        self._image_inputs = [t.name for t in self.manifest.graph("image_encoder").inputs]

    @property
    def image_tuned_blocks(self) -> int:
        return self.manifest.preprocessing.image_tuned_blocks

    def encode_token_batches(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> Encoded3:
        return run_batches(batches, ort_runner(self._text, self._text_inputs))

    def encode_region_batches(self, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Encoded3:
        return run_batches(batches, ort_runner(self._image, self._image_inputs))

    def encode_captions(self, captions: list[str], batch_size: int = 128) -> Encoded3:
        return self.encode_token_batches(caption_batches(self.tokenizer, captions, batch_size))

    def encode_regions(self, regions: np.ndarray, boxes: np.ndarray, batch_size: int = 128) -> Encoded3:
        return self.encode_region_batches(region_batches(regions, boxes, batch_size))
