"""teran.manifest: write / read / verify a model directory's manifest.json (torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from teran.errors import TeranInputError
from teran.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    GraphEntry,
    Limits,
    Manifest,
    ManifestError,
    Preprocessing,
    SourceCheckpoint,
    TensorSpec,
    load_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def _graph(name: str, inputs: list[TensorSpec]) -> GraphEntry:
    outputs = [
        TensorSpec("global", "float32", ("batch", 8)),
        TensorSpec("concepts", "float32", ("batch", "n", 8)),
        TensorSpec("concept_mask", "bool", ("batch", "n")),
    ]
    return GraphEntry(f"{name}.fp32.onnx", f"{name}.fp16.onnx", inputs, outputs, "basic", 20)


def make_dir(root: Path) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    graphs = {
        "text_encoder": _graph(
            "text_encoder",
            [TensorSpec("input_ids", "int64", ("batch", "tokens")), TensorSpec("attention_mask", "int64", ("batch", "tokens"))],
        ),
        "image_encoder": _graph("image_encoder", [TensorSpec("regions", "float32", ("batch", "regions", 16))]),
    }
    for entry in graphs.values():
        (root / entry.fp32).write_bytes(b"fp32 graph bytes " + entry.fp32.encode())
        (root / entry.fp16).write_bytes(b"fp16 graph bytes " + entry.fp16.encode())
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "triton" / "text_encoder" / "1").mkdir(parents=True)
    (root / "triton" / "text_encoder" / "config.pbtxt").write_text('name: "text_encoder"\n')
    manifest = Manifest(
        model_name="tiny",
        model_version=2,
        source=SourceCheckpoint(path="/x/tiny.pt", sha256="ab" * 32, kind="project", size=123),
        joint_dim=8,
        limits=Limits(max_tokens=16, max_regions=20, max_batch=4),
        tokenizer_file="tokenizer.json",
        preprocessing=Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bilinear", grid=7, region_dim=16),
        alignment_mode="MrSw",
        concept_mode="words",
        graphs=graphs,
        extra={"note": "test"},
    )
    return write_manifest(root, manifest)


def test_round_trip_and_checksums(tmp_path):
    written = make_dir(tmp_path / "m")
    loaded = load_manifest(tmp_path / "m")
    assert loaded.to_dict() == written.to_dict()
    data = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    assert data["format"] == FORMAT and data["format_version"] == FORMAT_VERSION
    assert data["model"] == {"name": "tiny", "version": 2}
    assert data["created"].endswith("Z")
    assert set(data["files"]) == {
        "text_encoder.fp32.onnx",
        "text_encoder.fp16.onnx",
        "image_encoder.fp32.onnx",
        "image_encoder.fp16.onnx",
        "tokenizer.json",
        "triton/text_encoder/config.pbtxt",
    }
    assert data["files"]["tokenizer.json"]["size"] == len('{"model": {}}')
    assert data["graphs"]["text_encoder"]["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]}
    assert loaded.graph("text_encoder").outputs[1].shape == ("batch", "n", 8)
    assert loaded.graph_path(tmp_path / "m", "image_encoder", "fp16") == tmp_path / "m" / "image_encoder.fp16.onnx"
    assert loaded.pixel_spec().size == 224
    assert not (tmp_path / "m" / (MANIFEST_FILE + ".tmp")).exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda d: (d / "text_encoder.fp16.onnx").write_bytes(b"fp16 graph bytes text_encoder.fp16.onnY"),
            "text_encoder.fp16.onnx: checksum mismatch",
        ),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: size 2 bytes differs"),
        (lambda d: (d / "image_encoder.fp32.onnx").unlink(), "image_encoder.fp32.onnx: listed in manifest.json but missing"),
        (
            lambda d: (d / "triton" / "text_encoder" / "config.pbtxt").write_text('name: "text_encodeX"\n'),
            "config.pbtxt: checksum mismatch",
        ),
    ],
)
def test_tampering_is_detected(tmp_path, damage, message):
    root = tmp_path / "m"
    make_dir(root)
    damage(root)
    with pytest.raises(ManifestError, match=message):
        load_manifest(root)
    load_manifest(root, verify=False)  # the manifest itself still parses


def _rewrite(root: Path, change) -> None:
    data = json.loads((root / MANIFEST_FILE).read_text())
    change(data)
    (root / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format_version=2), "format version 2 is not supported"),
        (lambda d: d.update(format="something-else"), "not a teran-model-dir manifest"),
        (lambda d: d.pop("limits"), "malformed manifest"),
        (lambda d: d["model"].update(version="1"), "bad field model.version"),
        (lambda d: d.update(concept_mode="sentences"), "bad field concept_mode"),
        (lambda d: d["source_checkpoint"].update(kind="keras"), "bad field source_checkpoint.kind"),
        (lambda d: d["graphs"]["text_encoder"].update(ort_optimization="turbo"), "ort_optimization"),
        (lambda d: d["graphs"]["text_encoder"]["inputs"][0].update(dtype="int8"), "dtype"),
        (lambda d: d["files"].pop("tokenizer.json"), "no checksum recorded for 'tokenizer.json'"),
        (lambda d: d["graphs"].update(audio_encoder=d["graphs"]["text_encoder"]), "unknown graph"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, change, message):
    root = tmp_path / "m"
    make_dir(root)
    _rewrite(root, change)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(root, verify=False)
    assert MANIFEST_FILE in str(info.value)


# The preprocessing of the three kinds of exported model, as `python -m export` writes them.
TUNED_TRUNK = {
    "size": 224,
    "mean": [0.4980392156862745, 0.4980392156862745, 0.4980392156862745],
    "std": [0.5019607843137255, 0.5019607843137255, 0.5019607843137255],
    "resample": "bilinear",
    "grid": 7,
    "region_dim": 192,
    "region_count": 49,
    "image_tuned_blocks": 2,
    "boxes": "normalised x1,y1,x2,y2",
    "layout": "NCHW float32, (pixel/255 - mean) / std, squashed to size x size (no crop)",
}
FROZEN_TRUNK = {key: value for key, value in TUNED_TRUNK.items() if key not in ("region_count", "image_tuned_blocks")} | {
    "region_dim": 1280
}
REGION_FEATURES = {
    "region_dim": 2048,
    "boxes": "pixels x1,y1,x2,y2 (divided by image_sizes inside the graph)",
    "features": "bottom-up Faster R-CNN (Visual Genome) region features, computed outside this model",
}


@pytest.mark.parametrize("data", [TUNED_TRUNK, FROZEN_TRUNK, REGION_FEATURES], ids=["tuned", "frozen", "region-features"])
def test_preprocessing_is_typed_and_written_back_as_read(data):
    parsed = Preprocessing.from_dict(json.loads(json.dumps(data)))
    assert json.dumps(parsed.to_dict()) == json.dumps(data)  # same keys, values and order
    assert parsed.region_dim == data["region_dim"] and parsed.region_count == data.get("region_count")
    assert parsed.image_tuned_blocks == data.get("image_tuned_blocks", 0)
    if "grid" in data:
        assert parsed.grid_regions == 49 and parsed.pixel_spec().mean == tuple(data["mean"])
    else:
        assert parsed.grid is None and parsed.grid_regions is None and parsed.warmup_regions(100) == 36
        with pytest.raises(ManifestError, match="takes region features"):
            parsed.pixel_spec()


def test_manifest_file_is_written_back_byte_for_byte(tmp_path):
    make_dir(tmp_path / "m")
    text = (tmp_path / "m" / MANIFEST_FILE).read_text()
    data = json.loads(text)
    data["preprocessing"] = dict(FROZEN_TRUNK, region_dim=16)
    text = json.dumps(data, indent=2) + "\n"
    assert json.dumps(Manifest.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text


def _preprocessing(change):
    def apply(data):
        change(data["preprocessing"])

    return apply


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(preprocessing=[224]), r"bad field preprocessing \(object\)"),
        (_preprocessing(lambda p: p.pop("region_dim")), r"bad field preprocessing\.region_dim \(integer >= 1\)"),
        (_preprocessing(lambda p: p.update(grid="7")), r"bad field preprocessing\.grid \(integer >= 1, or absent\)"),
        (_preprocessing(lambda p: p.update(size=True)), r"bad field preprocessing\.size \(integer >= 1"),
        (_preprocessing(lambda p: p.update(mean=[0.5, 0.5])), r"bad field preprocessing\.mean \(3 finite numbers"),
        (_preprocessing(lambda p: p.update(std=[0.5, 0.0, 0.5])), r"bad field preprocessing\.std \(positive numbers\)"),
        (_preprocessing(lambda p: p.pop("std")), r"bad field preprocessing\.std \(size, mean and std come together\)"),
        (_preprocessing(lambda p: p.update(resample="bicubic")), r"bad field preprocessing\.resample \(one of \('bilinear',\)"),
        (_preprocessing(lambda p: p.update(crop="centre")), r"bad field preprocessing\.crop \(unknown; known: \['size'"),
        (_preprocessing(lambda p: p.update(boxes=4)), r"bad field preprocessing\.boxes \(string, or absent\)"),
        (_preprocessing(lambda p: p.update(region_count=36)), r"bad field preprocessing\.region_count \(the grid's cells"),
        (_preprocessing(lambda p: p.update(region_count=49)), r"bad field preprocessing\.region_count \(49 > limits\.max_regions\)"),
        (_preprocessing(lambda p: p.update(image_tuned_blocks=2)), r"bad field preprocessing\.image_tuned_blocks \(needs region_count"),
        (_preprocessing(lambda p: p.update(image_tuned_blocks=0)), r"bad field preprocessing\.image_tuned_blocks \(integer >= 1"),
        (
            _preprocessing(lambda p: p.update(region_dim=12)),
            r"bad field preprocessing\.region_dim \(12; the image_encoder's regions have 16",
        ),
        (
            lambda d: (
                d["graphs"].update(image_backbone=d["graphs"]["image_encoder"]),
                d.update(preprocessing=dict(REGION_FEATURES, region_dim=16)),
            ),
            r"bad field preprocessing \(the image_backbone graph needs its grid and size\)",
        ),
    ],
)
def test_bad_preprocessing_is_refused_naming_the_field(tmp_path, change, message):
    root = tmp_path / "m"
    make_dir(root)
    _rewrite(root, change)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(root, verify=False)
    assert str(info.value).startswith(str(root / MANIFEST_FILE))


def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(ManifestError, match="model directory does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(tmp_path / "empty")
    root = tmp_path / "m"
    make_dir(root)
    (root / MANIFEST_FILE).write_text('{"format": "teran-model-dir", ')
    with pytest.raises(ManifestError, match="corrupt manifest \\(not valid JSON"):
        load_manifest(root)
    (root / MANIFEST_FILE).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="corrupt manifest"):
        load_manifest(root)
    (root / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        load_manifest(root)
    assert issubclass(ManifestError, TeranInputError)


def test_graph_lookup_errors(tmp_path):
    manifest = make_dir(tmp_path / "m")
    with pytest.raises(ManifestError, match="no 'image_backbone' graph"):
        manifest.graph("image_backbone")
    with pytest.raises(ManifestError, match="unknown precision"):
        manifest.graph("text_encoder").file("int4")
    with pytest.raises(ManifestError, match="no int8 variant"):  # int8 is known (issue 15) but this directory has none
        manifest.graph("text_encoder").file("int8")


def test_manifest_module_does_not_import_torch():
    code = "import sys, teran.manifest; sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0
