"""TERAN scores in numpy for serving (no torch). Same definitions as teran.alignment."""

from __future__ import annotations

import numpy as np

MODES = ("MrSw", "MwSr", "symm", "MrAVGw")


def alignment_scores(
    regions: np.ndarray, region_mask: np.ndarray, words: np.ndarray, word_mask: np.ndarray, mode: str = "MrSw"
) -> np.ndarray:
    """Every image against every caption: [Ni, R, D] x [Nt, W, D] -> float32 scores [Ni, Nt]."""
    if mode not in MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; choose one of {MODES}")
    regions = regions.astype(np.float32, copy=False)
    words = words.astype(np.float32, copy=False)
    sims = np.einsum("ird,twd->itrw", regions, words, optimize=True)
    valid = region_mask[:, None, :, None] & word_mask[None, :, None, :]
    sims = np.where(valid, sims, np.float32(0.0))
    scores = np.zeros(sims.shape[:2], dtype=np.float32)
    if mode in ("MrSw", "symm", "MrAVGw"):
        scores += sims.max(axis=2).sum(axis=-1)
    if mode in ("MwSr", "symm"):
        scores += sims.max(axis=3).sum(axis=-1)
    if mode == "MrAVGw":
        scores /= np.maximum(word_mask.sum(axis=1), 1).astype(np.float32)[None, :]
    return scores


def global_scores(image_global: np.ndarray, text_global: np.ndarray) -> np.ndarray:
    return image_global.astype(np.float32) @ text_global.astype(np.float32).T


def blend_scores(global_: np.ndarray, alignment: np.ndarray, weight: float) -> np.ndarray:
    """global cosine + weight x MrSw: the served ranking score (teran.alignment.blend_scores)."""
    return np.asarray(global_, np.float32) + np.float32(weight) * np.asarray(alignment, np.float32)


def word_regions(regions: np.ndarray, words: np.ndarray, groups: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """For one image [R, D] and one caption's word pieces [W, D]: for each group of pieces (a whole
    word, or a phrase), the region where the pieces' mean cosine is highest, and that mean.

    The rule of the pointing game (teran.grounding) for one word: the region that best explains it.
    Returns (region index [G], similarity [G] in -1..1).
    """
    sims = words.astype(np.float32) @ regions.astype(np.float32).T  # [W, R]
    member = np.zeros((len(groups), sims.shape[0]), dtype=np.float32)
    for row, pieces in enumerate(groups):
        member[row, list(pieces)] = 1.0 / len(pieces)
    group_sims = member @ sims  # [G, R]
    best = group_sims.argmax(axis=1) if len(groups) else np.zeros(0, dtype=np.int64)
    return best, group_sims[np.arange(len(groups)), best]
