"""Hub penalty probe: would a CSLS-style correction of the served score help retrieval? (not served yet)

    .venv/bin/python bench/hub_penalty.py --checkpoint models/teran-flickr8k.pt --output reports/hub-penalty-dev.json

Some gallery items ("hubs") score high against many queries. CSLS (Lample et al. 2018) scores a pair
as 2 s(q, x) - r(q) - r(x), with r the mean of an item's k highest scores against the other
modality; for a fixed query r(q) is constant, so the ranking is that of s(q, x) - weight x r(x) with
weight 0.5. Here s is the served score (global cosine + w x MrSw, w from the checkpoint) and r is
measured against a fixed bank from the TRAIN split (photos for caption items, captions for photo
items), never against the evaluated gallery, so a server could compute it per item at index time.
Reports Flickr8k dev (1K) recall of the served score with and without the penalty, both directions.
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

ROOT = Path(__file__).resolve().parents[1]


def hub_statistic(item_vs_bank: np.ndarray, k: int) -> np.ndarray:
    """Per row (a gallery item): the mean of its k highest scores against the bank."""
    k = min(k, item_vs_bank.shape[1])
    return np.sort(item_vs_bank, axis=1)[:, -k:].mean(axis=1)


def penalised(scores: np.ndarray, image_hub: np.ndarray, caption_hub: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """scores [images, captions] -> (for ranking photos per caption, for ranking captions per photo),
    each item's score lowered by weight x its hub statistic."""
    return scores - weight * image_hub[:, None], scores - weight * caption_hub[None, :]


def direction_recall(t2i_scores: np.ndarray, i2t_scores: np.ndarray, owners: np.ndarray) -> dict:
    from teran.metrics import recall_at_k

    t2i, i2t = recall_at_k(t2i_scores, owners)["t2i"], recall_at_k(i2t_scores, owners)["i2t"]
    keep = ("r1", "r5", "r10")
    out = {"i2t": {k: round(i2t[k], 2) for k in keep}, "t2i": {k: round(t2i[k], 2) for k in keep}}
    out["rsum"] = round(sum(out[d][k] for d in ("i2t", "t2i") for k in keep), 2)
    return out


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/hub_penalty.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "teran-flickr8k.pt"), help="training checkpoint (.pt)")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument("--bank-images", type=int, default=1000, help="train photos in the bank (their captions: up to --bank-captions)")
    parser.add_argument("--bank-captions", type=int, default=5000, help="train captions in the bank")
    parser.add_argument("--k", type=int, default=10, help="best bank scores averaged per item (CSLS: 10)")
    parser.add_argument("--weight", type=float, default=0.5, help="penalty weight (CSLS: 0.5)")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.k < 1 or args.bank_images < 1 or args.bank_captions < 1:
        parser.error("--k, --bank-images and --bank-captions must be >= 1")

    import torch

    from teran.alignment import blend_scores
    from teran.checkpoint import load_model
    from teran.data.flickr8k import load_split
    from teran.evaluate import encode_images, encode_texts, score_both
    from teran.features import image_features, text_features

    started = time.monotonic()
    model, payload = load_model(args.checkpoint)
    model.eval()
    weight = payload.get("blend_weight")

    def encode(split: str, limit: int):
        data = load_split(split, args.data_dir, limit=limit)
        captions, owners = data.flat_captions()
        images = image_features(data, tuned_blocks=model.config.image_tuned_blocks)
        texts = text_features(captions, max_tokens=model.config.max_tokens, tuned_layers=model.config.text_tuned_layers)
        with torch.no_grad():
            return encode_images(model, images), encode_texts(model, texts), np.asarray(owners)

    def served(images, texts) -> np.ndarray:
        parts = score_both(images, texts)
        if weight is None:
            return parts["alignment"]
        return blend_scores(torch.from_numpy(parts["global"]), torch.from_numpy(parts["alignment"]), weight).numpy()

    print("encoding dev and the train bank ...", file=sys.stderr)
    dev_images, dev_texts, owners = encode("dev", 1000)
    bank_images, bank_texts, _ = encode("train", args.bank_images)
    keep = min(args.bank_captions, len(bank_texts.global_vec))
    bank_texts = type(bank_texts)(*(t[:keep] for t in bank_texts))
    print("scoring ...", file=sys.stderr)
    scores = served(dev_images, dev_texts)
    image_hub = hub_statistic(served(dev_images, bank_texts), args.k)  # dev photos vs train captions
    caption_hub = hub_statistic(served(bank_images, dev_texts).T, args.k)  # dev captions vs train photos
    report = {
        "command": "python bench/hub_penalty.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "checkpoint": _shown(args.checkpoint),
        "served_score": "MrSw" if weight is None else f"global cosine + {weight:g} x MrSw",
        "penalty": f"score - {args.weight:g} x mean of the item's {args.k} best served scores against the train bank",
        "bank": {"train_images": int(len(bank_images.global_vec)), "train_captions": int(keep)},
        "gallery": {"dev_images": int(len(dev_images.global_vec)), "dev_captions": int(len(owners))},
        "served": direction_recall(scores, scores, owners),
        "hub_penalised": direction_recall(*penalised(scores, image_hub, caption_hub, args.weight), owners),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "seconds": round(time.monotonic() - started, 1),
    }
    for name in ("served", "hub_penalised"):
        r = report[name]
        recall = {d: "/".join(str(r[d][k]) for k in ("r1", "r5", "r10")) for d in ("i2t", "t2i")}
        print(f"{name:14s} R@1/5/10 i2t {recall['i2t']}  t2i {recall['t2i']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
