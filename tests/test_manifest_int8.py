"""The manifest's int8 graph files (issue 15): optional, checksummed, selectable; older manifests still load."""

from __future__ import annotations

import json

import pytest

from teran.manifest import PRECISIONS, GraphEntry, Manifest, ManifestError, TensorSpec


def _entry(int8: str | None) -> GraphEntry:
    specs = [TensorSpec("input_ids", "int64", ("batch", "tokens")), TensorSpec("attention_mask", "int64", ("batch", "tokens"))]
    outs = [TensorSpec("global", "float32", ("batch", 8))]
    return GraphEntry("text_encoder.fp32.onnx", "text_encoder.fp16.onnx", specs, outs, int8=int8)


def test_precisions_include_int8():
    assert PRECISIONS == ("fp32", "fp16", "int8")
    assert _entry("text_encoder.int8.onnx").file("int8") == "text_encoder.int8.onnx"
    with pytest.raises(ManifestError, match="no int8 variant"):
        _entry(None).file("int8")
    with pytest.raises(ManifestError, match="unknown precision"):
        _entry(None).file("int4")


def _manifest_dict(int8: str | None, with_key: bool = True, checksum: bool = True) -> dict:
    graph = _entry(int8).to_dict()
    if not with_key:
        graph.pop("int8")
    files = {"tokenizer.json": {"sha256": "0" * 64, "size": 1}}
    for name in ("text_encoder.fp32.onnx", "text_encoder.fp16.onnx") + ((int8,) if int8 and checksum else ()):
        files[name] = {"sha256": "1" * 64, "size": 2}
    return {
        "format": "teran-model-dir",
        "format_version": 1,
        "model": {"name": "m", "version": 1},
        "source_checkpoint": {"path": "m.pt", "sha256": "2" * 64, "kind": "project", "size": 3},
        "joint_dim": 8,
        "limits": {"max_tokens": 16, "max_regions": 20, "max_batch": 8},
        "tokenizer_file": "tokenizer.json",
        "preprocessing": {"region_dim": 12},
        "alignment_mode": "MrSw",
        "concept_mode": "words",
        "graphs": {"text_encoder": graph},
        "files": files,
    }


def test_int8_round_trips_and_needs_a_checksum():
    manifest = Manifest.from_dict(_manifest_dict("text_encoder.int8.onnx"))
    assert manifest.graph("text_encoder").int8 == "text_encoder.int8.onnx"
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.graph("text_encoder").file("int8") == "text_encoder.int8.onnx"
    with pytest.raises(ManifestError, match="no checksum recorded for 'text_encoder.int8.onnx'"):
        Manifest.from_dict(_manifest_dict("text_encoder.int8.onnx", checksum=False))
    bad = _manifest_dict("text_encoder.int8.onnx")
    bad["graphs"]["text_encoder"]["int8"] = 5
    with pytest.raises(ManifestError, match="int8"):
        Manifest.from_dict(bad)


def test_manifest_without_int8_still_loads():
    manifest = Manifest.from_dict(_manifest_dict(None, with_key=False))
    assert manifest.graph("text_encoder").int8 is None
    assert manifest.graph("text_encoder").file("fp32") == "text_encoder.fp32.onnx"
