"""Retrieval metrics: Recall@K both directions, rsum, and NDCG with ROUGE-L relevance (TERN).

Scores are an [images x captions] matrix; `owners[c]` is the image index of caption c.
"""

from __future__ import annotations

import numpy as np
from rouge_score import rouge_scorer

RECALL_KS = (1, 5, 10)


def recall_at_k(scores: np.ndarray, owners: np.ndarray) -> dict[str, dict[str, float]]:
    """i2t: rank of an image's best-ranked own caption; t2i: rank of a caption's image."""
    n_images, n_captions = scores.shape
    own = owners[None, :] == np.arange(n_images)[:, None]  # [I, C]
    # i2t: number of captions scoring above the image's best own caption.
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    i2t_rank = (scores > best_own[:, None]).sum(axis=1)
    # t2i: number of images scoring above the caption's own image.
    own_score = scores[owners, np.arange(n_captions)]
    t2i_rank = (scores > own_score[None, :]).sum(axis=0)
    out = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        out[name] = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
        out[name]["median_rank"] = float(np.median(ranks) + 1)
    out["rsum"] = float(sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return out


def _lcs_lengths(queries: np.ndarray, query_lengths: np.ndarray, match_masks: np.ndarray) -> np.ndarray:
    """LCS lengths of every query against every target, bit-parallel (Crochemore et al. 2001).

    `match_masks[t, v]` has bit j set where target t's token j is vocabulary id v (targets of
    at most 64 tokens). Returns int [len(targets), len(queries)].
    """
    n_targets = match_masks.shape[0]
    v = np.full((n_targets, len(queries)), np.uint64(0xFFFFFFFFFFFFFFFF))
    for i in range(queries.shape[1]):
        active = i < query_lengths
        chars = np.where(active, queries[:, i], 0)
        u = v & match_masks[:, chars]
        stepped = (v + u) | (v - u)
        v = np.where(active[None, :], stepped, v)
    return v


class RougeL:
    """ROUGE-L F-measure between captions, with rouge-score's own tokenizer and definition.

    rouge-score scores one pair at a time in Python; a 5,000-caption gallery needs 25M pairs,
    so the LCS runs vectorised here (tests check it equals rouge-score's values).
    """

    def __init__(self, captions: list[str], max_len: int = 63):
        tokenizer = rouge_scorer.RougeScorer(["rougeL"])._tokenizer
        vocab: dict[str, int] = {}
        rows = [[vocab.setdefault(t, len(vocab)) for t in tokenizer.tokenize(c)][:max_len] for c in captions]
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self.vocab_size = max(1, len(vocab))
        self.tokens = np.full((len(rows), max(1, self.lengths.max())), -1, dtype=np.int64)
        for index, row in enumerate(rows):
            self.tokens[index, : len(row)] = row

    def pairwise(self, queries: np.ndarray, targets: np.ndarray, chunk: int = 512) -> np.ndarray:
        """F-measure for every (query, target) caption index pair: [len(queries), len(targets)]."""
        out = np.empty((len(queries), len(targets)), dtype=np.float32)
        lq = self.lengths[queries].astype(np.float32)
        for start in range(0, len(targets), chunk):
            block = targets[start : start + chunk]
            masks = np.zeros((len(block), self.vocab_size), dtype=np.uint64)
            for j in range(self.tokens.shape[1]):
                ids = self.tokens[block, j]
                rows = np.flatnonzero(ids >= 0)
                masks[rows, ids[rows]] |= np.uint64(1 << j)
            v = _lcs_lengths(self.tokens[queries], self.lengths[queries], masks)
            low_bits = (np.uint64(1) << self.lengths[block].astype(np.uint64)) - np.uint64(1)
            lcs = np.bitwise_count(~v & low_bits[:, None]).T.astype(np.float32)
            lt = self.lengths[block].astype(np.float32)[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                precision, recall = lcs / lq[:, None], lcs / lt
                f = 2 * precision * recall / (precision + recall)
            out[:, start : start + chunk] = np.nan_to_num(f)
        return out


def caption_relevance(captions: list[str], owners: np.ndarray) -> np.ndarray:
    """relevance[c, i] = mean ROUGE-L F of caption c against the captions of image i: [C, I]."""
    rouge = RougeL(captions)
    pairwise = rouge.pairwise(np.arange(len(captions)), np.arange(len(captions)))
    n_images = int(owners.max()) + 1
    relevance = np.zeros((len(captions), n_images), dtype=np.float32)
    np.add.at(relevance.T, owners, pairwise.T)
    return relevance / np.bincount(owners, minlength=n_images)[None, :]


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int = 25) -> float:
    """Mean NDCG@k of rankings (rows of `scores` are queries) against graded `relevance`.

    Gain 2^rel - 1, discount log2(position + 2), normalised by the ideal ordering.
    """
    discounts = 1.0 / np.log2(np.arange(k) + 2)
    top = np.argsort(-scores, axis=1)[:, :k]
    dcg = ((2.0 ** np.take_along_axis(relevance, top, axis=1) - 1) * discounts[: top.shape[1]]).sum(axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :k]
    idcg = ((2.0**ideal - 1) * discounts[: ideal.shape[1]]).sum(axis=1)
    return float(np.mean(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)))


def ndcg_both_directions(scores: np.ndarray, relevance: np.ndarray, k: int = 25) -> dict[str, float]:
    """scores [I, C]; relevance [C, I] (caption c vs image i). i2t ranks captions, t2i ranks images."""
    return {"i2t": ndcg_at_k(scores, relevance.T, k), "t2i": ndcg_at_k(scores.T, relevance, k)}
