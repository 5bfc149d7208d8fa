import pytest
import torch

from teran.checkpoint import load_model, read_checkpoint, save_checkpoint
from teran.config import ModelConfig
from teran.errors import CheckpointError, TeranInputError
from teran.model import TeranModel, word_mask

TINY = ModelConfig(region_dim=12, text_hidden_dim=10, visual_dim=16, visual_layers=1, joint_dim=8, joint_layers=1, heads=2)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return TeranModel(TINY).eval()


def _image_inputs(batch=3, regions=5):
    regions_t = torch.randn(batch, regions, TINY.region_dim)
    boxes = torch.rand(batch, regions, 4).sort(dim=-1).values
    mask = torch.ones(batch, regions, dtype=torch.bool)
    if batch > 1:
        mask[1, 3:] = False
    return regions_t, boxes, mask


def test_image_branch_outputs_normalised_vectors_and_masks(model):
    regions, boxes, mask = _image_inputs()
    out = model.image(regions, boxes, mask)
    assert out.global_vec.shape == (3, 8) and out.concepts.shape == (3, 5, 8)
    torch.testing.assert_close(out.global_vec.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.concepts.norm(dim=-1), torch.ones(3, 5))
    assert torch.equal(out.concept_mask, mask)


def test_padded_regions_do_not_change_real_outputs(model):
    regions, boxes, mask = _image_inputs(batch=1, regions=3)
    alone = model.image(regions, boxes, mask)
    padded = model.image(
        torch.cat([regions, torch.randn(1, 2, TINY.region_dim)], 1),
        torch.cat([boxes, torch.rand(1, 2, 4)], 1),
        torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(alone.global_vec, padded.global_vec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.concepts, padded.concepts[:, :3], atol=1e-5, rtol=1e-5)


def test_text_word_mask_drops_cls_and_sep():
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # positions 1..: [w, w, w, SEP] and [w, SEP, pad, pad]
    assert word_mask(attention).tolist() == [[True, True, True, False], [True, False, False, False]]


def test_text_head_handles_padding(model):
    hidden = torch.randn(2, 6, TINY.text_hidden_dim)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = model.text(hidden, attention)
    assert out.concepts.shape == (2, 5, 8) and not torch.isnan(out.concepts).any()
    short = model.text(hidden[1:, :3], attention[1:, :3])
    torch.testing.assert_close(short.global_vec, out.global_vec[1:], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path, model):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, epoch=3)
    loaded, payload = load_model(path)
    assert payload["epoch"] == 3 and loaded.config == TINY
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not (tmp_path / "m.pt.tmp").exists()


def test_checkpoint_errors_name_the_file(tmp_path, model):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint file does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        read_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a teran-project-checkpoint file"):
        read_checkpoint(other)
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, model)
    payload = torch.load(wrong, weights_only=True)
    payload["model_config"]["joint_dim"] = 16
    torch.save(payload, wrong)
    with pytest.raises(CheckpointError, match="wrong.pt: weights do not match the model config"):
        load_model(wrong)


SHORTCUT = {mode: ModelConfig(**{**TINY.__dict__, "pooled_shortcut": mode}) for mode in ("global", "all")}


