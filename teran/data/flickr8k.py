"""Flickr8k-style folders: `images/`, `captions.txt` (CSV image,caption) and split lists.

Any folder with the same layout works (`--data-dir` or TERAN_FLICKR8K_DIR).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from teran.errors import TeranInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "flickr8k"
SPLIT_FILES = {"train": "train_images.txt", "dev": "dev_images.txt", "test": "test_images.txt"}


def default_data_dir() -> Path:
    return Path(os.environ.get("TERAN_FLICKR8K_DIR", DEFAULT_DATA_DIR))


@dataclass
class CaptionedImages:
    """Images of one split, each with its captions (5 for Flickr8k)."""

    root: Path
    names: list[str]
    captions: list[list[str]]

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.names[index]

    def flat_captions(self) -> tuple[list[str], list[int]]:
        """All captions in order, and the image index of each."""
        texts, owners = [], []
        for index, caps in enumerate(self.captions):
            texts.extend(caps)
            owners.extend([index] * len(caps))
        return texts, owners


def read_captions(path: Path) -> dict[str, list[str]]:
    """Parse `image,caption` CSV rows, splitting on the first comma only."""
    if not path.is_file():
        raise TeranInputError(f"{path}: captions file does not exist")
    by_image: dict[str, list[str]] = defaultdict(list)
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().strip()
        if header != "image,caption":
            raise TeranInputError(f"{path}: expected header 'image,caption', found {header!r}")
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            name, sep, caption = line.partition(",")
            if not sep or not caption.strip():
                raise TeranInputError(f"{path}:{line_number}: expected 'image,caption'")
            by_image[name].append(caption.strip())
    return dict(by_image)


def load_split(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> CaptionedImages:
    """Load the images of a split (`train`, `dev`, `test`, `all`) with their captions."""
    root = Path(data_dir) if data_dir else default_data_dir()
    if not (root / "images").is_dir():
        raise TeranInputError(f"{root}: no images/ folder (is this a Flickr8k-style data dir?)")
    captions = read_captions(root / "captions.txt")
    if split == "all":
        names = sorted(captions)
    else:
        if split not in SPLIT_FILES:
            raise TeranInputError(f"unknown split {split!r}; choose one of {sorted(SPLIT_FILES)} or 'all'")
        list_file = root / SPLIT_FILES[split]
        if not list_file.is_file():
            raise TeranInputError(f"{list_file}: split list does not exist")
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    missing = [name for name in names if name not in captions]
    if missing:
        raise TeranInputError(f"{root}: {len(missing)} images of split {split!r} have no captions, e.g. {missing[0]}")
    if limit:
        names = names[:limit]
    return CaptionedImages(root=root, names=names, captions=[captions[name] for name in names])
