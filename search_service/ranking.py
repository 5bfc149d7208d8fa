"""Re-ranking and explanations with THE numpy TERAN scoring (teran.alignment_numpy).

MrSw(image, caption) = sum over the caption's word pieces of the max over the image's regions of
the cosine. A caption query scores candidate images (its words against their regions); an image
query scores candidate captions (their words against its regions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teran.alignment_numpy import alignment_scores, best_regions


def pad(sets: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[N_i, D] arrays -> float32 [len, max N_i, D] zero-padded + bool mask."""
    longest = max((s.shape[0] for s in sets), default=0)
    out = np.zeros((len(sets), max(longest, 1), dim), dtype=np.float32)
    mask = np.zeros((len(sets), max(longest, 1)), dtype=bool)
    for i, s in enumerate(sets):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


def mrsw_scores(query: np.ndarray, query_is_caption: bool, candidates: list[np.ndarray], chunk: int = 256) -> np.ndarray:
    """MrSw of one query ([W, D] words or [R, D] regions) against each candidate's concept set."""
    query = np.asarray(query, dtype=np.float32)
    dim = query.shape[1]
    scores = np.zeros(len(candidates), dtype=np.float32)
    qmask = np.ones((1, query.shape[0]), dtype=bool)
    for start in range(0, len(candidates), chunk):
        block, mask = pad(candidates[start : start + chunk], dim)
        if query_is_caption:
            scores[start : start + len(block)] = alignment_scores(block, mask, query[None], qmask, "MrSw")[:, 0]
        else:
            scores[start : start + len(block)] = alignment_scores(query[None], qmask, block, mask, "MrSw")[0, :]
    return scores


@dataclass
class Alignment:
    word_index: int
    word_piece: str
    region_index: int
    box: list[float]
    similarity: float


def explain(regions: np.ndarray, boxes: np.ndarray | None, words: np.ndarray, word_pieces: list[str]) -> list[Alignment]:
    """For each word piece, its best region (index, box) and the cosine: the terms of MrSw."""
    regions = np.asarray(regions, dtype=np.float32)
    words = np.asarray(words, dtype=np.float32)
    word_idx, region_idx, sims = best_regions(regions, np.ones(regions.shape[0], dtype=bool), words, np.ones(words.shape[0], dtype=bool))
    out = []
    for w, r, s in zip(word_idx.tolist(), region_idx.tolist(), sims.tolist(), strict=True):
        label = word_pieces[w] if w < len(word_pieces) else f"#{w}"
        box = [float(v) for v in boxes[r]] if boxes is not None and r < len(boxes) else []
        out.append(Alignment(int(w), label, int(r), box, float(s)))
    return out
