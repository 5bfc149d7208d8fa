"""int8 graphs for CPU serving (ONNX Runtime quantization), one recipe per graph.

Recipes, chosen by measurement on the shipped Flickr8k model (2-core Xeon with AVX-512 VNNI,
ORT 1.32; dev rsum deltas against the fp32 graphs, the other branch in fp32; ms per batch of 16):

- text_encoder: dynamic quantization (DynamicQuantizeLinear + MatMulInteger, QOperator), int8
  per-channel weights, MatMul + the embedding Gathers. Per-tensor weights (the issue's first
  try): global cosine >= 0.950 to fp32; per-channel: >= 0.983 over 5000 dev captions, alignment
  rsum -1.3, 50.8 -> 24.0 ms (2.1x). reduce_range (7-bit, for CPUs without VNNI): cosine 0.78.
  Keeping the FFN down-projections in fp32 gained 0.3 rsum but cost a third of the speed-up
  (32 ms); keeping the TERAN head in fp32 did not help. Activation x activation MatMuls
  (attention) are not quantized by ORT's dynamic recipe anyway.
- image_backbone: static QDQ, uint8 activations / int8 per-channel weights, percentile
  calibration on training photos, the stem conv and the last conv kept in fp32. Per-tensor
  weights: region-grid cosine 0.78; per-channel MinMax: photo pipeline alignment rsum -2.1;
  this recipe -1.5; 72.6 -> 35.8 ms (2.0x). QDQ and QOperator measured the same speed; QDQ
  is the portable format. Keeping the depthwise convs in fp32 was worse (-7.5).
- image_encoder (regions -> vectors, incl. the trunk's tuned top blocks): dynamic per-channel
  quantization of MatMul / Gemm: alignment rsum -0.2, 43 -> 33 ms (1.3x). The static QDQ recipe
  (every op, calibrated on the fp32 backbone's regions of the training photos) is 2x faster
  (21 ms) but cost -1.3 rsum, which with the text graph's -1.3 exceeded the 2.0 budget
  (-2.8 measured); `python -m export --int8-image-encoder static` selects it. Dynamic
  quantization of Conv (ConvInteger) was 2x slower than fp32 and is not used.

Dynamic quantization takes activation ranges per batch, so a caption's int8 vectors depend a
little on its batch-mates and their padding; the static graphs do not. Graph inputs and outputs
stay float32 / int64 / bool: the int8 files are drop-in replacements for the fp32 ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

Feeds = dict[str, np.ndarray]
MIN_CONVS_TO_KEEP_ENDS = 5

RECIPES = {
    "text_encoder": {"method": "dynamic", "format": "QOperator", "weights": "int8 per-channel", "ops": "MatMul, Gather (ORT default)"},
    "image_backbone": {
        "method": "static",
        "format": "QDQ",
        "weights": "int8 per-channel",
        "activations": "uint8, percentile calibration (99.999)",
        "ops": "Conv, except the stem conv and the last conv (fp32)",
    },
    "image_encoder": {"method": "dynamic", "format": "QOperator", "weights": "int8 per-channel", "ops": "MatMul, Gemm"},
    "image_encoder (static)": {
        "method": "static",
        "format": "QDQ",
        "weights": "int8 per-channel",
        "activations": "uint8, MinMax calibration on the fp32 backbone's regions",
        "ops": "all quantizable (Conv, MatMul, Gemm, ...)",
    },
}


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Feeds]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


@contextlib.contextmanager
def _quiet():
    """The quantizer logs a pre-processing hint and per-tensor notes at WARNING on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_dynamic_graph(src: Path, dst: Path, op_types: list[str] | None = None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=op_types)


def first_and_last_convs(path: Path) -> list[str]:
    """Names of the graph's first and last Conv nodes (kept in fp32 in the backbone); none for a graph of fewer
    than MIN_CONVS_TO_KEEP_ENDS convs (a stand-in backbone would keep nothing quantized)."""
    import onnx

    convs = [node.name for node in onnx.load(str(path), load_external_data=False).graph.node if node.op_type == "Conv"]
    return sorted({convs[0], convs[-1]}) if len(convs) >= MIN_CONVS_TO_KEEP_ENDS else []


def quantize_static_graph(
    src: Path, dst: Path, calibration: Iterable[Feeds], *, exclude: list[str] | None = None, percentile: bool = False
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = list(calibration)
    if not feeds:
        raise ValueError(f"{src.name}: static quantization needs calibration inputs")
    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            _Reader(feeds),  # type: ignore[arg-type]  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
            nodes_to_exclude=list(exclude or []),
            calibration_providers=["CPUExecutionProvider"],
        )


def backbone_feeds(pixels: np.ndarray, batch: int = 8) -> list[Feeds]:
    return [{"pixels": np.ascontiguousarray(pixels[s : s + batch], dtype=np.float32)} for s in range(0, len(pixels), batch)]


def encoder_feeds_from_backbone(backbone_fp32: Path, pixels: np.ndarray, input_names: list[str], batch: int = 16) -> list[Feeds]:
    """Run the fp32 backbone graph on calibration pixels; its (regions, boxes, mask) feed the encoder."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(backbone_fp32), options, providers=["CPUExecutionProvider"])
    feeds = []
    for s in range(0, len(pixels), batch):
        outputs = session.run(None, {"pixels": np.ascontiguousarray(pixels[s : s + batch], dtype=np.float32)})
        feeds.append(dict(zip(input_names, outputs, strict=True)))
    return feeds


def calibration_pixels(count: int = 64, split: str = "train", seed: int = 0, spec=None, data_dir: str | None = None) -> np.ndarray:
    """`count` training photos (a fixed random draw) as backbone input pixels [N, 3, S, S]."""
    from teran.data.flickr8k import load_split
    from teran.preprocess import PixelSpec, read_image_file, to_pixels

    data = load_split(split, data_dir)
    spec = spec or PixelSpec()
    index = np.sort(np.random.default_rng(seed).choice(len(data.names), min(count, len(data.names)), replace=False))
    return np.stack([to_pixels(read_image_file(data.image_path(int(i))), spec) for i in index])
