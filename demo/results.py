"""Search hits as the demo shows them: id, scores and the word-region matches behind the score."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# Function words match "something" everywhere; the display shows content words.
STOPWORDS = frozenset("a an the of in on at to and or is are was with by for from near its his her their into onto".split())


@dataclass
class Match:
    word: str
    region: int  # region of the image side (the hit for caption queries, the query for image queries)
    similarity: float
    box: np.ndarray  # normalised x1, y1, x2, y2


@dataclass
class Hit:
    id: str
    score: float
    first_stage: float
    metadata: dict
    matches: list[Match]

    @classmethod
    def from_search_hit(cls, hit) -> Hit:
        """From a teran.v1.SearchHit."""
        matches = [Match(a.word_piece, a.region_index, a.similarity, np.asarray(a.box, np.float32)) for a in hit.alignment]
        return cls(hit.id, hit.score, hit.first_stage_score, json.loads(hit.metadata_json or "{}"), matches)

    def strongest_matches(self, count: int) -> list[Match]:
        """The most confident word-region matches, skipping function words and word-piece continuations (##...)."""
        words = [m for m in self.matches if not m.word.startswith("##") and m.word not in STOPWORDS]
        return sorted(words, key=lambda m: -m.similarity)[:count]
