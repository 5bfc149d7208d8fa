"""In-memory two-stage ranking for the demo: global-vector first stage, MrSw re-rank.

Scores come from teran.alignment_numpy (the serving implementation of the TERAN scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teran.alignment_numpy import alignment_scores, best_regions


@dataclass
class Gallery:
    ids: list[str]
    globals_: np.ndarray  # [N, D]
    concepts: np.ndarray  # [N, M, D] zero-padded
    mask: np.ndarray  # [N, M]
    labels: list[list[str]]  # per item, per concept: word piece or region name
    boxes: np.ndarray | None  # [N, M, 4] for images

    @classmethod
    def build(cls, ids, globals_, concepts, labels, boxes) -> Gallery:
        width = max(len(c) for c in concepts)
        dim = len(globals_[0])
        padded = np.zeros((len(ids), width, dim), np.float32)
        mask = np.zeros((len(ids), width), bool)
        box_array = np.zeros((len(ids), width, 4), np.float32) if boxes is not None else None
        for row, items in enumerate(concepts):
            padded[row, : len(items)] = items
            mask[row, : len(items)] = True
            if box_array is not None:
                box_array[row, : len(items)] = boxes[row]
        return cls(list(ids), np.stack(globals_).astype(np.float32), padded, mask, [list(x) for x in labels], box_array)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {
            f"{prefix}_ids": np.array(self.ids),
            f"{prefix}_globals": self.globals_,
            f"{prefix}_concepts": self.concepts.astype(np.float16),
            f"{prefix}_mask": self.mask,
            f"{prefix}_labels": np.array(["\t".join(x) for x in self.labels]),
        }
        if self.boxes is not None:
            arrays[f"{prefix}_boxes"] = self.boxes
        return arrays

    @classmethod
    def from_arrays(cls, stored, prefix: str) -> Gallery:
        boxes = stored[f"{prefix}_boxes"] if f"{prefix}_boxes" in stored else None
        labels = [str(x).split("\t") for x in stored[f"{prefix}_labels"]]
        return cls(
            [str(x) for x in stored[f"{prefix}_ids"]],
            stored[f"{prefix}_globals"],
            stored[f"{prefix}_concepts"].astype(np.float32),
            stored[f"{prefix}_mask"],
            labels,
            boxes,
        )


@dataclass
class Match:
    word: str
    target: int  # region index (in the image: the hit for caption queries, the query for image queries)
    similarity: float
    box: np.ndarray


@dataclass
class Hit:
    id: str
    score: float
    first_stage: float
    matches: list[Match]


def rank(
    query_global: np.ndarray,
    query_concepts: np.ndarray,
    query_labels: list[str],
    gallery: Gallery,
    top_k: int,
    rerank_multiplier: int,
    alignment_from_targets: bool = False,
    query_boxes: np.ndarray | None = None,
) -> list[Hit]:
    """Top-k of `gallery` for one query.

    Caption query over images: the query's words are matched against each image's regions.
    Image query over captions (`alignment_from_targets`): each caption's words against the
    query image's regions.
    """
    first = gallery.globals_ @ query_global.astype(np.float32)
    candidates = np.argsort(-first)[: top_k * rerank_multiplier]
    query_mask = np.ones(len(query_concepts), bool)
    if alignment_from_targets:
        scores = alignment_scores(query_concepts[None], query_mask[None], gallery.concepts[candidates], gallery.mask[candidates])[0]
    else:
        scores = alignment_scores(gallery.concepts[candidates], gallery.mask[candidates], query_concepts[None], query_mask[None])[:, 0]
    order = candidates[np.argsort(-scores)][:top_k]
    score_of = dict(zip(candidates.tolist(), scores.tolist(), strict=True))
    hits = []
    for index in order:
        if alignment_from_targets:
            words, regions, sims = best_regions(query_concepts, query_mask, gallery.concepts[index], gallery.mask[index])
            labels = gallery.labels[index]
            boxes = query_boxes if query_boxes is not None else np.zeros((len(query_concepts), 4), np.float32)
        else:
            words, regions, sims = best_regions(gallery.concepts[index], gallery.mask[index], query_concepts, query_mask)
            labels = query_labels
            boxes = gallery.boxes[index]
        matches = [Match(labels[w], int(r), float(s), boxes[r]) for w, r, s in zip(words, regions, sims, strict=True)]
        hits.append(Hit(gallery.ids[index], float(score_of[int(index)]), float(first[index]), matches))
    return hits
