"""Evaluate a trained model: Recall@1/5/10 both directions, rsum and NDCG@25 (ROUGE-L
relevance), for the alignment score, the global score, their blend and the served ranking (the blend
less the hub penalty, when the checkpoint has a hub reference). Writes a JSON report.

    python -m teran.evaluate --checkpoint models/teran-flickr8k.pt --split dev \
        --output reports/eval-flickr8k-dev.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from teran.alignment import blend_scores, chunked_alignment_scores, global_scores
from teran.data.flickr8k import load_split
from teran.errors import TeranInputError
from teran.features import ImageFeatures, TextFeatures, image_features, text_features
from teran.hubness import HubReference
from teran.metrics import caption_relevance, ndcg_both_directions, recall_at_k
from teran.model import Encoded, TeranModel


@torch.no_grad()
def encode_images(model: TeranModel, feats: ImageFeatures, batch_size: int = 256, progress: bool = False) -> Encoded:
    """Encode cached region features; results come back on the CPU."""
    device = _device_of(model)
    parts = []
    for start in tqdm(range(0, len(feats.names), batch_size), desc="encode images", disable=not progress):
        regions = torch.from_numpy(feats.regions[start : start + batch_size].astype(np.float32)).to(device)
        boxes = torch.from_numpy(feats.boxes[start : start + batch_size]).to(device)
        mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=device)
        parts.append([t.cpu() for t in model.image(regions, boxes, mask)])
    return Encoded(*(torch.cat(p) for p in zip(*parts, strict=True)))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(
    model: TeranModel, feats: TextFeatures, indices: np.ndarray | None = None, batch_size: int = 512, progress: bool = False
) -> Encoded:
    """Encode captions; concept tensors are padded to the longest caption of all batches."""
    indices = np.arange(len(feats)) if indices is None else indices
    globals_, concepts, masks = [], [], []
    for start in tqdm(range(0, len(indices), batch_size), desc="encode captions", disable=not progress):
        hidden, attention = feats.batch(indices[start : start + batch_size])
        out = model.text(hidden.to(_device_of(model)), attention.to(_device_of(model)))
        globals_.append(out.global_vec.cpu())
        concepts.append(out.concepts.cpu())
        masks.append(out.concept_mask.cpu())
    width = max(c.shape[1] for c in concepts)
    return Encoded(
        torch.cat(globals_),
        torch.cat([_pad_positions(c, width) for c in concepts]),
        torch.cat([_pad_positions(m, width) for m in masks]),
    )


def _pad_positions(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim 1 (concept positions) of [B, N] or [B, N, D] with zeros / False up to `width`."""
    pad = (0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1])
    return torch.nn.functional.pad(t, pad)


