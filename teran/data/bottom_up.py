"""The authors' released bottom-up feature layout (Faster R-CNN on Visual Genome, 36 regions):

    features_36/bu_att/{id}.npz   key "feat": float32 [36, 2048]
    features_36/bu_box/{id}.npy   float32 [36, 4], x1 y1 x2 y2 in pixels

COCO ids are COCO image ids (sizes from the COCO annotation json); Flickr30k ids are the
image's index in the Karpathy json (sizes from a pickled list of (width, height)). Boxes are
returned normalised by [W, H, W, H], as both TERAN and our image encoder expect.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from teran.errors import FeatureShapeError, TeranInputError
from teran.features import ImageFeatures

REGIONS, FEATURE_DIM = 36, 2048


def load_coco_sizes(annotation_json: str | Path) -> dict[str, tuple[int, int]]:
    """{image id: (width, height)} from a COCO annotation file's `images` list."""
    path = Path(annotation_json)
    try:
        images = json.loads(path.read_text())["images"]
        return {str(image["id"]): (int(image["width"]), int(image["height"])) for image in images}
    except FileNotFoundError:
        raise TeranInputError(f"{path}: COCO annotation file does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TeranInputError(f"{path}: not a COCO annotation file with images[].id/width/height ({exc})") from None


class _SizesUnpickler(pickle.Unpickler):
    """sizes.pkl holds only lists/tuples of ints: refuse every global (no code runs on load)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def load_flickr30k_sizes(sizes_pkl: str | Path) -> dict[str, tuple[int, int]]:
    """{index as str: (width, height)} from the released `sizes.pkl`."""
    path = Path(sizes_pkl)
    try:
        with path.open("rb") as handle:
            sizes = _SizesUnpickler(handle).load()
        return {str(index): (int(w), int(h)) for index, (w, h) in enumerate(sizes)}
    except FileNotFoundError:
        raise TeranInputError(f"{path}: sizes file does not exist") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as exc:
        raise TeranInputError(f"{path}: not a pickled list of (width, height) ({exc})") from None


class BottomUpFeatures:
    """Reads `bu_att` / `bu_box` files of a `features_36` folder, validating every array."""

    def __init__(self, root: str | Path, sizes: dict[str, tuple[int, int]]):
        self.root = Path(root)
        self.sizes = sizes
        for sub in ("bu_att", "bu_box"):
            if not (self.root / sub).is_dir():
                raise TeranInputError(f"{self.root}: no {sub}/ folder (expected the features_36 layout)")

    def load(self, image_id: str | int) -> tuple[np.ndarray, np.ndarray]:
        """Features float32 [36, 2048] and normalised boxes float32 [36, 4] of one image."""
        image_id = str(image_id)
        att, box = self.root / "bu_att" / f"{image_id}.npz", self.root / "bu_box" / f"{image_id}.npy"
        try:
            with np.load(att) as stored:
                if "feat" not in stored:
                    raise FeatureShapeError(f"{att}: no 'feat' array (found {sorted(stored.files)})")
                features = stored["feat"]
            boxes = np.load(box)
        except FileNotFoundError as exc:
            raise TeranInputError(f"{exc.filename}: feature file does not exist") from None
        except (OSError, ValueError) as exc:
            raise FeatureShapeError(f"{att.name}/{box.name}: unreadable feature file ({exc})") from None
        if features.shape != (REGIONS, FEATURE_DIM):
            raise FeatureShapeError(f"{att}: features have shape {features.shape}, expected ({REGIONS}, {FEATURE_DIM})")
        if boxes.shape != (REGIONS, 4):
            raise FeatureShapeError(f"{box}: boxes have shape {boxes.shape}, expected ({REGIONS}, 4)")
        if not (np.isfinite(features).all() and np.isfinite(boxes).all()):
            raise FeatureShapeError(f"{att.name}/{box.name}: non-finite values")
        if image_id not in self.sizes:
            raise TeranInputError(f"image {image_id}: no width/height in the sizes file")
        width, height = self.sizes[image_id]
        normalised = boxes.astype(np.float32) / np.array([width, height, width, height], np.float32)
        return features.astype(np.float32), normalised

    def image_features(self, image_ids: list[str]) -> ImageFeatures:
        """All images as ImageFeatures (region_dim 2048), for training or evaluation."""
        loaded = [self.load(i) for i in image_ids]
        return ImageFeatures(
            [str(i) for i in image_ids],
            np.stack([f for f, _ in loaded]).astype(np.float16),
            np.stack([b for _, b in loaded]),
        )
