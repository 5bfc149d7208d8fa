"""python -m export on a tiny random model: dynamic axes, parity with torch, manifest, atomicity, refusals, Triton."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf.json_format import MessageToDict
from torch_fixtures import TinyGridBackbone
from transformers import BertConfig, BertModel

from export import exporter
from export.cli import main as export_main
from export.exporter import ExportError, export_model_dir
from export.sources import load_source
from teran.checkpoint import save_checkpoint
from teran.config import ModelConfig
from teran.errors import CheckpointError, TeranInputError
from teran.hubness import HubReference
from teran.manifest import MANIFEST_FILE, ManifestError, load_manifest
from teran.model import TeranModel, TextEncoder

pytestmark = pytest.mark.slow  # torch.onnx.export of every graph

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(
    region_dim=16,
    text_hidden_dim=32,
    visual_dim=32,
    visual_layers=1,
    joint_dim=24,
    joint_layers=1,
    heads=2,
    feedforward_mult=2,
    dropout=0.0,
    max_regions=20,
    max_tokens=16,
    pooled_shortcut="all",
    text_tuned_layers=1,
    text_tuned_heads=2,
)
VOCAB = 120


def tiny_backbone() -> TinyGridBackbone:
    return TinyGridBackbone(channels=TINY.region_dim)


def tiny_bert() -> BertModel:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=TINY.text_hidden_dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def make_checkpoint(path: Path, seed: int) -> TeranModel:
    torch.manual_seed(seed)
    model = TeranModel(TINY).eval()
    rng = np.random.default_rng(seed)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.standard_normal((n, TINY.joint_dim)))  # noqa: E731
    hub = HubReference(unit(4).astype(np.float32), unit(9).astype(np.float32), k=2, weight=0.5)
    save_checkpoint(path, model, train_config={"loss": {"alignment_mode": "MrSw"}}, blend_weight=0.1, hub_reference=hub.to_checkpoint())
    return model


def tiny_source(checkpoint: Path, **kwargs):
    torch.manual_seed(2)
    return load_source(checkpoint, "project", text_backbone=tiny_bert(), image_backbone=tiny_backbone(), **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "tiny.pt"
    make_checkpoint(checkpoint, seed=0)
    source = tiny_source(checkpoint)
    out = root / "models" / "tiny"
    manifest = export_model_dir(source, out, name="tiny", version=3, max_batch=8, progress=None)
    return {"root": root, "checkpoint": checkpoint, "source": source, "out": out, "manifest": manifest}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _masked_diff(ref: torch.Tensor, out: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(ref.numpy() - out)
    return float((diff[mask] if mask is not None else diff).max(initial=0.0))


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 3e-2)])
@pytest.mark.parametrize("batch,length", [(1, 3), (4, 13), (6, 16)])
def test_text_graph_matches_torch_at_new_shapes(exported, precision, tol, batch, length):
    manifest, source = exported["manifest"], exported["source"]
    session = _session(manifest.graph_path(exported["out"], "text_encoder", precision))
    torch.manual_seed(batch * 100 + length)
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, max(2, length - 2) :] = 0  # padding in the last row
    with torch.no_grad():
        ref = source.graphs["text_encoder"].module(ids, mask)
    out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert [o.shape for o in out] == [(batch, TINY.joint_dim), (batch, length - 1, TINY.joint_dim), (batch, length - 1)]
    assert out[0].dtype == np.float32 and out[1].dtype == np.float32 and out[2].dtype == np.bool_
    assert np.array_equal(out[2], ref[2].numpy())
    assert _masked_diff(ref[0], out[0]) <= tol
    assert _masked_diff(ref[1], out[1], ref[2].numpy()) <= tol


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 3e-2)])
@pytest.mark.parametrize("batch,regions", [(1, 1), (5, 17)])
def test_image_graphs_match_torch_at_new_shapes(exported, precision, tol, batch, regions):
    manifest, source, out_dir = exported["manifest"], exported["source"], exported["out"]
    torch.manual_seed(regions)
    feats = torch.rand(batch, regions, TINY.region_dim)
    xy = torch.rand(batch, regions, 2) * 0.5
    boxes = torch.cat([xy, xy + 0.3], dim=-1)
    mask = torch.ones(batch, regions, dtype=torch.bool)
    mask[-1, regions // 2 + 1 :] = False
    with torch.no_grad():
        ref = source.graphs["image_encoder"].module(feats, boxes, mask)
    out = _session(manifest.graph_path(out_dir, "image_encoder", precision)).run(
        None, {"regions": feats.numpy(), "boxes": boxes.numpy(), "region_mask": mask.numpy()}
    )
    assert out[1].shape == (batch, regions, TINY.joint_dim)
    assert _masked_diff(ref[0], out[0]) <= tol
    assert _masked_diff(ref[1], out[1], mask.numpy()) <= tol

    pixels = torch.randn(batch + 2, 3, 224, 224)
    with torch.no_grad():
        ref_regions, ref_boxes, _ = source.graphs["image_backbone"].module(pixels)
    regions_out, boxes_out, mask_out = _session(manifest.graph_path(out_dir, "image_backbone", precision)).run(
        None, {"pixels": pixels.numpy()}
    )
    assert regions_out.shape == (batch + 2, 49, TINY.region_dim) and mask_out.all()
    scale = max(1.0, float(ref_regions.abs().max()))
    assert _masked_diff(ref_regions, regions_out) <= tol * scale
    assert _masked_diff(ref_boxes, boxes_out) <= max(tol, 1e-6)


def test_manifest_describes_the_directory(exported):
    out = exported["out"]
    loaded = load_manifest(out, verify=True)
    assert loaded.model_name == "tiny" and loaded.model_version == 3
    assert loaded.source.kind == "project" and loaded.source.sha256 == exported["source"].checkpoint_sha256
    assert loaded.joint_dim == TINY.joint_dim
    assert (loaded.limits.max_tokens, loaded.limits.max_regions, loaded.limits.max_batch) == (16, 20, 8)
    assert loaded.concept_mode == "words" and loaded.alignment_mode == "MrSw"
    assert loaded.preprocessing.size == 224 and loaded.preprocessing.grid == 7 and loaded.preprocessing.region_count is None
    assert loaded.pixel_spec().size == 224
    written = json.loads((out / MANIFEST_FILE).read_text())["preprocessing"]
    assert list(written) == ["size", "mean", "std", "resample", "grid", "region_dim", "boxes", "layout"]  # the on-disk keys
    text = loaded.graph("text_encoder")
    assert [(t.name, t.dtype) for t in text.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    assert [t.shape for t in text.inputs] == [("batch", "tokens")] * 2
    assert [(t.name, t.dtype) for t in text.outputs] == [("global", "float32"), ("concepts", "float32"), ("concept_mask", "bool")]
    assert text.outputs[1].shape == ("batch", "tokens - 1", TINY.joint_dim)
    image = loaded.graph("image_encoder")
    assert [t.shape for t in image.inputs] == [("batch", "regions", 16), ("batch", "regions", 4), ("batch", "regions")]
    assert [t.dtype for t in loaded.graph("image_backbone").outputs] == ["float32", "float32", "bool"]
    for entry in loaded.graphs.values():
        assert entry.ort_optimization == "basic" and entry.opset >= 18
        assert entry.fp32.endswith(".fp32.onnx") and entry.fp16.endswith(".fp16.onnx")
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(loaded.files) == on_disk
    assert "tokenizer.json" in loaded.files
    # the served ranking: the blend weight and the hub penalty's reference, from the checkpoint
    assert loaded.blend_weight == pytest.approx(0.1) and (loaded.hub_penalty["k"], loaded.hub_penalty["weight"]) == (2, 0.5)
    reference = HubReference.load(out, loaded.hub_penalty)
    assert reference.images.shape == (4, TINY.joint_dim) and reference.captions.shape == (9, TINY.joint_dim)
    assert loaded.extra["export_checks"]["text_encoder"]["fp32_max_abs_diff"] <= 1e-4
    assert not list(out.parent.glob(".tiny.*"))  # no temporary folders left beside it


def test_tampered_file_is_detected(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported["out"], copy)
    target = copy / exported["manifest"].graph("image_encoder").fp16
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="image_encoder.fp16.onnx: checksum mismatch"):
        load_manifest(copy)
    load_manifest(copy, verify=False)  # the manifest itself is fine


def test_refuses_a_directory_holding_a_different_model(exported, tmp_path, capsys):
    other = tmp_path / "other.pt"
    make_checkpoint(other, seed=5)
    source = tiny_source(other)
    with pytest.raises(ExportError, match="already holds a different model.*--force"):
        export_model_dir(source, exported["out"], name="tiny", version=3, progress=None)
    with pytest.raises(ExportError, match="different model"):  # same checkpoint, another version
        export_model_dir(exported["source"], exported["out"], name="tiny", version=4, progress=None)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds no valid model"):
        export_model_dir(source, junk, progress=None)
    assert (junk / "notes.txt").read_text() == "mine"
    load_manifest(exported["out"])  # untouched


def test_cli_refuses_a_different_model(exported, tmp_path, monkeypatch, capsys):
    import export.sources

    other = tmp_path / "other.pt"
    make_checkpoint(other, seed=7)
    real = export.sources.load_source
    monkeypatch.setattr(
        export.sources,
        "load_source",
        lambda path, kind, **kw: real(path, kind, text_backbone=tiny_bert(), image_backbone=tiny_backbone(), **kw),
    )
    args = ["--checkpoint", str(other), "--output", str(exported["out"]), "--name", "tiny", "--version", "3"]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "already holds a different model" in err and "--force" in err
    load_manifest(exported["out"])


def test_failure_mid_export_leaves_nothing_that_looks_valid(exported, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = exporter.convert_fp16

    def fail_second(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(exporter, "convert_fp16", fail_second)
    # The small image graphs only (keeps the test fast): fails after image_encoder is complete
    # and image_backbone's fp32 file is written.
    source = dataclasses.replace(exported["source"], graphs={k: exported["source"].graphs[k] for k in ("image_encoder", "image_backbone")})
    # A fresh target: nothing may appear.
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportError, match="disk full.*nothing was written"):
        export_model_dir(source, fresh, name="tiny", progress=None)
    assert not fresh.exists()
    assert list(tmp_path.iterdir()) == []
    # Replacing an existing model with --force: the old one must survive intact.
    existing = tmp_path / "existing"
    shutil.copytree(exported["out"], existing)
    calls["n"] = 1  # fail on the first graph this time
    with pytest.raises(ExportError, match="disk full"):
        export_model_dir(source, existing, name="other", force=True, progress=None)
    assert load_manifest(existing).model_name == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_unknown_checkpoint_layouts_give_clear_errors(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_source(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert export_main(["--checkpoint", str(garbage), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_flag:
        export_main(["--checkpoint", str(foreign), "--output", str(tmp_path / "out"), "--max-batch", "0"])
    assert bad_flag.value.code == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(TeranInputError):
        load_source(foreign, "project")


def test_cli_help_runs_without_torch_work():
    result = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--checkpoint-kind" in result.stdout and "--force" in result.stdout


def test_triton_repository_layout(exported):
    repo = exported["out"] / "triton"
    assert sorted(p.name for p in repo.iterdir()) == ["image_backbone", "image_encoder", "image_pipeline", "text_encoder"]
    for graph in ("text_encoder", "image_encoder", "image_backbone"):
        model = repo / graph / "3" / "model.onnx"
        fp32 = exported["out"] / exported["manifest"].graph(graph).fp32
        assert model.read_bytes() == fp32.read_bytes()
    text = (repo / "text_encoder" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 8" in text and "dims: [ -1 ]" in text
    assert 'name : "tensorrt"' in text and "trt_profile_max_shapes" in text and "input_ids:8x16,attention_mask:8x16" in text
    assert (repo / "text_encoder" / "warmup" / "attention_mask_ones").read_bytes() == (1).to_bytes(8, "little") * 16
    assert 'platform: "ensemble"' in (repo / "image_pipeline" / "config.pbtxt").read_text()


def test_triton_configs_parse_as_model_config(exported):
    """Every config.pbtxt parses into Triton's own ModelConfig protobuf (from tritonclient)."""
    from export.triton import parse_config, validate_repository

    root = exported["out"] / "triton"
    assert validate_repository(root) == []
    configs = {p.parent.name: MessageToDict(parse_config(p)) for p in sorted(root.glob("*/config.pbtxt"))}
    assert set(configs) == {"text_encoder", "image_encoder", "image_backbone", "image_pipeline"}
    text = configs["text_encoder"]
    assert text["maxBatchSize"] == 8 and text["platform"] == "onnxruntime_onnx"
    assert [i["dims"] for i in text["input"]] == [["-1"], ["-1"]]
    assert text["output"][1]["dims"] == ["-1", str(TINY.joint_dim)]
    assert text["dynamicBatching"]["preferredBatchSize"] == [4, 8]
    assert text["instanceGroup"][0]["kind"] == "KIND_GPU"
    trt = text["optimization"]["executionAccelerators"]["gpuExecutionAccelerator"][0]
    assert trt["name"] == "tensorrt" and trt["parameters"]["precision_mode"] == "FP16"
    assert trt["parameters"]["trt_engine_cache_enable"] == "1"
    assert text["modelWarmup"][0]["batchSize"] == 8
    steps = configs["image_pipeline"]["ensembleScheduling"]["step"]
    assert [s["modelName"] for s in steps] == ["image_backbone", "image_encoder"]
    assert steps[1]["inputMap"] == {"regions": "_regions", "boxes": "_boxes", "region_mask": "_region_mask"}


