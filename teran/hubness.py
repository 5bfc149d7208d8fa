"""The hub penalty of the served ranking: some gallery items ("hubs") sit close to many queries and
crowd the top of unrelated searches; the penalty lowers each item's score by how hub-like it is.

    python -m teran.hubness --checkpoint models/teran-flickr8k.pt   # attach a reference to a checkpoint

CSLS (Lample et al. 2018, "Word translation without parallel data") scores a pair as
2 s(q, x) - r(q) - r(x), r being the mean of an item's k best similarities to the other modality.
For one query r(q) is constant, so the ranking is that of s(q, x) - weight x r(x), weight 0.5.
Here r(x) is the mean of the k highest global cosines between item x and a fixed REFERENCE of the
other modality drawn from the training split (training photos for caption items, their captions for
photo items): it depends on the item alone, never on the gallery, so a search service computes it
once per item when indexing and stores it beside the vectors.

The core (HubReference, hub_statistic) is numpy only: the search service imports it. Building a
reference from a checkpoint (`build_reference`, the CLI) needs torch and the training data.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_K = 10  # CSLS's neighbourhood size
DEFAULT_WEIGHT = 0.5  # CSLS: 2 s - r(q) - r(x) ranks like s - 0.5 r(x)
DEFAULT_PHOTOS = 1000  # training photos in the reference (their captions: 5 each)
CHECKPOINT_KEY = "hub_reference"


def hub_statistic(vectors: np.ndarray, reference: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """r(x) for each row of `vectors` [N, D]: the mean of its k highest cosines with the rows of
    `reference` [M, D] (both unit vectors). float32 [N]."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    reference = np.asarray(reference, dtype=np.float32)
    k = max(1, min(int(k), reference.shape[0]))
    out = np.empty(vectors.shape[0], dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        sims = vectors[start : start + chunk] @ reference.T
        out[start : start + chunk] = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
    return out


def penalised(scores: np.ndarray, hub: np.ndarray, weight: float) -> np.ndarray:
    """The served score: `scores` (global cosine + w x MrSw) - weight x r(candidate)."""
    return np.asarray(scores, np.float32) - np.float32(weight) * np.asarray(hub, np.float32)


def penalised_matrix(scores: np.ndarray, image_hub: np.ndarray, caption_hub: np.ndarray, weight: float) -> np.ndarray:
    """A whole [images, captions] score matrix with both penalties: per caption (ranking photos) the
    caption's own term is a constant, and per photo the photo's, so each direction ranks exactly as
    the service does (`penalised` of the candidates of the other modality)."""
    w = np.float32(weight)
    return (
        np.asarray(scores, np.float32) - w * np.asarray(image_hub, np.float32)[:, None] - w * np.asarray(caption_hub, np.float32)[None, :]
    )


@dataclass(frozen=True)
class HubReference:
    """The model's reference sample: unit global vectors of training photos and of their captions."""

    images: np.ndarray  # [P, D]: the reference for caption items
    captions: np.ndarray  # [C, D]: the reference for photo items
    k: int = DEFAULT_K
    weight: float = DEFAULT_WEIGHT

    def __post_init__(self):
        for name in ("images", "captions"):
            value = getattr(self, name)
            if value.ndim != 2 or value.shape[0] < 1:
                raise ValueError(f"hub reference {name}: expected a non-empty [N, D] array, got shape {value.shape}")
        if self.images.shape[1] != self.captions.shape[1]:
            raise ValueError(f"hub reference: images have dimension {self.images.shape[1]}, captions {self.captions.shape[1]}")
        if not (self.k >= 1 and np.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"hub reference: k must be >= 1 and weight a finite number >= 0 (k={self.k}, weight={self.weight})")

    @property
    def dimension(self) -> int:
        return int(self.images.shape[1])

    def statistic(self, global_vectors: np.ndarray, items_are_images: bool) -> np.ndarray:
        """r(x) of photo items (against the reference captions) or caption items (against the reference photos)."""
        return hub_statistic(global_vectors, self.captions if items_are_images else self.images, self.k)

    def penalise(self, scores: np.ndarray, image_globals: np.ndarray, caption_globals: np.ndarray) -> np.ndarray:
        """penalised_matrix of a gallery's [images, captions] scores, given their global vectors."""
        return penalised_matrix(scores, self.statistic(image_globals, True), self.statistic(caption_globals, False), self.weight)

    def describe(self) -> str:
        return f"hub penalty {self.weight:g} x mean of the {self.k} best cosines ({len(self.images)} photos, {len(self.captions)} captions)"

    # -------------------------------------------------------------- (de)serialisation

    def to_checkpoint(self) -> dict:
        import torch

        return {
            "k": self.k,
            "weight": self.weight,
            "images": torch.from_numpy(self.images.astype(np.float16)),
            "captions": torch.from_numpy(self.captions.astype(np.float16)),
        }

    @classmethod
    def from_checkpoint(cls, payload: dict) -> HubReference | None:
        entry = payload.get(CHECKPOINT_KEY)
        if not entry:
            return None
        return cls(entry["images"].numpy(), entry["captions"].numpy(), int(entry["k"]), float(entry["weight"]))

    def save(self, directory: str | Path) -> dict:
        """Write the two reference files into a model directory; returns the manifest's `hub_penalty` entry."""
        files = {"image_reference": "hub-reference-images.npy", "caption_reference": "hub-reference-captions.npy"}
        np.save(Path(directory) / files["image_reference"], self.images.astype("<f2"))
        np.save(Path(directory) / files["caption_reference"], self.captions.astype("<f2"))
        return {"k": self.k, "weight": self.weight, **files}

    @classmethod
    def load(cls, directory: str | Path, entry: dict) -> HubReference:
        """Read it back from a model directory, given the manifest's `hub_penalty` entry."""
        directory = Path(directory)
        arrays = [np.load(directory / entry[key], allow_pickle=False) for key in ("image_reference", "caption_reference")]
        return cls(arrays[0], arrays[1], int(entry["k"]), float(entry["weight"]))


# ------------------------------------------------------------------ building one (torch, training data)


def build_reference(model, images, texts, caption_owners, photos: int = DEFAULT_PHOTOS, k: int = DEFAULT_K, weight: float = DEFAULT_WEIGHT):
    """Encode the first `photos` photos of `images` (training ImageFeatures) and all their captions
    (`texts`, TextFeatures with owners `caption_owners`) with `model`, a TeranModel."""
    import torch

    from teran.evaluate import encode_images, encode_texts
    from teran.features import ImageFeatures

    photos = min(photos, len(images.names))
    first = ImageFeatures(images.names[:photos], images.regions[:photos], images.boxes[:photos])
    model.eval()
    with torch.no_grad():
        image_vectors = encode_images(model, first).global_vec.numpy()
        caption_vectors = encode_texts(model, texts, np.flatnonzero(np.asarray(caption_owners) < photos)).global_vec.numpy()
    return HubReference(image_vectors, caption_vectors, k, weight)


def reference_for_checkpoint(
    model, data_dir: str | None = None, photos: int = DEFAULT_PHOTOS, k: int = DEFAULT_K, weight: float = DEFAULT_WEIGHT
):
    """build_reference on the training split (its features are those training cached)."""
    from teran.data.flickr8k import load_split
    from teran.features import image_features, text_features

    data = load_split("train", data_dir)
    captions, owners = data.flat_captions()
    images = image_features(data, tuned_blocks=model.config.image_tuned_blocks)
    texts = text_features(captions, max_tokens=model.config.max_tokens, tuned_layers=model.config.text_tuned_layers)
    return build_reference(model, images, texts, owners, photos, k, weight)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teran.hubness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt): the reference is added to it")
    parser.add_argument("--output", default=None, help="write the checkpoint with its reference here (default: in place)")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument("--photos", type=int, default=DEFAULT_PHOTOS, help=f"training photos in the reference (default {DEFAULT_PHOTOS})")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"best cosines averaged per item (default {DEFAULT_K})")
    parser.add_argument("--weight", type=float, default=DEFAULT_WEIGHT, help=f"penalty weight (default {DEFAULT_WEIGHT})")
    args = parser.parse_args(argv)
    if args.photos < 1 or args.k < 1 or not args.weight >= 0:
        parser.error("--photos and --k must be >= 1, --weight >= 0")

    from teran.checkpoint import load_model, save_checkpoint
    from teran.errors import TeranInputError

    try:
        model, payload = load_model(args.checkpoint)
        reference = reference_for_checkpoint(model, args.data_dir, args.photos, args.k, args.weight)
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = {
        key: value for key, value in payload.items() if key not in ("format", "format_version", "model_config", "backbones", "state_dict")
    }
    extra[CHECKPOINT_KEY] = reference.to_checkpoint()
    output = args.output or args.checkpoint
    save_checkpoint(output, model, **extra)
    print(f"{output}: {reference.describe()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
