"""export.quantize recipes on small hand-built ONNX graphs (issue 15): which convs stay fp32, the mixed encoder recipe."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export import quantize


def _conv_graph(path, layout: list[tuple[int, int, int]], size: int = 8) -> None:
    """A chain of Conv + Clip (ReLU6): each (in_channels, out_channels, group), 3x3 convs where grouped, else 1x1."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "pixels"
    for i, (cin, cout, group) in enumerate(layout):
        k = 3 if group > 1 else 1
        weight = numpy_helper.from_array((rng.standard_normal((cout, cin // group, k, k)) * 0.3).astype(np.float32), f"w{i}")
        bias = numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")
        inits += [weight, bias]
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=group, pads=[k // 2] * 4))
        nodes.append(helper.make_node("Clip", [f"c{i}", "lo", "hi"], [f"r{i}"], name=f"clip{i}"))
        current = f"r{i}"
    inits += [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", layout[0][0], size, size])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", layout[-1][1], size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


# stem, block 0 (depthwise, projection), block 1 (expansion, depthwise, projection), block 2 (expansion, depthwise, projection), head
MOBILE = [(3, 8, 1), (8, 8, 8), (8, 4, 1), (4, 16, 1), (16, 16, 16), (16, 6, 1), (6, 24, 1), (24, 24, 24), (24, 6, 1), (6, 12, 1)]


def test_backbone_keeps_stem_first_depthwise_first_projections_and_last_conv(tmp_path):
    path = tmp_path / "backbone.onnx"
    _conv_graph(path, MOBILE)
    assert quantize.backbone_fp32_convs(path) == ["conv0", "conv1", "conv2", "conv5", "conv9"]
    assert quantize.depthwise_convs(path) == ["conv1", "conv4", "conv7"]


def test_small_or_plain_graphs_keep_little_in_fp32(tmp_path):
    small = tmp_path / "small.onnx"
    _conv_graph(small, MOBILE[:4])  # fewer than MIN_CONVS_TO_KEEP_ENDS convs: everything quantized
    assert quantize.backbone_fp32_convs(small) == []
    plain = tmp_path / "plain.onnx"
    _conv_graph(plain, [(3, 8, 1), (8, 8, 1), (8, 8, 1), (8, 8, 1), (8, 8, 1), (8, 4, 1)])  # no depthwise conv: the two ends
    assert quantize.backbone_fp32_convs(plain) == ["conv0", "conv5"]


def test_static_quantization_leaves_the_excluded_convs_in_fp32(tmp_path):
    src, dst = tmp_path / "backbone.onnx", tmp_path / "backbone.int8.onnx"
    _conv_graph(src, MOBILE)
    pixels = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    keep = quantize.backbone_fp32_convs(src)
    quantize.quantize_static_graph(src, dst, quantize.backbone_feeds(pixels, batch=4), exclude=keep, percentile=True)
    graph = onnx.load(str(dst)).graph
    inits = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    int8_weights = {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized}
    assert int8_weights == {f"conv{i}" for i in range(len(MOBILE))} - set(keep)
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert int8.shape == fp32.shape and np.isfinite(int8).all()


def test_mixed_recipe_quantizes_pointwise_convs_statically_and_keeps_depthwise_fp32(tmp_path):
    src, dst = tmp_path / "encoder.onnx", tmp_path / "encoder.int8.onnx"
    _conv_graph(src, [(6, 24, 1), (24, 24, 24), (24, 6, 1)])
    feeds = [{"pixels": np.random.default_rng(s).standard_normal((4, 6, 8, 8)).astype(np.float32)} for s in range(3)]
    quantize.quantize_mixed_encoder(src, dst, feeds)
    graph = onnx.load(str(dst)).graph
    inits = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized} == {"conv0", "conv2"}
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    cosine = (fp32 * int8).sum() / (np.linalg.norm(fp32) * np.linalg.norm(int8))
    assert cosine > 0.95


def test_mixed_recipe_without_pointwise_convs_is_the_dynamic_one(tmp_path):
    """No convs to calibrate (a stand-in encoder): only the dynamic MatMul pass, no empty calibration."""
    src, dst = tmp_path / "encoder.onnx", tmp_path / "encoder.int8.onnx"
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(src))
    quantize.quantize_mixed_encoder(src, dst, [])
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(dst)).graph.node}
