"""Training and evaluation CLIs end to end on a tiny Flickr8k-style folder (real backbones)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from teran import evaluate, train
from teran.checkpoint import read_checkpoint
from teran.hubness import HubReference

pytestmark = pytest.mark.slow  # trains and evaluates tiny models

WORDS = ["dog", "cat", "beach", "snow", "bike", "tree", "car", "boat"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows, names = ["image,caption"], []
    for index in range(12):
        name = f"img{index}.jpg"
        pixels = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / name, quality=90)
        names.append(name)
        word = WORDS[index % len(WORDS)]
        rows += [f"{name},a {word} number {index} , variant {k}" for k in range(5)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "train_images.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "dev_images.txt").write_text("\n".join(names[8:]) + "\n")
    return root


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "model: {visual_dim: 16, visual_layers: 1, joint_dim: 8, joint_layers: 1, heads: 2}\n"
        "epochs: 2\nbatch_size: 4\ncaptions_per_image: 2\nwarmup_steps: 2\nlr_decay_epoch: 1\neval_images: 4\nthreads: 1\n"
    )
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TERAN_CACHE_DIR", str(tmp_path / "cache"))


def test_train_resume_and_evaluate(data_dir, config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--output-dir", str(out), "--data-dir", str(data_dir), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 8 train images, batch 4, 2 rounds per epoch -> 4 steps per epoch.
    assert summary["steps"] == 8 and [h["epoch"] for h in summary["history"]] == [1, 2]
    assert (out / "best.pt").is_file() and read_checkpoint(out / "last.pt")["epoch"] == 1

    # Resuming a finished run with more epochs continues from the saved step count.
    assert (
        train.main(
            ["--config", str(config), "--output-dir", str(out), "--data-dir", str(data_dir), "--resume", "--epochs", "3", "--no-progress"]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    # The best checkpoint carries the hub penalty's reference: the 8 training photos and their 40 captions.
    hub = HubReference.from_checkpoint(read_checkpoint(out / "best.pt"))
    assert (hub.images.shape, hub.captions.shape, hub.k, hub.weight) == ((8, 8), (40, 8), 10, 0.5)
    np.testing.assert_allclose(np.linalg.norm(hub.captions.astype(np.float32), axis=1), 1.0, atol=2e-3)

    # Resuming with other model settings is refused before any work, naming what differs.
    changed = tmp_path / "changed.yaml"
    changed.write_text(config.read_text().replace("heads: 2}", "heads: 2, image_tuned_blocks: 1}"))
    assert train.main(["--config", str(changed), "--output-dir", str(out), "--data-dir", str(data_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'last.pt'}: was started with other model settings (image_tuned_blocks: 0 there, 1 now)" in err
    assert read_checkpoint(out / "last.pt")["epoch"] == 2  # untouched

    report_path = tmp_path / "eval.json"
    code = evaluate.main(
        ["--checkpoint", str(out / "best.pt"), "--split", "dev", "--data-dir", str(data_dir), "--output", str(report_path)]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["n_images"] == 4 and report["n_captions"] == 20 and report["command"].startswith("python -m teran.evaluate")
    for score in ("alignment", "global"):
        for direction in ("i2t", "t2i"):
            values = report[score][direction]
            assert 0 <= values["r1"] <= values["r5"] <= values["r10"] <= 100.0
            assert 0 < values["ndcg_rougeL"] <= 1
        assert report[score]["t2i"]["r5"] == 100.0  # only 4 images to rank
        assert report[score]["rsum"] == pytest.approx(sum(report[score][d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")))
    # The served ranking: the blend less the hub penalty of the checkpoint's reference.
    assert report["hub_penalty"].startswith("hub penalty 0.5 x mean of the 10 best cosines (8 photos, 40 captions)")
    assert set(report) >= {"blend", "served"} and report["served"]["t2i"]["r5"] == 100.0


def test_missing_image_is_a_clear_cli_error(data_dir, config, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in ("captions.txt", "train_images.txt", "dev_images.txt"):
        (broken / item).write_bytes((data_dir / item).read_bytes())
    (broken / "images").mkdir()
    for image in (data_dir / "images").iterdir():
        (broken / "images" / image.name).write_bytes(image.read_bytes())
    (broken / "images" / "img3.jpg").unlink()
    (broken / "images" / "img5.jpg").write_bytes(b"not a jpeg")
    code = train.main(["--config", str(config), "--output-dir", str(tmp_path / "r"), "--data-dir", str(broken), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "img3.jpg: image file does not exist" in err


def test_evaluate_rejects_a_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"garbage")
    assert evaluate.main(["--checkpoint", str(foreign)]) == 2
    assert "foreign.pt: not a readable checkpoint" in capsys.readouterr().err


def test_contrastive_training_resumes_with_its_learned_temperatures(data_dir, config, tmp_path):
    config.write_text(config.read_text() + "loss: {kind: contrastive, global_temperature: 0.1, alignment_temperature: 0.5}\n")
    out = tmp_path / "run"
    args = ["--config", str(config), "--output-dir", str(out), "--data-dir", str(data_dir), "--no-progress"]
    assert train.main(args) == 0
    saved = read_checkpoint(out / "last.pt")["loss_state"]
    assert set(saved) == {"global_log_scale", "alignment_log_scale"}
    # The temperatures moved away from their initial values and are restored on resume.
    assert float(saved["global_log_scale"]) != pytest.approx(np.log(10.0))
    assert train.main([*args, "--resume", "--epochs", "3"]) == 0
    resumed = read_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2 and float(resumed["loss_state"]["global_log_scale"]) != float(saved["global_log_scale"])


def _pretrained_text_layer():
    from teran.backbones import pretrained_top_text_layers

    return pretrained_top_text_layers(1, dropout=0.0)


def _pretrained_image_block():
    from teran.backbones import TunedImageStage

    return TunedImageStage(1, pretrained=True)


# setting -> (state-dict prefix, the pretrained part, one of its weights and that weight's shape)
TUNED_PARTS = {
    "text_tuned_layers": ("text.tuned.", _pretrained_text_layer, "layers.0.linear1.weight", (1536, 384)),
    "image_tuned_blocks": ("image.tuned.", _pretrained_image_block, "head_conv.weight", (1280, 320, 1, 1)),
}


@pytest.mark.parametrize("setting", sorted(TUNED_PARTS))
@pytest.mark.parametrize("lr_scale", [0.0, 1.0])
def test_tuned_backbone_parts_start_pretrained_and_learn_at_their_own_rate(data_dir, config, tmp_path, setting, lr_scale):
    prefix, make_pretrained, weight, shape = TUNED_PARTS[setting]
    config.write_text(config.read_text().replace("heads: 2}", f"heads: 2, {setting}: 1}}") + f"tuned_lr_scale: {lr_scale}\n")
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--output-dir", str(out), "--data-dir", str(data_dir), "--no-progress"]) == 0
    saved = read_checkpoint(out / "last.pt")["state_dict"]
    pretrained = make_pretrained().state_dict()
    tuned = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
    assert set(tuned) == set(pretrained)
    learned = [key for key in pretrained if "running" not in key and "num_batches" not in key]
    moved = max(float((tuned[key] - pretrained[key]).abs().max()) for key in learned)
    # lr scale 0 keeps the pretrained weights exactly; at scale 1 they train with the heads.
    assert (moved == 0.0) if lr_scale == 0.0 else (moved > 1e-4)
    # Batch norm statistics (the image blocks') are never re-estimated.
    assert all(torch.equal(tuned[key], pretrained[key]) for key in pretrained if key not in learned)
    assert tuned[weight].shape == shape
    assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--data-dir", str(data_dir), "--output", str(tmp_path / "e.json")]) == 0


def test_features_cli_precomputes_the_caches_a_config_trains_on(data_dir, config, tmp_path, capsys):
    from teran import features
    from teran.data.flickr8k import load_split

    config.write_text(config.read_text().replace("heads: 2}", "heads: 2, text_tuned_layers: 1, image_tuned_blocks: 2}"))
    assert features.main(["--config", str(config), "--data-dir", str(data_dir), "--split", "dev"]) == 0
    cache = tmp_path / "cache"
    written = set(cache.iterdir())
    captions = load_split("dev", str(data_dir)).flat_captions()[0]
    below_top = features.text_features(captions, tuned_layers=1, progress=False)
    assert set(cache.iterdir()) == written  # served from the cache the CLI wrote
    whole = features.text_features(captions, progress=False)
    assert len(set(cache.iterdir()) - written) == 1  # the whole backbone is another cache
    assert below_top.hidden.shape == whole.hidden.shape and abs(below_top.hidden.astype(float) - whole.hidden).max() > 0.1
    dev = load_split("dev", str(data_dir))
    grid = features.image_features(dev, tuned_blocks=2, progress=False)
    assert len(set(cache.iterdir()) - written) == 1  # the image grid below the top 2 blocks came from the CLI too
    assert grid.regions.shape == (4, 49, 192) and features.image_features(dev, progress=False).regions.shape == (4, 49, 1280)

    assert features.main(["--text-tuned-layers", "9", "--data-dir", str(data_dir)]) == 2
    assert "text_tuned_layers must be an integer within 0..6, got 9" in capsys.readouterr().err
    assert features.main(["--image-tuned-blocks", "5", "--data-dir", str(data_dir)]) == 2
    assert "image_tuned_blocks must be an integer within 0..4 (the trunk's blocks on its final grid), got 5" in capsys.readouterr().err


@pytest.fixture(scope="module")
def entities_dir(data_dir, tmp_path_factory):
    """Phrase boxes for the tiny folder in the Flickr30k Entities layout: "a WORD" in each caption,
    boxed in the photo's top-left quarter."""
    from teran.data.flickr8k import read_captions

    root = tmp_path_factory.mktemp("entities")
    splits = {name: "train" for name in (data_dir / "train_images.txt").read_text().split()}
    splits.update({name: "dev" for name in (data_dir / "dev_images.txt").read_text().split()})
    lines = []
    for image, captions in read_captions(data_dir / "captions.txt").items():
        for index, caption in enumerate(captions):
            box = {"boxes": [[0.0, 0.0, 0.5, 0.5]], "scene": False, "nobox": False, "chain": 1}
            phrases = [{"text": " ".join(caption.split()[:2]), "types": ["animals"], "first_word": 0, "words": 2, **box}]
            phrases.append({"text": "variant", "types": ["other"], "first_word": 5, "words": 1, **box, "chain": 0})  # not visual
            lines.append(json.dumps({"image": image, "split": splits[image], "caption": caption, "captions_txt_index": index,
                                     "size": [56, 40], "phrases": phrases}))  # fmt: skip
    (root / "phrases.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_grounding_loss_trains_and_the_pointing_game_reports_it(data_dir, config, entities_dir, tmp_path, capsys):
    from teran import grounding

    config.write_text(config.read_text() + "loss: {grounding_weight: 5.0, grounding_temperature: 0.1}\n")
    out = tmp_path / "run"
    args = ["--config", str(config), "--output-dir", str(out), "--data-dir", str(data_dir), "--entities-dir", str(entities_dir)]
    assert train.main([*args, "--no-progress"]) == 0
    history = json.loads((out / "summary.json").read_text())["history"]
    # 8 training images x 5 captions, each with one visual phrase; the pointing game runs on dev every epoch.
    assert all(h["loss"]["grounding"] > 0 and 0.0 <= h["dev_pointing"] <= 1.0 for h in history)
    assert read_checkpoint(out / "best.pt")["blend_weight"] in evaluate.BLEND_WEIGHTS  # selected on dev
    assert "grounding: 40 training phrases with boxes" in capsys.readouterr().err

    report_path = tmp_path / "grounding.json"
    code = grounding.main(
        ["--checkpoint", str(out / "best.pt"), "--data-dir", str(data_dir), "--entities-dir", str(entities_dir),
         "--output", str(report_path), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["phrases"] == 20 and report["captions"] == 20  # 4 dev photos x 5 captions, the non-visual phrase left out
    # The box covers the top-left 3x3 cells' centres (of 7x7): the random baseline is 9/49; the centre is not in it.
    assert report["baselines"] == {"center": 0.0, "random": pytest.approx(9 / 49)}
    assert set(report["by_type"]) == {"animals"} and report["by_type"]["animals"]["phrases"] == 20
    best_epoch = read_checkpoint(out / "best.pt")["epoch"]
    assert report["pointing"] == pytest.approx(history[best_epoch]["dev_pointing"])  # the same rule on the same phrases
    assert report["command"].startswith("python -m teran.grounding") and report["machine"]["cpus"] >= 1

    assert grounding.main(["--checkpoint", str(out / "best.pt"), "--entities-dir", str(tmp_path / "none")]) == 2
    assert "phrases.jsonl: phrase file does not exist" in capsys.readouterr().err