@pytest.mark.parametrize("mode", ["global", "all"])
def test_pooled_shortcut_ignores_padding(mode):
    torch.manual_seed(0)
    model = TeranModel(SHORTCUT[mode]).eval()
    regions, boxes, mask = _image_inputs(batch=1, regions=3)
    alone = model.image(regions, boxes, mask)
    padded = model.image(
        torch.cat([regions, 100 * torch.randn(1, 2, TINY.region_dim)], 1),
        torch.cat([boxes, torch.rand(1, 2, 4)], 1),
        torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(alone.global_vec, padded.global_vec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.concepts, padded.concepts[:, :3], atol=1e-5, rtol=1e-5)
    hidden = torch.randn(1, 6, TINY.text_hidden_dim)
    short = model.text(hidden[:, :4], torch.ones(1, 4, dtype=torch.long))
    long = model.text(torch.cat([hidden[:, :4], 50 * hidden[:, 4:]], 1), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(short.global_vec, long.global_vec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["global", "all"])
def test_pooled_shortcut_reaches_the_vectors_its_mode_names(mode):
    """A zero shortcut gives the plain model's outputs; a non-zero one moves the global vector,
    and the concepts too only in mode "all"."""
    torch.manual_seed(0)
    plain = TeranModel(TINY).eval()
    model = TeranModel(SHORTCUT[mode]).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".shortcut." in key for key in missing)
    regions, boxes, mask = _image_inputs()
    hidden, attention = torch.randn(3, 6, TINY.text_hidden_dim), torch.ones(3, 6, dtype=torch.long)
    for branch in (model.image.shortcut, model.text.shortcut):
        torch.nn.init.zeros_(branch.projection.weight)
        torch.nn.init.zeros_(branch.projection.bias)

    def pairs():
        image = (model.image(regions, boxes, mask), plain.image(regions, boxes, mask))
        return image, (model.text(hidden, attention), plain.text(hidden, attention))

    for got, want in pairs():
        torch.testing.assert_close(got.global_vec, want.global_vec)
        torch.testing.assert_close(got.concepts, want.concepts)
    for branch in (model.image.shortcut, model.text.shortcut):
        torch.nn.init.normal_(branch.projection.bias, std=5.0)
    for got, want in pairs():
        assert (got.global_vec - want.global_vec).abs().max() > 0.1
        concepts_moved = (got.concepts - want.concepts).abs().max() > 0.1
        assert concepts_moved == (mode == "all")


def test_pooled_shortcut_is_the_masked_mean_through_norm_and_projection():
    torch.manual_seed(0)
    shortcut = TeranModel(SHORTCUT["all"]).eval().image.shortcut
    features, mask = torch.randn(2, 4, TINY.region_dim), torch.tensor([[True, True, False, False], [True, True, True, True]])
    expected = torch.stack([features[0, :2].mean(0), features[1].mean(0)])
    torch.testing.assert_close(shortcut(features, mask), shortcut.projection(shortcut.norm(expected)))


def test_pooled_shortcut_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TeranModel(SHORTCUT["all"]).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.config.pooled_shortcut == "all"
    regions, boxes, mask = _image_inputs()
    torch.testing.assert_close(loaded.image(regions, boxes, mask).concepts, model.image(regions, boxes, mask).concepts)


def test_unknown_shortcut_mode_is_a_clear_error(tmp_path):
    with pytest.raises(TeranInputError, match=r"pooled_shortcut 'mean' is not one of \['none', 'global', 'all'\]"):
        ModelConfig(pooled_shortcut="mean")
    model = TeranModel(TINY)
    save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["model_config"]["pooled_shortcut"] = "mean"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad model config.*pooled_shortcut"):
        load_model(tmp_path / "bad.pt")


TUNED = ModelConfig(**{**TINY.__dict__, "text_tuned_layers": 2, "text_tuned_heads": 2})


def test_tuned_text_layers_are_bert_layers_with_the_same_outputs():
    """A BertModel's top layers copied into the head's stack compute exactly what they computed in BERT."""
    from transformers import BertConfig, BertModel

    from teran.backbones import bert_layer_stack, copy_bert_layers

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64), add_pooling_layer=False
    ).eval()
    ids = torch.randint(1, 50, (2, 7))
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, 4:] = 0
    with torch.no_grad():
        full = bert(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        stack = bert_layer_stack(2, width=16, heads=2, dropout=0.0).eval()
        copy_bert_layers(stack, bert.encoder.layer[1:])
        ours = stack(full.hidden_states[1], src_key_padding_mask=~attention.bool())
    real = attention.bool()
    torch.testing.assert_close(ours[real], full.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 layers in the stack, 1 BERT layers given"):
        copy_bert_layers(stack, bert.encoder.layer[2:])


def test_tuned_text_layers_ignore_padding_and_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TeranModel(TUNED).eval()
    assert len(model.text.tuned.layers) == 2
    hidden = torch.randn(1, 5, TINY.text_hidden_dim)
    attention = torch.ones(1, 5, dtype=torch.long)
    alone = model.text(hidden, attention)
    padded = model.text(
        torch.cat([hidden, torch.randn(1, 3, TINY.text_hidden_dim)], 1), torch.cat([attention, torch.zeros(1, 3, dtype=torch.long)], 1)
    )
    torch.testing.assert_close(padded.global_vec, alone.global_vec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.concepts[:, :4], alone.concepts, atol=1e-5, rtol=1e-5)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.text(hidden, attention).concepts, alone.concepts)
    # The tuned layers change the output: the same weights without them give other vectors.
    plain = TeranModel(TINY).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("text.tuned.")})
    assert (plain.text(hidden, attention).global_vec - alone.global_vec).abs().max() > 1e-3


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"text_tuned_layers": 7}, r"text_tuned_layers must be an integer within 0..6, got 7"),
        ({"text_tuned_layers": -1}, r"text_tuned_layers must be an integer within 0..6, got -1"),
        ({"text_tuned_layers": 1.5}, r"text_tuned_layers must be an integer within 0..6, got 1.5"),
        ({"text_tuned_layers": 1, "text_tuned_heads": 3}, r"text_tuned_heads 3 must divide text_hidden_dim 10"),
    ],
)
def test_bad_tuned_layer_settings_are_clear_errors(settings, message):
    with pytest.raises(TeranInputError, match=message):
        ModelConfig(**{**TINY.__dict__, **settings})


