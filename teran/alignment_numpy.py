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


def best_regions(regions: np.ndarray, region_mask: np.ndarray, words: np.ndarray, word_mask: np.ndarray):
    """For one image [R, D] and one caption [W, D]: each real word's best real region and its similarity.

    Returns (word_indices, region_indices, similarities): the explanation behind MrSw.
    """
    sims = words.astype(np.float32) @ regions.astype(np.float32).T  # [W, R]
    sims = np.where(region_mask[None, :], sims, -np.inf)
    word_indices = np.flatnonzero(word_mask)
    best = sims[word_indices].argmax(axis=1)
    return word_indices, best, sims[word_indices, best]
