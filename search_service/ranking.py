"""Re-ranking and explanations with THE numpy TERAN scoring (teran.alignment_numpy).

MrSw(image, caption) = sum over the caption's word pieces of the max over the image's regions of
the cosine. A caption query scores candidate images (its words against their regions); an image
query scores candidate captions (their words against its regions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teran.alignment_numpy import best_regions


def pad(sets: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[N_i, D] arrays -> float32 [len, max N_i, D] zero-padded + bool mask."""
    longest = max((s.shape[0] for s in sets), default=0)
    out = np.zeros((len(sets), max(longest, 1), dim), dtype=np.float32)
    mask = np.zeros((len(sets), max(longest, 1)), dtype=bool)
    for i, s in enumerate(sets):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


def stack_concepts(sets: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[N_i, D] arrays -> float16 block [len, max N_i, D] (zero padding) + counts [len]."""
    counts = np.array([s.shape[0] for s in sets], dtype=np.int64)
    block = np.zeros((len(sets), max(1, int(counts.max(initial=1))), dim), dtype=np.float16)
    for i, s in enumerate(sets):
        block[i, : s.shape[0]] = s
    return block, counts


def mrsw_block(query: np.ndarray, query_is_caption: bool, block: np.ndarray, counts: np.ndarray, chunk: int = 256) -> np.ndarray:
    """MrSw of one query ([W, D] words or [R, D] regions) against C candidates given as one padded block
    [C, L, D] (float16 or float32; candidate i has counts[i] real concept vectors): batched numpy, one matmul per chunk.

    MrSw = sum over the caption's word pieces of the max over the image's REAL regions of the cosine
    (padding never takes part, so a score does not depend on the other candidates of the batch)."""
    query = np.asarray(query, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    size, width, dim = block.shape
    scores = np.zeros(size, dtype=np.float32)
    offsets = np.arange(width)[None, :]
    for start in range(0, size, chunk):
        part = block[start : start + chunk]
        n = part.shape[0]
        sims = (part.reshape(n * width, dim).astype(np.float32) @ query.T).reshape(n, width, query.shape[0])  # [n, L, Q]
        valid = offsets < counts[start : start + n, None]  # [n, L]
        if query_is_caption:  # candidates are images: max over their regions (L), sum over the query's words (Q)
            sims = np.where(valid[:, :, None], sims, -np.inf)
            scores[start : start + n] = sims.max(axis=1).sum(axis=1)
        else:  # candidates are captions: max over the query's regions (Q), sum over their real words (L)
            scores[start : start + n] = np.where(valid, sims.max(axis=2), np.float32(0.0)).sum(axis=1)
    return scores


def mrsw_scores(query: np.ndarray, query_is_caption: bool, candidates: list[np.ndarray], chunk: int = 256) -> np.ndarray:
    """MrSw of one query ([W, D] words or [R, D] regions) against each candidate's concept set."""
    query = np.asarray(query, dtype=np.float32)
    if not candidates:
        return np.zeros(0, dtype=np.float32)
    block, mask = pad(candidates, query.shape[1])
    return mrsw_block(query, query_is_caption, block, mask.sum(axis=1), chunk)


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
