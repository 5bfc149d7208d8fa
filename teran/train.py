"""Train our TERAN variant on cached frozen-backbone features of a Flickr8k-style folder.

    python -m teran.train --config configs/flickr8k.yaml --output-dir runs/flickr8k
    python -m teran.train --config configs/flickr8k.yaml --output-dir runs/flickr8k --resume

Each epoch makes `captions_per_image` shuffled passes over the training images, pairing every
image with a different one of its captions in each pass (no image appears twice in a batch,
so in-batch negatives are true negatives). `last.pt` is
written after every epoch (resumable: weights, optimiser, schedule, RNG states) and
`best.pt` whenever the dev rsum (alignment + global) improves.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from teran.backbones import TunedImageStage, pretrained_top_text_layers, tokenizer_file
from teran.checkpoint import load_model, payload_extras, save_checkpoint
from teran.config import TrainConfig, load_train_config, to_dict
from teran.data.flickr8k import load_split
from teran.errors import TeranInputError
from teran.evaluate import evaluate_model
from teran.features import ImageFeatures, TextFeatures, image_features, text_features
from teran.grounding import build_phrase_set, dev_phrase_captions, model_pointing, training_phrase_set
from teran.hubness import CHECKPOINT_KEY as HUB_KEY
from teran.hubness import build_reference
from teran.losses import PhraseBatch, TeranLoss
from teran.model import TeranModel
from teran.tokenization import CaptionTokenizer


def seed_everything(seed: int) -> None:
    """Seed Python and torch; the caption sampler is seeded per epoch from the same seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(cfg: TrainConfig, step: int, epoch: int) -> float:
    """The base lr at `step`: linear warm-up, then x0.1 from `lr_decay_epoch` (groups scale it by `lr_scale`)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay = 0.1 if epoch >= cfg.lr_decay_epoch else 1.0
    return cfg.lr * warm * decay


class CaptionSampler:
    """Batches of (image, caption) index pairs with no image twice in a batch.

    An epoch is `rounds` shuffled passes over the images; in each pass every image is paired
    with a different one of its captions (while it has unused ones).
    """

    def __init__(self, caption_owners: np.ndarray, n_images: int, batch_size: int, rounds: int = 1):
        self.by_image = [np.flatnonzero(caption_owners == i) for i in range(n_images)]
        self.batch_size = batch_size
        self.rounds = rounds

    def epoch(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        orders = [rng.permutation(caps) for caps in self.by_image]
        batches = []
        for round_index in range(self.rounds):
            images = rng.permutation(len(self.by_image))
            captions = np.array([orders[i][round_index % len(orders[i])] for i in images])
            # Drop the ragged tail so every batch keeps its full set of negatives.
            for start in range(0, len(images) - self.batch_size + 1, self.batch_size):
                batches.append((images[start : start + self.batch_size], captions[start : start + self.batch_size]))
        return batches


def make_optimizer(cfg: TrainConfig, model: TeranModel, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the model and the loss's own parameters (learned temperatures), which get no decay.

    Tuned backbone layers learn at `tuned_lr_scale` x the lr, so the pretrained weights move gently.
    """
    tuned = [p for stage in (model.text.tuned, model.image.tuned) if stage is not None for p in stage.parameters()]
    tuned_ids = {id(p) for p in tuned}
    groups = [{"params": [p for p in model.parameters() if id(p) not in tuned_ids], "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]
    if tuned:
        groups.append({"params": tuned, "weight_decay": cfg.weight_decay, "lr_scale": cfg.tuned_lr_scale})
    if loss_params := list(loss_fn.parameters()):
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr_scale": 1.0})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _load_resumable(last_path: Path, cfg: TrainConfig) -> tuple[TeranModel, dict]:
    """The run's model and checkpoint, refused if it was started with other model settings
    (its caches and weights would not fit). Settings added since it was written count as their defaults."""
    model, state = load_model(last_path)
    stored, wanted = to_dict(model.config), to_dict(cfg.model)
    differ = sorted(key for key in wanted.keys() | stored.keys() if stored.get(key) != wanted.get(key))
    if differ:
        changes = ", ".join(f"{key}: {stored.get(key)!r} there, {wanted.get(key)!r} now" for key in differ)
        raise TeranInputError(
            f"{last_path}: was started with other model settings ({changes}); resume with its config or use another --output-dir"
        )
    return model, state


def train(
    cfg: TrainConfig,
    output_dir: Path,
    data_dir: str | None,
    resume: bool,
    progress: bool = True,
    command: str = "",
    entities_dir: str | None = None,
) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    resumed = _load_resumable(last_path, cfg) if resume and last_path.exists() else None

    train_split = load_split("train", data_dir)
    dev_split = load_split("dev", data_dir, limit=cfg.eval_images)
    train_caps, train_owners = train_split.flat_captions()
    dev_caps, dev_owners = dev_split.flat_captions()
    blocks = cfg.model.image_tuned_blocks
    train_images: ImageFeatures = image_features(train_split, tuned_blocks=blocks, progress=progress)
    tuned = cfg.model.text_tuned_layers
    train_text: TextFeatures = text_features(train_caps, max_tokens=cfg.model.max_tokens, tuned_layers=tuned, progress=progress)
    dev_images = image_features(dev_split, tuned_blocks=blocks, progress=progress)
    dev_text = text_features(dev_caps, max_tokens=cfg.model.max_tokens, tuned_layers=tuned, progress=progress)
    tokenizer = CaptionTokenizer(tokenizer_file(), max_tokens=cfg.model.max_tokens)
    train_phrases = None
    if cfg.loss.grounding_weight:
        train_phrases = training_phrase_set(train_split, "train", entities_dir, tokenizer, train_images.boxes[0])
        print(f"grounding: {len(train_phrases)} training phrases with boxes", file=sys.stderr)
    # The dev pointing game, measured every epoch beside retrieval when the phrase boxes are there.
    dev_phrase_caps = dev_phrase_captions(dev_split, "dev", entities_dir)
    dev_phrases = dev_phrase_text = None
    if dev_phrase_caps:
        dev_index = {name: i for i, name in enumerate(dev_split.names)}
        dev_phrases = build_phrase_set(dev_phrase_caps, dev_index, dev_images.boxes[0], tokenizer)
        captions_of_phrases = [c.caption for c in dev_phrase_caps]
        dev_phrase_text = text_features(captions_of_phrases, max_tokens=cfg.model.max_tokens, tuned_layers=tuned, progress=progress)

    device = torch.device(cfg.device)
    if resumed:  # a resumed run takes its tuned backbone parts from its checkpoint
        model, state = resumed
    else:
        model = TeranModel(cfg.model)
        if model.text.tuned is not None:
            model.text.tuned.load_state_dict(pretrained_top_text_layers(tuned, cfg.model.dropout).state_dict())
        if model.image.tuned is not None:
            model.image.tuned.load_state_dict(TunedImageStage(blocks, pretrained=True).state_dict())
    model.to(device)
    loss_fn = TeranLoss(cfg.loss).to(device)
    optimizer = make_optimizer(cfg, model, loss_fn)
    start_epoch, step, best_rsum, history = 0, 0, -1.0, []
    if resumed:
        loss_fn.load_state_dict(state.get("loss_state", {}))  # in place: the optimizer keeps its parameters
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best_rsum, history = state["epoch"] + 1, state["step"], state["best_rsum"], json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {last_path} at epoch {start_epoch}", file=sys.stderr)

    sampler = CaptionSampler(np.asarray(train_owners), len(train_split.names), cfg.batch_size, cfg.captions_per_image)
    regions_all = torch.from_numpy(train_images.regions).to(device)
    boxes_all = torch.from_numpy(train_images.boxes).to(device)
    if train_phrases is not None:
        phrase_pieces = torch.from_numpy(train_phrases.pieces).to(device)
        phrase_targets = torch.from_numpy(train_phrases.targets).to(device)
    started = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        hardest = epoch >= cfg.loss.sum_violations_epochs
        batches = sampler.epoch(np.random.default_rng(cfg.seed * 1000 + epoch))
        running, epoch_started = [], time.monotonic()
        with tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress) as bar:
            for batch_images, batch_captions in batches:
                img_idx = torch.from_numpy(batch_images).to(device)
                regions = regions_all[img_idx].float()
                mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=device)
                hidden, attention = (t.to(device) for t in train_text.batch(batch_captions))
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step, epoch) * group.get("lr_scale", 1.0)
                phrases = None
                if train_phrases is not None:
                    rows, owner = (torch.from_numpy(a).to(device) for a in train_phrases.rows_of(batch_captions))
                    phrases = PhraseBatch(owner, phrase_pieces[rows], phrase_targets[rows])
                losses = loss_fn(model.image(regions, boxes_all[img_idx], mask), model.text(hidden, attention), hardest, phrases)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
                running.append({k: v.item() for k, v in losses.items()})
                bar.set_postfix(loss=f"{np.mean([r['total'] for r in running[-20:]]):.2f}", hard=int(hardest))
                bar.update()
        dev = evaluate_model(model, dev_images, dev_text, np.asarray(dev_owners), mode=cfg.loss.alignment_mode)
        rsum = dev["alignment"]["rsum"] + dev["global"]["rsum"]
        record = {
            "epoch": epoch + 1,
            "loss": {k: float(np.mean([r[k] for r in running])) for k in running[0]},
            "dev_rsum_alignment": dev["alignment"]["rsum"],
            "dev_rsum_global": dev["global"]["rsum"],
            "dev_r1": {n: {d: dev[n][d]["r1"] for d in ("i2t", "t2i")} for n in ("alignment", "global", "blend") if n in dev},
            "seconds": round(time.monotonic() - epoch_started, 1),
        }
        blend = ""
        if "blend" in dev:  # the served ranking's alignment weight, selected on dev (MrSw models)
            record.update({"dev_rsum_blend": dev["blend"]["rsum"], "blend_weight": dev["blend"]["weight"]})
            blend = f" blend {dev['blend']['rsum']:.1f} (weight {dev['blend']['weight']})"
        pointing = ""
        if dev_phrases is not None:
            record["dev_pointing"] = model_pointing(model, dev_images, dev_phrase_text, dev_phrases)["pointing"]
            pointing = f"  pointing {record['dev_pointing']:.3f}"
        history.append(record)
        print(
            f"epoch {epoch + 1}: loss {record['loss']['total']:.2f}  dev rsum alignment {dev['alignment']['rsum']:.1f} "
            f"global {dev['global']['rsum']:.1f}{blend}{pointing}  ({record['seconds']:.0f}s)",
            file=sys.stderr,
        )
        extra = {
            "train_config": to_dict(cfg),
            "epoch": epoch,
            "step": step,
            "history": json.dumps(history),
            "dev": json.dumps(dev),
            "blend_weight": record.get("blend_weight"),
        }
        if rsum > best_rsum:
            best_rsum = rsum
            save_checkpoint(best_path, model, **extra)
        save_checkpoint(
            last_path,
            model,
            **extra,
            best_rsum=best_rsum,
            optimizer=optimizer.state_dict(),
            loss_state=loss_fn.state_dict(),
            torch_rng=torch.get_rng_state(),
        )
    if best_rsum >= 0 and cfg.loss.alignment_mode == "MrSw":
        # The served ranking's hub penalty (teran.hubness) needs the best model's reference sample.
        best_model, payload = load_model(best_path)
        keep = payload_extras(payload)
        keep[HUB_KEY] = build_reference(best_model, train_images, train_text, train_owners).to_checkpoint()
        save_checkpoint(best_path, best_model, **keep)
    summary = {
        "command": command,
        "epochs": cfg.epochs,
        "steps": step,
        "train_seconds": round(time.monotonic() - started, 1),
        "best_dev_rsum_sum": best_rsum,
        "best_checkpoint": str(best_path),
        "history": history,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teran.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig settings (see configs/flickr8k.yaml)")
    parser.add_argument("--output-dir", default="runs/flickr8k", help="where last.pt, best.pt and summary.json go")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument(
        "--entities-dir",
        default=None,
        help="Flickr30k Entities phrase boxes for the grounding loss and the dev pointing game "
        "(default: $TERAN_ENTITIES_DIR or ../shared/data/flickr30k-entities)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, {"epochs": args.epochs, "seed": args.seed})
        command = "python -m teran.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        summary = train(
            cfg,
            Path(args.output_dir),
            args.data_dir,
            args.resume,
            progress=not args.no_progress,
            command=command,
            entities_dir=args.entities_dir,
        )
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = max(summary["history"], key=lambda h: h["dev_rsum_alignment"] + h["dev_rsum_global"]) if summary["history"] else None
    print(
        f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['train_seconds'] / 60:.1f} min; "
        f"best epoch {best and best['epoch']}: dev rsum alignment {best and best['dev_rsum_alignment']:.1f}, "
        f"global {best and best['dev_rsum_global']:.1f}; checkpoint {summary['best_checkpoint']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
