"""The published TERAN architecture (teran.original): exact checkpoint layout, round trip, errors."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from teran.errors import CheckpointError
from teran.model import word_mask
from teran.original import (
    OriginalTeran,
    OriginalTeranConfig,
    infer_config,
    load_original_checkpoint,
    save_original_checkpoint,
    word_mask_compat,
)

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "docs" / "teran-state-dict-keys.txt"

TINY = OriginalTeranConfig(
    feature_dim=12,
    visual_dim=16,
    visual_layers=2,
    visual_heads=4,
    visual_ff=24,
    joint_dim=8,
    joint_layers=2,
    joint_heads=2,
    joint_ff=16,
    bert_hidden=12,
    bert_layers=2,
    bert_heads=3,
    bert_intermediate=20,
    bert_max_positions=32,
    vocab_size=50,
)
HEADS = OriginalTeranConfig(visual_heads=4, joint_heads=2, bert_heads=3)  # what shapes cannot tell


def _published_layout(shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, shape = line.partition(" ")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if shared and name.startswith("img_txt_enc.transformer_encoder_2."):
            continue
        rows.append((name, dims))
    return rows


@pytest.mark.skipif(not KEYS_FILE.is_file(), reason="shared/docs/teran-state-dict-keys.txt not present")
@pytest.mark.parametrize(("shared", "count", "params"), [(False, 212, 215.5e6), (True, 188, 198.7e6)])
def test_full_size_layout_matches_published_keys(shared, count, params):
    with torch.device("meta"):
        model = OriginalTeran(OriginalTeranConfig(shared_transformer=shared))
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = _published_layout(shared)
    assert len(expected) == count
    assert dict(layout) == dict(expected)
    assert [k for k, _ in layout] == [k for k, _ in expected]  # same order as the original module tree
    assert not any(k.endswith("position_ids") for k, _ in layout)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    enc = model.img_txt_enc
    assert enc.txt_enc.word_embeddings is enc.txt_enc.bert_model.embeddings.word_embeddings
    assert infer_config({k: torch.empty(s, device="meta") for k, s in expected}) == OriginalTeranConfig(shared_transformer=shared)


def _image_batch(cfg: OriginalTeranConfig, scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    features = torch.rand(2, 5, cfg.feature_dim, generator=g)
    xy = torch.rand(2, 5, 2, generator=g) * 300
    wh = torch.rand(2, 5, 2, generator=g) * 200 + 10
    boxes = torch.cat([xy, xy + wh], dim=-1) * scale
    sizes = torch.tensor([[640.0, 480.0], [500.0, 520.0]]) * scale
    mask = torch.tensor([[True] * 5, [True, True, True, True, False]])
    return features, boxes, sizes, mask


def _text_batch():
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 3], [2, 21, 22, 23, 3, 0, 0]])
    return ids, (ids != 0).long()


@pytest.fixture(params=[False, True], ids=["separate", "shared"])
def tiny_model(request):
    torch.manual_seed(0)
    return OriginalTeran(replace(TINY, shared_transformer=request.param)).eval()


def _check_encoded(out, n: int, mask: torch.Tensor, dim: int):
    assert out.global_vec.shape == (2, dim)
    assert out.concepts.shape == (2, n, dim)
    assert torch.equal(out.concept_mask, mask)
    assert torch.allclose(out.global_vec.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.concepts.norm(dim=-1), torch.ones(2, n), atol=1e-5)


def test_round_trip_through_original_container(tiny_model, tmp_path):
    cfg = tiny_model.config
    image, text = _image_batch(cfg), _text_batch()
    with torch.no_grad():
        img_before = tiny_model.encode_image(*image)
        txt_before = tiny_model.encode_text(*text)
    path = tmp_path / "model_best.pth.tar"
    save_original_checkpoint(path, tiny_model, None, epoch=7, eiters=1234, opt={"lr": 1e-5})
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert set(raw) == {"epoch", "model", "optimizer", "scheduler", "opt", "config", "Eiters"}
    assert len(raw["model"]) == len(tiny_model.state_dict())

    loaded, info = load_original_checkpoint(path, trusted=True, config=HEADS)
    assert info["model_config"] == cfg
    assert info["shared_transformer"] == cfg.shared_transformer
    assert (info["epoch"], info["Eiters"], info["opt"]) == (7, 1234, {"lr": 1e-5})
    assert info["config"]["model"]["shared-transformer"] == cfg.shared_transformer
    assert not loaded.training
    before, after = tiny_model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    txt_enc = loaded.img_txt_enc.txt_enc
    assert txt_enc.word_embeddings is txt_enc.bert_model.embeddings.word_embeddings
    assert torch.equal(txt_enc.bert_model.embeddings.position_ids[0], torch.arange(cfg.bert_max_positions))

    with torch.no_grad():
        img_after = loaded.encode_image(*image)
        txt_after = loaded.encode_text(*text)
    for a, b in zip(img_before, img_after, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    for a, b in zip(txt_before, txt_after, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    _check_encoded(img_after, 5, image[3], cfg.joint_dim)
    # Compat mask: tokens 1 .. len-3, i.e. [CLS], [SEP] and the last real word piece dropped.
    compat = torch.tensor([[True, True, True, True, False, False], [True, True, False, False, False, False]])
    _check_encoded(txt_after, 6, compat, cfg.joint_dim)


def test_image_boxes_are_normalised_by_image_size(tiny_model):
    with torch.no_grad():
        a = tiny_model.encode_image(*_image_batch(tiny_model.config))
        b = tiny_model.encode_image(*_image_batch(tiny_model.config, scale=3.0))
    assert torch.allclose(a.concepts, b.concepts, atol=1e-5)
    assert torch.allclose(a.global_vec, b.global_vec, atol=1e-5)


def test_word_masks():
    _, attention = _text_batch()
    assert torch.equal(word_mask_compat(attention), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool())
    # The project's own mask keeps the last real word piece; compat drops exactly one more token per caption.
    assert torch.equal(word_mask(attention).sum(1) - word_mask_compat(attention).sum(1), torch.tensor([1, 1]))


def test_encode_text_project_mask_option(tiny_model):
    ids, attention = _text_batch()
    with torch.no_grad():
        out = tiny_model.encode_text(ids, attention, compat_mask=False)
    assert torch.equal(out.concept_mask, word_mask(attention))


# --------------------------------------------------------------------------- errors


def _container(state: dict) -> dict:
    return {"epoch": 0, "model": state, "optimizer": None, "opt": None, "config": {}, "Eiters": 0}


@pytest.fixture
def tiny_state():
    torch.manual_seed(0)
    return OriginalTeran(TINY).state_dict()


def _expect_error(path: Path, *fragments: str, **kwargs):
    with pytest.raises(CheckpointError) as info:
        load_original_checkpoint(path, **{"trusted": True, "config": HEADS, **kwargs})
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_key(tiny_state, tmp_path):
    del tiny_state["img_txt_enc.cap_proj.bias"]
    path = tmp_path / "missing.pth.tar"
    torch.save(_container(tiny_state), path)
    _expect_error(path, "missing keys", "img_txt_enc.cap_proj.bias")


def test_unexpected_key(tiny_state, tmp_path):
    tiny_state["img_txt_enc.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth.tar"
    torch.save(_container(tiny_state), path)
    _expect_error(path, "unexpected keys", "img_txt_enc.extra.weight")


def test_wrong_shape(tiny_state, tmp_path):
    tiny_state["img_txt_enc.cap_proj.weight"] = torch.zeros(8, 13)
    path = tmp_path / "shape.pth.tar"
    torch.save(_container(tiny_state), path)
    _expect_error(path, "wrong shapes", "img_txt_enc.cap_proj.weight")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth.tar"
    path.write_bytes(os.urandom(4096))
    _expect_error(path, "not a readable torch checkpoint")


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nowhere.pth.tar", "does not exist")


def test_untrusted_refused_before_reading(tiny_state, tmp_path):
    path = tmp_path / "ok.pth.tar"
    torch.save(_container(tiny_state), path)
    _expect_error(path, "trusted=True", "weights_only=False", trusted=False)
    with pytest.raises(CheckpointError):
        load_original_checkpoint(path)  # trusted defaults to False
    load_original_checkpoint(path, trusted=True, config=HEADS)  # the same file loads when trusted


def test_project_checkpoint_and_foreign_containers(tmp_path):
    project = tmp_path / "ours.pt"
    torch.save({"format": "teran-project-checkpoint", "format_version": 1, "state_dict": {}}, project)
    _expect_error(project, "teran.checkpoint.load_model")
    no_model = tmp_path / "no_model.pth.tar"
    torch.save({"epoch": 1}, no_model)
    _expect_error(no_model, "'model'")
    a_list = tmp_path / "list.pth.tar"
    torch.save([1, 2, 3], a_list)
    _expect_error(a_list, "'model'")


def test_heads_not_dividing_inferred_dims(tiny_state, tmp_path):
    path = tmp_path / "heads.pth.tar"
    torch.save(_container(tiny_state), path)
    _expect_error(path, "bert_hidden=12 is not divisible by bert_heads=5", config=replace(HEADS, bert_heads=5))
