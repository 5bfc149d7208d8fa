"""Frozen-backbone features, computed once and cached on disk.

Cache files are keyed by a fingerprint of everything they depend on (backbone weights,
preprocessing, the exact image list or captions), so a change invalidates them.

    python -m teran.features --config configs/flickr8k.yaml     # precompute train + dev with progress
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from teran import backbones
from teran.cache import cache_dir, file_digest, fingerprint
from teran.config import ModelConfig, load_train_config
from teran.data.flickr8k import CaptionedImages, load_split
from teran.errors import TeranInputError
from teran.preprocess import PixelSpec, read_image_file, to_pixels
from teran.tokenization import CaptionTokenizer

FEATURE_FORMAT_VERSION = 1


@dataclass
class ImageFeatures:
    names: list[str]
    regions: np.ndarray  # float16 [N, R, C]
    boxes: np.ndarray  # float32 [N, R, 4], normalised x1 y1 x2 y2


@dataclass
class TextFeatures:
    hidden: np.ndarray  # float16 [T, H]: backbone states of all captions, concatenated
    offsets: np.ndarray  # int64 [M + 1]: caption m owns hidden[offsets[m]:offsets[m+1]]
    input_ids: np.ndarray  # int32 [T]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded hidden states [B, L, H] (float32) and attention mask [B, L] (bool)."""
        lengths = self.offsets[indices + 1] - self.offsets[indices]
        width = int(lengths.max())
        out = np.zeros((len(indices), width, self.hidden.shape[1]), dtype=np.float32)
        mask = np.zeros((len(indices), width), dtype=bool)
        for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            start = self.offsets[index]
            out[row, :length] = self.hidden[start : start + length]
            mask[row, :length] = True
        return torch.from_numpy(out), torch.from_numpy(mask)


def _names_digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _atomic_save(path: Path, **arrays) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def image_features(
    images: CaptionedImages, batch_size: int = 32, spec: PixelSpec = PixelSpec(), tuned_blocks: int = 0, progress: bool = True
) -> ImageFeatures:
    """Region features of every image of `images` (cached).

    `tuned_blocks`: the model trains the trunk's top blocks itself, so the grid is taken below them.
    """
    settings = {
        "version": FEATURE_FORMAT_VERSION,
        "backbone": backbones.IMAGE_BACKBONE,
        "weights": file_digest(backbones.image_weights_file()),
        "pixels": asdict(spec),
        "root": str(images.root.resolve()),
        "names": _names_digest(images.names),
    }
    if tuned_blocks:  # keeps the keys of existing caches for the whole trunk
        settings["tuned_blocks"] = tuned_blocks
    path = cache_dir() / f"image-features-{fingerprint(settings)}.npz"
    if path.exists():
        with np.load(path) as stored:
            return ImageFeatures(images.names, stored["regions"], stored["boxes"])
    backbone = backbones.GridImageBackbone(spec.size, drop_top_blocks=tuned_blocks)
    regions, boxes = [], []
    started = time.monotonic()
    with torch.inference_mode(), tqdm(total=len(images.names), desc="image features", unit="img", disable=not progress) as bar:
        for start in range(0, len(images.names), batch_size):
            pixels = np.stack(
                [to_pixels(read_image_file(images.image_path(i)), spec) for i in range(start, min(start + batch_size, len(images.names)))]
            )
            batch_regions, batch_boxes = backbone(torch.from_numpy(pixels))
            regions.append(batch_regions.numpy().astype(np.float16))
            boxes.append(batch_boxes.numpy())
            bar.update(len(pixels))
    result = ImageFeatures(images.names, np.concatenate(regions), np.concatenate(boxes))
    _atomic_save(path, regions=result.regions, boxes=result.boxes)
    if progress:
        print(
            f"image features: {len(images.names)} images -> {result.regions.shape} in {time.monotonic() - started:.0f}s, cached at {path}",
            file=sys.stderr,
        )
    return result


def text_features(
    captions: list[str], max_tokens: int = 64, tuned_layers: int = 0, batch_size: int = 256, progress: bool = True
) -> TextFeatures:
    """Backbone hidden states of every caption (cached); over-long captions are truncated.

    `tuned_layers`: the model trains the backbone's top layers itself, so the states are taken below them.
    """
    settings = {
        "version": FEATURE_FORMAT_VERSION,
        "backbone": backbones.TEXT_BACKBONE,
        "weights": file_digest(backbones.text_backbone_dir() / "model.safetensors"),
        "max_tokens": max_tokens,
        "captions": _names_digest(captions),
    }
    if tuned_layers:  # keeps the keys of existing caches for the whole backbone
        settings["tuned_layers"] = tuned_layers
    key = fingerprint(settings)
    path = cache_dir() / f"text-features-{key}.npz"
    if path.exists():
        with np.load(path) as stored:
            return TextFeatures(stored["hidden"], stored["offsets"], stored["input_ids"])
    tokenizer = CaptionTokenizer(backbones.tokenizer_file(), max_tokens=max_tokens)
    model = backbones.load_text_backbone(drop_top_layers=tuned_layers)
    hidden, ids, lengths = [], [], []
    started = time.monotonic()
    with torch.inference_mode(), tqdm(total=len(captions), desc="text features", unit="cap", disable=not progress) as bar:
        for start in range(0, len(captions), batch_size):
            batch = tokenizer.encode(captions[start : start + batch_size], truncate=True)
            states = model(
                input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask)
            ).last_hidden_state.numpy()
            for row, length in enumerate(batch.attention_mask.sum(axis=1)):
                hidden.append(states[row, :length].astype(np.float16))
                ids.append(batch.input_ids[row, :length].astype(np.int32))
                lengths.append(int(length))
            bar.update(len(batch.tokens))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    result = TextFeatures(np.concatenate(hidden), offsets, np.concatenate(ids))
    _atomic_save(path, hidden=result.hidden, offsets=result.offsets, input_ids=result.input_ids)
    if progress:
        print(
            f"text features: {len(captions)} captions, {len(result.hidden)} word pieces in "
            f"{time.monotonic() - started:.0f}s, cached at {path}",
            file=sys.stderr,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teran.features", description=__doc__.splitlines()[0])
    parser.add_argument("--split", action="append", default=None, help="train, dev, test or all (repeatable; default train and dev)")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument(
        "--config", default=None, help="training config: take max_tokens, text_tuned_layers and image_tuned_blocks from its model settings"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="word pieces per caption incl. [CLS]/[SEP] (default 64)")
    parser.add_argument("--text-tuned-layers", type=int, default=None, help="top text backbone layers the model trains itself (default 0)")
    parser.add_argument("--image-tuned-blocks", type=int, default=None, help="top image trunk blocks the model trains itself (default 0)")
    args = parser.parse_args(argv)
    try:
        model = load_train_config(args.config).model if args.config else ModelConfig()
        max_tokens = args.max_tokens if args.max_tokens is not None else model.max_tokens
        tuned = args.text_tuned_layers if args.text_tuned_layers is not None else model.text_tuned_layers
        blocks = args.image_tuned_blocks if args.image_tuned_blocks is not None else model.image_tuned_blocks
        # Rejects a layer or block count the backbones do not have.
        ModelConfig(max_tokens=max_tokens, text_tuned_layers=tuned, image_tuned_blocks=blocks)
        for split in args.split or ["train", "dev"]:
            data = load_split(split, args.data_dir)
            image_features(data, tuned_blocks=blocks)
            text_features(data.flat_captions()[0], max_tokens=max_tokens, tuned_layers=tuned)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