def test_text_encoder_module_is_the_project_text_encoder(exported):
    """The exported text graph is TextEncoder(backbone, head) of the checkpoint, not a re-implementation."""
    module = exported["source"].graphs["text_encoder"].module
    assert isinstance(module.encode, TextEncoder)


def test_original_teran_checkpoint_exports(tmp_path):
    """An authors'-layout checkpoint (teran.original) exports behind --checkpoint-kind original."""
    from teran.original import OriginalTeran, OriginalTeranConfig, save_original_checkpoint

    cfg = OriginalTeranConfig(
        feature_dim=12, visual_dim=16, visual_layers=1, visual_heads=2, visual_ff=24, joint_dim=8, joint_layers=1,
        joint_heads=2, joint_ff=16, bert_hidden=12, bert_layers=1, bert_heads=3, bert_intermediate=20,
        bert_max_positions=32, vocab_size=50,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / "model_best.pth.tar"
    save_original_checkpoint(path, OriginalTeran(cfg).eval(), epoch=3)
    with pytest.raises(CheckpointError, match="--checkpoint-kind original"):
        load_source(path)  # auto never unpickles arbitrary objects
    source = load_source(path, "original", max_tokens=16, max_regions=12)
    manifest = export_model_dir(source, tmp_path / "orig", progress=None)
    assert manifest.source.kind == "original" and manifest.concept_mode == "compat" and manifest.joint_dim == 8
    assert set(manifest.graphs) == {"text_encoder", "image_encoder"}
    assert [t.name for t in manifest.graph("image_encoder").inputs] == ["regions", "boxes", "image_sizes", "region_mask"]
    assert manifest.preprocessing.grid is None and list(manifest.preprocessing.to_dict()) == ["region_dim", "boxes", "features"]
    assert sorted(p.name for p in (tmp_path / "orig" / "triton").iterdir()) == ["image_encoder", "text_encoder"]
    model = source.graphs["text_encoder"].module.model
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 16, 17, 3], [2, 21, 22, 23, 3, 0, 0, 0, 0], [2, 31, 32, 3, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model.encode_text(ids, mask)
    out = _session(manifest.graph_path(tmp_path / "orig", "text_encoder")).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    assert np.array_equal(out[2], ref.concept_mask.numpy())  # the compat quirk: last word piece dropped too
    assert _masked_diff(ref.global_vec, out[0]) <= 1e-4 and _masked_diff(ref.concepts, out[1], out[2]) <= 1e-4
    feats, boxes = torch.rand(4, 7, 12), torch.rand(4, 7, 4) * 100
    boxes[..., 2:] += boxes[..., :2]
    sizes = torch.tensor([[640.0, 480.0], [500.0, 375.0], [300.0, 300.0], [800.0, 600.0]])
    region_mask = torch.ones(4, 7, dtype=torch.bool)
    region_mask[2, 4:] = False
    with torch.no_grad():
        ref = model.encode_image(feats, boxes, sizes, region_mask)
    out = _session(manifest.graph_path(tmp_path / "orig", "image_encoder")).run(
        None, {"regions": feats.numpy(), "boxes": boxes.numpy(), "image_sizes": sizes.numpy(), "region_mask": region_mask.numpy()}
    )
    assert _masked_diff(ref.global_vec, out[0]) <= 1e-4 and _masked_diff(ref.concepts, out[1], region_mask.numpy()) <= 1e-4


@pytest.mark.parametrize("mode", ["MrSw", "MrAVGw", "symm"])
def test_parity_scoring_equals_teran_evaluate(mode):
    """export.parity scores length-sorted, trimmed caption chunks; it must equal teran.evaluate.score_both."""
    from export.parity import _scores
    from teran.evaluate import score_both
    from teran.model import Encoded

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    images = (unit(rng.normal(size=(7, 6))), unit(rng.normal(size=(7, 5, 6))), np.ones((7, 5), dtype=bool))
    lengths = rng.integers(1, 12, size=1100)
    mask = np.arange(14)[None, :] < lengths[:, None]
    texts = (unit(rng.normal(size=(1100, 6))), unit(rng.normal(size=(1100, 14, 6))), mask)
    ours = _scores(images, texts, mode)
    ref = score_both(*(Encoded(*(torch.from_numpy(x) for x in t)) for t in (images, texts)), mode)
    for name in ("alignment", "global"):
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-5)