def score_both(images: Encoded, texts: Encoded, mode: str = "MrSw", device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Alignment and global score matrices [images, captions]."""
    return {
        "alignment": chunked_alignment_scores(
            images.concepts, images.concept_mask, texts.concepts, texts.concept_mask, mode, device=device
        ).numpy(),
        "global": global_scores(images.global_vec, texts.global_vec).numpy(),
    }


# Candidate weights of MrSw in the blended ranking score (selected on dev). MrSw sums about a dozen
# word-piece cosines, so 0.08 weighs it about like the global cosine.
BLEND_WEIGHTS = tuple(round(0.01 * i, 2) for i in range(31))


def select_blend_weight(global_: np.ndarray, alignment: np.ndarray, owners: np.ndarray) -> float:
    """The weight of BLEND_WEIGHTS whose blended score has the best rsum (the smallest on ties)."""
    g, a = torch.from_numpy(global_), torch.from_numpy(alignment)
    rsums = [recall_at_k(blend_scores(g, a, w).numpy(), owners)["rsum"] for w in BLEND_WEIGHTS]
    return BLEND_WEIGHTS[int(np.argmax(rsums))]


def evaluate_model(
    model: TeranModel,
    image_feats: ImageFeatures,
    text_feats: TextFeatures,
    owners: np.ndarray,
    captions: list[str] | None = None,
    mode: str = "MrSw",
    progress: bool = False,
    blend_weight: float | None = None,
    hub: HubReference | None = None,
) -> dict:
    """Recall (and NDCG when captions are given) for both scores on one gallery, and for their
    blend (teran.alignment.blend_scores) with MrSw: at `blend_weight`, or the weight that is best
    on this gallery when None (reported as `blend.weight`); with a hub reference, also the served
    ranking (`served`: the blend less the hub penalty, teran.hubness)."""
    model.eval()
    images = encode_images(model, image_feats, progress=progress)
    texts = encode_texts(model, text_feats, progress=progress)
    relevance = caption_relevance(captions, owners) if captions is not None else None
    report = {}
    scores_by_name = score_both(images, texts, mode, _device_of(model))
    if mode == "MrSw":
        global_, alignment = scores_by_name["global"], scores_by_name["alignment"]
        weight = select_blend_weight(global_, alignment, owners) if blend_weight is None else blend_weight
        scores_by_name["blend"] = blend_scores(torch.from_numpy(global_), torch.from_numpy(alignment), weight).numpy()
        if hub is not None:  # the served ranking: the blend less the hub penalty (teran.hubness)
            scores_by_name["served"] = hub.penalise(scores_by_name["blend"], images.global_vec.numpy(), texts.global_vec.numpy())
    for name, scores in scores_by_name.items():
        report[name] = recall_at_k(scores, owners)
        if relevance is not None:
            ndcg = ndcg_both_directions(scores, relevance)
            for direction in ("i2t", "t2i"):
                report[name][direction]["ndcg_rougeL"] = ndcg[direction]
            report[name]["ndcg_rougeL"] = float(np.mean(list(ndcg.values())))
    if "blend" in report:
        report["blend"]["weight"] = weight
    return report


def _folds(n_images: int, fold_size: int) -> list[np.ndarray]:
    return [np.arange(s, s + fold_size) for s in range(0, n_images - fold_size + 1, fold_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teran.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) of this project")
    parser.add_argument("--split", default="dev", help="split to evaluate: dev, test, train or all (default dev)")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument("--mode", default="MrSw", choices=["MrSw", "MwSr", "symm", "MrAVGw"], help="alignment score (default MrSw)")
    parser.add_argument(
        "--protocol",
        default="1k",
        choices=["1k", "5fold1k", "5k"],
        help="1k: whole split as one gallery; 5fold1k: mean over 1,000-image folds; 5k: whole split (COCO naming)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument(
        "--blend-weight",
        type=float,
        default=None,
        help="alignment weight of the blended ranking score (default: the checkpoint's, selected on dev in training; "
        "with neither, the best weight on this split)",
    )
    parser.add_argument("--output", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    from teran.checkpoint import load_model

    started = time.monotonic()
    try:
        model, payload = load_model(args.checkpoint)
        data = load_split(args.split, args.data_dir, limit=args.limit)
        captions, owners = data.flat_captions()
        owners = np.asarray(owners)
        image_feats = image_features(data, tuned_blocks=model.config.image_tuned_blocks)
        text_feats = text_features(captions, max_tokens=model.config.max_tokens, tuned_layers=model.config.text_tuned_layers)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    weight = args.blend_weight if args.blend_weight is not None else payload.get("blend_weight")
    hub = HubReference.from_checkpoint(payload)
    if args.protocol == "5fold1k":
        fold_reports = []
        for fold in _folds(len(data.names), 1000):
            caps = np.flatnonzero(np.isin(owners, fold))
            sub_images = ImageFeatures([data.names[i] for i in fold], image_feats.regions[fold], image_feats.boxes[fold])
            sub_text = TextFeatures(*_subset_text(text_feats, caps))
            fold_reports.append(
                evaluate_model(
                    model, sub_images, sub_text, owners[caps] - fold[0], [captions[c] for c in caps], args.mode, True, weight, hub
                )
            )
        results = _mean_reports(fold_reports)
    else:
        results = evaluate_model(model, image_feats, text_feats, owners, captions, args.mode, progress=True, blend_weight=weight, hub=hub)

    report = {
        "command": "python -m teran.evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "data_dir": str(data.root),
        "protocol": args.protocol,
        "n_images": len(data.names),
        "n_captions": len(captions),
        "alignment_mode": args.mode,
        "blend_weight_source": "--blend-weight"
        if args.blend_weight is not None
        else "checkpoint"
        if weight is not None
        else "best on this split",
        "hub_penalty": None if hub is None else hub.describe(),
        "model_config": payload["model_config"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "seconds": round(time.monotonic() - started, 1),
        **results,
    }
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    for name in [n for n in ("alignment", "global", "blend", "served") if n in results]:
        r = results[name]
        print(
            f"{name:9s} i2t R@1 {r['i2t']['r1']:.1f} R@5 {r['i2t']['r5']:.1f} R@10 {r['i2t']['r10']:.1f} | "
            f"t2i R@1 {r['t2i']['r1']:.1f} R@5 {r['t2i']['r5']:.1f} R@10 {r['t2i']['r10']:.1f} | "
            f"rsum {r['rsum']:.1f} | NDCG@25 {r.get('ndcg_rougeL', float('nan')):.3f}"
        )
    return 0


def _subset_text(feats: TextFeatures, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pieces = [np.arange(feats.offsets[i], feats.offsets[i + 1]) for i in indices]
    flat = np.concatenate(pieces)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return feats.hidden[flat], offsets, feats.input_ids[flat]


def _mean_reports(reports: list[dict]):
    if isinstance(reports[0], dict):
        return {key: _mean_reports([r[key] for r in reports]) for key in reports[0]}
    return float(np.mean(reports))


if __name__ == "__main__":
    sys.exit(main())