def test_truncated_image_trunk_plus_the_pretrained_tuned_stage_is_the_whole_trunk():
    """The grid below the top blocks, run through their pretrained copies, gives the full trunk's regions."""
    from teran.backbones import GridImageBackbone, TunedImageStage

    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        whole, boxes = GridImageBackbone()(pixels)
        below, below_boxes = GridImageBackbone(drop_top_blocks=2)(pixels)
        stage = TunedImageStage(2, pretrained=True).eval()
        ours = stage(below.transpose(1, 2).reshape(2, 192, 7, 7)).flatten(2).transpose(1, 2)
    assert whole.shape == (2, 49, 1280) and below.shape == (2, 49, 192)
    torch.testing.assert_close(ours, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(below_boxes, boxes)
    with pytest.raises(ValueError, match=r"image trunk top blocks must be within 0..4 \(those on its final grid\), got 5"):
        GridImageBackbone(drop_top_blocks=5)


TUNED_IMAGE = ModelConfig(**{**TINY.__dict__, "region_dim": 1280, "image_tuned_blocks": 1, "image_grid": 3})


def test_tuned_image_stage_keeps_its_batch_norm_statistics_in_training_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TeranModel(TUNED_IMAGE)
    assert TUNED_IMAGE.image_input_dim == 192 and TUNED_IMAGE.image_input_regions == 9
    grid = torch.randn(4, 9, 192)
    boxes = torch.rand(4, 9, 4).sort(dim=-1).values
    mask = torch.ones(4, 9, dtype=torch.bool)
    before = {k: v.clone() for k, v in model.image.tuned.state_dict().items() if "running" in k}
    model.train()
    out = model.image(grid, boxes, mask)
    out.global_vec.sum().backward()
    assert out.concepts.shape == (4, 9, TINY.joint_dim)
    assert model.image.tuned.head_conv.weight.grad.abs().sum() > 0  # the stage learns ...
    after = {k: v for k, v in model.image.tuned.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # ... but its statistics stay the pretrained ones
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.config.image_tuned_blocks == 1
    with pytest.raises(ValueError, match=r"the tuned image stage takes the backbone's 3x3 grid \(9 regions\), got 8 regions"):
        model.image(grid[:, :8], boxes[:, :8], mask[:, :8])
    torch.testing.assert_close(loaded.image(grid, boxes, mask).concepts, model.image(grid, boxes, mask).concepts)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"image_tuned_blocks": 5}, r"image_tuned_blocks must be an integer within 0..4 \(the trunk's blocks on its final grid\), got 5"),
        ({"image_tuned_blocks": -1}, r"image_tuned_blocks must be an integer within 0..4 .*, got -1"),
        ({"image_tuned_blocks": 1}, r"region_dim must be 1280 \(the image trunk's head output\) when image_tuned_blocks is set, got 12"),
        ({"image_tuned_blocks": 1, "region_dim": 1280, "image_grid": 0}, r"image_grid must be an integer within 1..32, got 0"),
    ],
)
def test_bad_tuned_image_settings_are_clear_errors(settings, message):
    with pytest.raises(TeranInputError, match=message):
        ModelConfig(**{**TINY.__dict__, **settings})
