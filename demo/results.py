"""Search hits as the demo shows them: id, scores and the word-region matches behind the score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Match:
    word: str  # a whole content word of the caption side (the server leaves out stop words and punctuation)
    region: int  # region of the image side (the hit for caption queries, the query for image queries)
    similarity: float  # mean cosine of the word's pieces and the region, -1..1
    box: np.ndarray  # normalised x1, y1, x2, y2 (empty when the image has no boxes)


@dataclass
class Hit:
    id: str
    score: float
    first_stage: float
    metadata: dict
    matches: list[Match]

    @classmethod
    def from_search_hit(cls, hit) -> Hit:
        """From a teran_api.types.SearchHit (its `alignment`: one entry per content word of the caption side)."""
        matches = [Match(a.word, a.region_index, a.similarity, np.asarray(a.box, np.float32)) for a in hit.alignment]
        return cls(hit.id, hit.score, hit.first_stage_score, hit.metadata, matches)

    def strongest_matches(self, count: int) -> list[Match]:
        """The `count` words most similar to their region, most similar first."""
        return sorted(self.matches, key=lambda m: -m.similarity)[:count]
