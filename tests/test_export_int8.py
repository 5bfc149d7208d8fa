"""int8 graphs of `python -m export` (issue 15) on a tiny random model: written, checksummed, listed, runnable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export import make_checkpoint, tiny_source

from export.exporter import export_model_dir
from teran.manifest import MANIFEST_FILE, file_sha256, load_manifest

pytestmark = pytest.mark.slow  # torch.onnx.export of every graph

QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-int8")
    checkpoint = root / "tiny.pt"
    make_checkpoint(checkpoint, seed=0)
    source = tiny_source(checkpoint)
    out = root / "tiny"
    manifest = export_model_dir(source, out, name="tiny", max_batch=8, triton=False, progress=None)
    return {"source": source, "out": out, "manifest": manifest}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_graphs_are_listed_with_checksums(exported):
    out = exported["out"]
    manifest = load_manifest(out, verify=True)
    written = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest.graphs) == {"text_encoder", "image_encoder", "image_backbone"}
    for name, entry in manifest.graphs.items():
        assert entry.int8 == f"{name}.int8.onnx" and written["graphs"][name]["int8"] == entry.int8
        assert manifest.graph_path(out, name, "int8") == out / entry.int8
        assert manifest.files[entry.int8].sha256 == file_sha256(out / entry.int8)
        assert manifest.files[entry.int8].size == (out / entry.int8).stat().st_size
        ops = {node.op_type for node in onnx.load(str(out / entry.int8)).graph.node}
        assert ops & QUANTIZED_OPS, f"{name}: no quantized op in the int8 graph"
        # drop-in: the same graph inputs and outputs as fp32
        fp32 = _session(out / entry.fp32)
        int8 = _session(out / entry.int8)
        assert [(i.name, i.type) for i in int8.get_inputs()] == [(i.name, i.type) for i in fp32.get_inputs()]
        assert [(o.name, o.type) for o in int8.get_outputs()] == [(o.name, o.type) for o in fp32.get_outputs()]
        checks = manifest.extra["export_checks"][name]
        assert np.isfinite(checks["int8_max_abs_diff"]) and np.isfinite(checks["int8_max_scaled_diff"])
    info = manifest.extra["int8"]
    assert info["recipes"]["text_encoder"]["method"] == "dynamic"
    assert info["recipes"]["image_backbone"]["method"] == "static" and info["recipes"]["image_backbone"]["format"] == "QDQ"
    assert info["recipes"]["image_encoder"]["method"] == "mixed"  # the default (export --int8-image-encoder)
    assert "synthetic" in info["calibration"]  # no calibration photos passed: the graphs' own example inputs


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def test_int8_graphs_stay_close_to_fp32(exported):
    """Captions: the text graph's check inputs; images: the backbone's check pixels through backbone + encoder
    (the static graphs are calibrated on backbone outputs, not on arbitrary region features)."""
    out, manifest, source = exported["out"], exported["manifest"], exported["source"]
    sessions = {(g, p): _session(out / manifest.graph(g).file(p)) for g in manifest.graphs for p in ("fp32", "int8")}
    text = source.graphs["text_encoder"]
    for inputs in text.checks:
        feeds = {n: t.numpy() for n, t in zip(text.input_names, inputs, strict=True)}
        a, b = (sessions["text_encoder", p].run(None, feeds) for p in ("fp32", "int8"))
        np.testing.assert_array_equal(a[2], b[2])  # masks are exact
        assert _min_cosine(a[0], b[0]) > 0.9
    names = [t.name for t in manifest.graph("image_encoder").inputs]
    for (pixels,) in source.graphs["image_backbone"].checks:
        results = []
        for p in ("fp32", "int8"):
            grid = sessions["image_backbone", p].run(None, {"pixels": pixels.numpy()})
            results.append(sessions["image_encoder", p].run(None, dict(zip(names, grid, strict=True))))
        np.testing.assert_array_equal(results[0][2], results[1][2])
        assert _min_cosine(results[0][0], results[1][0]) > 0.9


@pytest.mark.slow  # exports the shipped model in a clean clone
def test_shipped_backbone_keeps_its_sensitive_convs_in_fp32(shipped_model_dir):
    """The stem, the first depthwise conv, the first two blocks' projection convs and the last conv stay fp32."""
    fp32 = onnx.load(str(shipped_model_dir / "image_backbone.fp32.onnx")).graph
    convs32 = [n for n in fp32.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs32]
    depthwise = [i for i, g in enumerate(groups) if g > 1]
    assert len(depthwise) >= 2
    projections = [next(convs32[j].name for j in range(i + 1, len(convs32)) if groups[j] == 1) for i in depthwise[:2]]
    keep = {convs32[0].name, convs32[depthwise[0]].name, *projections, convs32[-1].name}
    assert len(keep) == 5
    graph = onnx.load(str(shipped_model_dir / "image_backbone.int8.onnx")).graph
    inits = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    for name in keep:
        assert name in convs and convs[name].input[1] not in dequantized, f"{name} should keep fp32 weights"
    assert sum(n.input[1] in dequantized for n in convs.values()) == len(convs32) - len(keep)  # every other conv is int8


@pytest.mark.slow  # exports the shipped model in a clean clone
def test_shipped_image_encoder_is_mixed(shipped_model_dir):
    """Static QDQ on the pointwise convs (depthwise convs fp32), dynamic int8 MatMuls."""
    graph = onnx.load(str(shipped_model_dir / "image_encoder.int8.onnx")).graph
    inits = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    grouped = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) > 1 for n in convs}
    assert any(grouped.values()) and not all(grouped.values())
    for n in convs:
        assert (n.input[1] in dequantized) == (not grouped[n.name]), n.name
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in graph.node}


def test_no_int8_export_and_calibration_photos(tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    make_checkpoint(checkpoint, seed=1)
    source = tiny_source(checkpoint)
    plain = export_model_dir(source, tmp_path / "plain", name="tiny", triton=False, int8=False, progress=None)
    assert all(entry.int8 is None for entry in plain.graphs.values()) and "int8" not in plain.extra
    assert not list((tmp_path / "plain").glob("*.int8.onnx"))
    pixels = np.random.default_rng(0).standard_normal((6, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        calibrated = export_model_dir(
            source,
            tmp_path / "cal",
            name="tiny",
            triton=False,
            calibration_pixels=pixels,
            calibration_note="6 test photos",
            int8_image_encoder="static",
            progress=None,
        )
    info = calibrated.extra["int8"]
    assert info["calibration"] == "6 test photos" and info["calibration_images"] == 6
    assert info["recipes"]["image_encoder"]["method"] == "static" and info["recipes"]["image_encoder"]["format"] == "QDQ"
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(tmp_path / "cal" / "image_encoder.int8.onnx")).graph.node}
    load_manifest(tmp_path / "cal", verify=True)


def test_triton_repository_can_link_the_int8_graphs(exported, tmp_path):
    from export import triton as triton_repo

    out = tmp_path / "model"
    shutil.copytree(exported["out"], out)
    manifest = load_manifest(out, verify=False)
    info = triton_repo.write_repository(out, manifest, device="cpu", precision="int8")
    assert info["onnx_precision"] == "int8" and info["tensorrt"] is None
    for name, entry in manifest.graphs.items():
        assert (out / "triton" / name / "1" / "model.onnx").read_bytes() == (out / entry.int8).read_bytes()
