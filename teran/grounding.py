"""Grounding evaluation: does each phrase's best region show the thing the phrase names?

    python -m teran.grounding --checkpoint models/teran-flickr8k.pt --output reports/grounding-flickr8k-dev.json
    python -m teran.grounding --checkpoint models/teran-flickr8k.pt --model-dir artifacts/teran-flickr8k

The pointing game on Flickr30k Entities phrase boxes (`phrases.jsonl`, see the data folder's
README): for every usable phrase of a caption, the word-region similarities of the phrase's word
pieces are summed per region (the caption's own concepts against its photo's concepts), the best
region is taken, and it is a hit when that region's centre lies inside one of the phrase's boxes.
Reported overall and per phrase type, beside the `center` (the photo's middle) and `random`
(expected hit rate of a uniformly chosen region) baselines on the same phrases.

With --model-dir the exported ONNX graphs (the served model) are scored on the same phrases, and
with both the difference is checked against --tolerance. Exit codes: 0 ok, 1 the checkpoint and
the graphs disagree beyond the tolerance, 2 bad input.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teran.data.flickr8k import REPO_ROOT, load_split
from teran.errors import TeranInputError

DEFAULT_ENTITIES_DIR = REPO_ROOT.parent / "shared" / "data" / "flickr30k-entities"
PHRASES_FILE = "phrases.jsonl"
PHOTO_CENTRE = np.array([[0.5, 0.5]], np.float32)


def default_entities_dir() -> Path:
    return Path(os.environ.get("TERAN_ENTITIES_DIR", DEFAULT_ENTITIES_DIR))


@dataclass(frozen=True)
class Phrase:
    text: str
    types: tuple[str, ...]
    first_word: int  # index of its first token in the caption (tokens separated by single spaces)
    words: int
    boxes: np.ndarray  # float32 [K, 4], normalised x1 y1 x2 y2


@dataclass
class PhraseCaption:
    image: str
    caption: str
    captions_txt_index: int | None  # the matching row among the photo's captions in captions.txt
    phrases: list[Phrase]  # usable ones only


def usable(phrase: dict) -> bool:
    """A phrase with a box to point at: boxed, visual (chain != 0), not the scene, not `nobox`."""
    return bool(phrase["boxes"]) and phrase["chain"] != 0 and not phrase["scene"] and not phrase["nobox"]


def load_phrase_captions(split: str, entities_dir: str | Path | None = None) -> list[PhraseCaption]:
    """Captions of `split` that have at least one usable phrase, in file order."""
    path = Path(entities_dir or default_entities_dir()) / PHRASES_FILE
    if not path.is_file():
        raise TeranInputError(f"{path}: phrase file does not exist (a Flickr30k Entities folder; --entities-dir or TERAN_ENTITIES_DIR)")
    out = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
                if row["split"] != split:
                    continue
                phrases = [
                    Phrase(p["text"], tuple(p["types"]), int(p["first_word"]), int(p["words"]), np.asarray(p["boxes"], np.float32))
                    for p in row["phrases"]
                    if usable(p)
                ]
            except (ValueError, KeyError, TypeError) as exc:
                raise TeranInputError(f"{path}:{line_number}: not a phrase record ({exc!r})") from None
            if phrases:
                out.append(PhraseCaption(row["image"], row["caption"], row.get("captions_txt_index"), phrases))
    if not out:
        raise TeranInputError(f"{path}: no usable phrases in split {split!r}")
    return out


def token_of_pieces(caption: str, offsets: list[tuple[int, int]]) -> list[int]:
    """For every word piece of a tokenized caption ([CLS] first, [SEP] last), the index of the
    space-separated caption token it comes from; -1 for [CLS] and [SEP]."""
    starts, position = [], 0
    for token in caption.split(" "):
        starts.append(position)
        position += len(token) + 1
    tokens = [bisect.bisect_right(starts, start) - 1 for start, _ in offsets]
    tokens[0] = tokens[-1] = -1
    return tokens


def centres(boxes: np.ndarray) -> np.ndarray:
    """Region boxes [R, 4] -> centres [R, 2]."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """[R, 2] points, [K, 4] boxes -> bool [R]: the point lies strictly inside at least one box
    (a point on a box's edge is not in it: the conservative reading of a hit)."""
    x, y = points[:, None, 0], points[:, None, 1]
    inside = (x > boxes[None, :, 0]) & (x < boxes[None, :, 2]) & (y > boxes[None, :, 1]) & (y < boxes[None, :, 3])
    return inside.any(axis=1)


def training_targets(region_boxes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Regions a phrase should point at: those whose centre lies in a box (a hit), or, for boxes
    smaller than a region, the region holding the box's centre. bool [R]."""
    region_centres = centres(region_boxes)
    hits = points_in_boxes(region_centres, boxes)
    for box in boxes:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        holding = (region_boxes[:, 0] <= cx) & (cx <= region_boxes[:, 2]) & (region_boxes[:, 1] <= cy) & (cy <= region_boxes[:, 3])
        if not (hits & holding).any():
            hits |= holding & (np.arange(len(region_boxes)) == np.argmax(holding))
    return hits


@dataclass
class PhraseSet:
    """Usable phrases of a list of captions, in the model's terms.

    `pieces[p, l]` marks the concept positions (word pieces after [CLS]) of phrase p in its caption;
    `hits[p, r]` the regions whose centre lies in one of its boxes; `targets` adds, per box too
    small to hold any region centre, the region holding its centre (for training).
    """

    caption: np.ndarray  # int64 [P]: index into the caption list
    image: np.ndarray  # int64 [P]: index into the image list
    pieces: np.ndarray  # bool [P, L]
    hits: np.ndarray  # bool [P, R]
    targets: np.ndarray  # bool [P, R]
    center: np.ndarray  # bool [P]: the photo's centre lies in one of its boxes (the `center` baseline)
    types: list[tuple[str, ...]]
    texts: list[str]
    dropped: int  # phrases whose word pieces were all cut by truncation

    def __len__(self) -> int:
        return len(self.caption)

    def rows_of(self, captions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The phrases of `captions` (caption indices, e.g. a training batch): (phrase rows, position in `captions`)."""
        order = np.argsort(self.caption, kind="stable")
        ordered = self.caption[order]
        lo, hi = np.searchsorted(ordered, captions, "left"), np.searchsorted(ordered, captions, "right")
        counts = hi - lo
        owner = np.repeat(np.arange(len(captions)), counts)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return order[starts + np.arange(counts.sum())], owner


def build_phrase_set(
    captions: list[PhraseCaption],
    image_index: dict[str, int],
    region_boxes: np.ndarray,
    tokenizer,
) -> PhraseSet:
    """Map every usable phrase onto word-piece concept positions (of the tokenized Entities
    caption) and region hit masks. `region_boxes` [R, 4] is the image layout (the grid), the same
    for every image.
    """
    batch = tokenizer.encode([c.caption for c in captions], truncate=True)
    width = batch.input_ids.shape[1] - 1
    region_centres = centres(region_boxes)
    rows = defaultdict(list)
    dropped = 0
    for c, entry in enumerate(captions):
        owner = token_of_pieces(entry.caption, batch.offsets[c])
        owner_array = np.asarray(owner[1:] + [-1] * (width + 1 - len(owner)))[:width]
        for phrase in entry.phrases:
            mask = (owner_array >= phrase.first_word) & (owner_array < phrase.first_word + phrase.words)
            if not mask.any():
                dropped += 1
                continue
            rows["caption"].append(c)
            rows["image"].append(image_index[entry.image])
            rows["pieces"].append(mask)
            rows["hits"].append(points_in_boxes(region_centres, phrase.boxes))
            rows["targets"].append(training_targets(region_boxes, phrase.boxes))
            rows["center"].append(points_in_boxes(PHOTO_CENTRE, phrase.boxes)[0])
            rows["types"].append(phrase.types)
            rows["texts"].append(phrase.text)
    return PhraseSet(
        caption=np.asarray(rows["caption"], np.int64),
        image=np.asarray(rows["image"], np.int64),
        pieces=np.stack(rows["pieces"]),
        hits=np.stack(rows["hits"]),
        targets=np.stack(rows["targets"]),
        center=np.asarray(rows["center"], bool),
        types=rows["types"],
        texts=rows["texts"],
        dropped=dropped,
    )


def phrase_region_scores(image_concepts: np.ndarray, caption_concepts: np.ndarray, phrases: PhraseSet, chunk: int = 4096) -> np.ndarray:
    """Sum over each phrase's word pieces of their similarity to every region of its photo: [P, R].

    image_concepts [Ni, R, D]; caption_concepts [Nc, L', D] (concept positions, L' >= L).
    """
    out = np.empty(phrases.hits.shape, dtype=np.float32)
    width = phrases.pieces.shape[1]
    for start in range(0, len(phrases), chunk):
        part = slice(start, start + chunk)
        words = caption_concepts[phrases.caption[part], :width].astype(np.float32)  # [p, L, D]
        # The sum of the pieces' similarities is the similarity of the sum of the pieces.
        phrase_vectors = np.einsum("pl,pld->pd", phrases.pieces[part].astype(np.float32), words)
        out[part] = np.einsum("pd,prd->pr", phrase_vectors, image_concepts[phrases.image[part]].astype(np.float32))
    return out


def pointing_game(scores: np.ndarray, phrases: PhraseSet) -> dict:
    """Hit rate of the best-scoring region, overall and per phrase type, with both baselines."""
    best = scores.argmax(axis=1)
    hit = phrases.hits[np.arange(len(phrases)), best]
    center, random = phrases.center, phrases.hits.mean(axis=1)
    by_type = {}
    for kind in sorted({t for types in phrases.types for t in types}):
        rows = np.asarray([kind in types for types in phrases.types])
        by_type[kind] = {
            "phrases": int(rows.sum()),
            "pointing": float(hit[rows].mean()),
            "center": float(center[rows].mean()),
            "random": float(random[rows].mean()),
        }
    return {
        "pointing": float(hit.mean()),
        "baselines": {"center": float(center.mean()), "random": float(random.mean())},
        "by_type": by_type,
        "phrases": len(phrases),
        "hits": hit,
    }


def training_phrase_set(images, split: str, entities_dir: str | Path | None, tokenizer, region_boxes: np.ndarray) -> PhraseSet:
    """The phrases of a split's captions as the training loop sees them: `caption` indexes
    `images.flat_captions()`. Only Entities captions whose captions.txt row tokenizes to the same
    word pieces are used (the row the loop encodes is then the Entities caption)."""
    texts, owners = images.flat_captions()
    first = {}
    for flat, owner in enumerate(owners):
        first.setdefault(owner, flat)
    image_index = {name: i for i, name in enumerate(images.names)}
    entries, flat_rows = [], []
    for entry in load_phrase_captions(split, entities_dir):
        owner = image_index.get(entry.image)
        if owner is None or entry.captions_txt_index is None or entry.captions_txt_index >= len(images.captions[owner]):
            continue
        entries.append(entry)
        flat_rows.append(first[owner] + entry.captions_txt_index)
    if not entries:
        raise TeranInputError(f"no phrase of split {split!r} belongs to a photo of {images.root}")
    ours = tokenizer.encode([texts[row] for row in flat_rows], truncate=True).tokens
    theirs = tokenizer.encode([entry.caption for entry in entries], truncate=True).tokens
    keep = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a == b]
    phrases = build_phrase_set([entries[i] for i in keep], image_index, region_boxes, tokenizer)
    phrases.caption = np.asarray(flat_rows, np.int64)[keep][phrases.caption]
    return phrases


def dev_phrase_captions(images, split: str, entities_dir: str | Path | None) -> list[PhraseCaption]:
    """The split's phrase captions whose photo is among `images` (none when the phrase file is absent)."""
    path = Path(entities_dir or default_entities_dir()) / PHRASES_FILE
    if not path.is_file():
        return []
    names = set(images.names)
    try:
        return [c for c in load_phrase_captions(split, entities_dir) if c.image in names]
    except TeranInputError:
        return []


def model_pointing(model, image_feats, caption_feats, phrases: PhraseSet) -> dict:
    """Pointing game of a torch model on cached features (image_feats of the phrases' photos,
    caption_feats of their Entities captions)."""
    from teran.evaluate import encode_images, encode_texts

    model.eval()
    images, captions = encode_images(model, image_feats), encode_texts(model, caption_feats)
    return pointing_game(phrase_region_scores(images.concepts.numpy(), captions.concepts.numpy(), phrases), phrases)


# --------------------------------------------------------------------------- encoders


def _dev_photos(split: str, data_dir: str | None, captions: list[PhraseCaption]):
    data = load_split(split, data_dir)
    index = {name: i for i, name in enumerate(data.names)}
    missing = sorted({c.image for c in captions} - set(index))
    if missing:
        raise TeranInputError(f"{len(missing)} photos of the phrase file's {split!r} split are not in {data.root} (e.g. {missing[0]})")
    return data, index


def exported_concepts(exported, data, texts: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same from an exported model directory's ONNX graphs (teran.exported.ExportedModel)."""
    from teran.features import image_features

    image_feats = image_features(data, tuned_blocks=exported.image_tuned_blocks, progress=progress)
    images = exported.encode_regions(image_feats.regions, image_feats.boxes)
    captions = exported.encode_captions(texts)
    return images[1], captions[1], image_feats.boxes[0]


def _summary(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "hits"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m teran.grounding",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--checkpoint", default=None, help="training checkpoint (.pt) of this project")
    parser.add_argument("--model-dir", default=None, help="exported model directory (python -m export): score its ONNX graphs")
    parser.add_argument("--precision", default="fp32", help="graph precision with --model-dir (default fp32)")
    parser.add_argument("--split", default="dev", help="phrase split: train or dev (default dev)")
    parser.add_argument(
        "--entities-dir",
        default=None,
        help="folder with phrases.jsonl (default: $TERAN_ENTITIES_DIR or ../shared/data/flickr30k-entities)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Flickr8k-style photo folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)",
    )
    parser.add_argument("--tolerance", type=float, default=0.005, help="largest pointing difference allowed between checkpoint and graphs")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.model_dir):
        parser.error("give --checkpoint, --model-dir or both")
    started = time.monotonic()
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        captions = load_phrase_captions(args.split, args.entities_dir)
        data, image_index = _dev_photos(args.split, args.data_dir, captions)
        texts = [c.caption for c in captions]
        results, model_config = {}, None
        if args.checkpoint:
            from teran.backbones import tokenizer_file
            from teran.checkpoint import load_model
            from teran.features import image_features, text_features
            from teran.tokenization import CaptionTokenizer

            model, payload = load_model(args.checkpoint)
            model_config = payload["model_config"]
            say(f"checkpoint {args.checkpoint}: encoding {len(data.names)} photos and {len(texts)} captions ...")
            cfg = model.config
            image_feats = image_features(data, tuned_blocks=cfg.image_tuned_blocks, progress=not args.no_progress)
            text_feats = text_features(texts, max_tokens=cfg.max_tokens, tuned_layers=cfg.text_tuned_layers, progress=not args.no_progress)
            phrases = build_phrase_set(captions, image_index, image_feats.boxes[0], CaptionTokenizer(tokenizer_file(), cfg.max_tokens))
            results["checkpoint"] = model_pointing(model, image_feats, text_feats, phrases)
        if args.model_dir:
            from teran.exported import ExportedModel

            exported = ExportedModel(args.model_dir, args.precision)
            say(f"model directory {args.model_dir} ({args.precision}): encoding {len(data.names)} photos and {len(texts)} captions ...")
            image_concepts, caption_concepts, region_boxes = exported_concepts(exported, data, texts, progress=not args.no_progress)
            phrases = build_phrase_set(captions, image_index, region_boxes, exported.tokenizer)
            results["onnx"] = pointing_game(phrase_region_scores(image_concepts, caption_concepts, phrases), phrases)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    main_result = results.get("checkpoint") or results["onnx"]
    report = {
        "command": "python -m teran.grounding " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "checkpoint": args.checkpoint,
        "model_dir": args.model_dir,
        "split": args.split,
        "entities_dir": str(Path(args.entities_dir or default_entities_dir())),
        "data_dir": str(data.root),
        "rule": "sum of the phrase's word-piece similarities per region; hit when the best region's centre lies in a phrase box",
        "captions": len(captions),
        "dropped_phrases": phrases.dropped,
        **_summary(main_result),
        "model_config": model_config,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "seconds": round(time.monotonic() - started, 1),
    }
    status = 0
    if args.model_dir:
        onnx = results["onnx"]
        report["onnx"] = {"precision": args.precision, "pointing": onnx["pointing"], "by_type": onnx["by_type"]}
        if "checkpoint" in results:
            delta = onnx["pointing"] - results["checkpoint"]["pointing"]
            agree = float((onnx["hits"] == results["checkpoint"]["hits"]).mean())
            passed = abs(delta) <= args.tolerance
            report["onnx"].update({"delta": delta, "phrase_agreement": agree, "tolerance": args.tolerance, "pass": passed})
            status = 0 if passed else 1
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    base = main_result["baselines"]
    print(
        f"pointing game ({args.split}, {main_result['phrases']} phrases): {main_result['pointing']:.3f}  "
        f"(center {base['center']:.3f}, random {base['random']:.3f})"
    )
    for kind, row in main_result["by_type"].items():
        print(f"  {kind:12s} {row['phrases']:6d}  {row['pointing']:.3f}  (center {row['center']:.3f}, random {row['random']:.3f})")
    if "onnx" in report:
        line = f"onnx {args.precision}: {report['onnx']['pointing']:.3f}"
        if "delta" in report["onnx"]:
            line += f" (delta {report['onnx']['delta']:+.4f}, tolerance {args.tolerance})"
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
