"""Re-ranking and explanations with THE numpy TERAN scoring (teran.alignment_numpy).

MrSw(image, caption) = sum over the caption's word pieces of the max over the image's regions of
the cosine. A caption query scores candidate images (its words against their regions); an image
query scores candidate captions (their words against its regions). The served ranking adds it,
weighted, to the global cosine and subtracts the hub penalty (`rerank_scores`, teran.hubness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from search_service.concept_codes import ConceptCodec
from teran.alignment_numpy import blend_scores, word_regions
from teran.hubness import HubReference, penalised
from teran.words import content_words
from teran_api.types import WordAlignment


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


def stack_codes(codec: ConceptCodec, sets: list, num_concepts: list[int], images: bool) -> tuple[np.ndarray, np.ndarray]:
    """Candidates' stored codes -> float32 block [len, max N_i, K] + counts [len], decoded in one call: images
    (uint8 codes of ConceptCodec.encode_images) as codec.decode_images's coefficients in the full principal basis
    (K = D + 1), captions ([N_i, B] code arrays) as codec.decode_principal's (K = coded components + 1; padding rows
    hold whatever the zero codes decode to: counts mask them). Score them against `coded_query`."""
    counts = np.asarray(num_concepts, dtype=np.int64)
    if images:
        return codec.decode_images(sets, counts), counts
    width = max(1, int(counts.max(initial=1)))
    codes = np.zeros((len(sets), width, codec.bytes_per_vector), dtype=np.uint8)
    for i, s in enumerate(sets):
        codes[i, : s.shape[0]] = s
    return codec.decode_principal(codes), counts


def coded_query(codec: ConceptCodec, concepts: np.ndarray, images: bool) -> np.ndarray:
    """A query's full-precision concepts [N, D] in the basis of `stack_codes`'s block of images or captions."""
    return codec.image_query(concepts) if images else codec.principal_query(concepts)


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


@dataclass(frozen=True)
class Ranking:
    """How candidates are re-ranked: MrSw (blend_weight None) or global cosine + w x MrSw, less the hub
    penalty when `hub` is set (teran.hubness: weight x each candidate's stored hub statistic)."""

    blend_weight: float | None = None
    hub: HubReference | None = None

    @property
    def label(self) -> str:
        """SearchResponse.ranking: "MrSw", "blend w=0.08" (global cosine + w x MrSw), "blend w=0.08, hub 0.5"."""
        text = "MrSw" if self.blend_weight is None else f"blend w={self.blend_weight:g}"
        return text if self.hub is None else f"{text}, hub {self.hub.weight:g}"


def rerank_scores(
    query: np.ndarray,
    query_is_caption: bool,
    block: np.ndarray,
    counts: np.ndarray,
    global_cosines: np.ndarray,
    ranking: Ranking,
    hubs: np.ndarray,
    chunk: int = 256,
) -> np.ndarray:
    """The re-rank score of each candidate: MrSw (no blend weight), or the model's blend
    global cosine + w x MrSw (teran.alignment.blend_scores); less weight x `hubs` (the candidates'
    hub statistics) when the ranking has a hub penalty (teran.hubness.penalised)."""
    mrsw = mrsw_block(query, query_is_caption, block, counts, chunk)
    scores = mrsw if ranking.blend_weight is None else blend_scores(global_cosines, mrsw, ranking.blend_weight)
    return scores if ranking.hub is None else penalised(scores, hubs, ranking.hub.weight)


def mrsw_scores(query: np.ndarray, query_is_caption: bool, candidates: list[np.ndarray], chunk: int = 256) -> np.ndarray:
    """MrSw of one query ([W, D] words or [R, D] regions) against each candidate's concept set."""
    query = np.asarray(query, dtype=np.float32)
    if not candidates:
        return np.zeros(0, dtype=np.float32)
    block, mask = pad(candidates, query.shape[1])
    return mrsw_block(query, query_is_caption, block, mask.sum(axis=1), chunk)


def explain(regions: np.ndarray, boxes: np.ndarray | None, words: np.ndarray, word_pieces: list[str]) -> list[WordAlignment]:
    """For each content word of the caption (teran.words: pieces joined, no stop words or
    punctuation), the region where its pieces' mean cosine is highest, with its box."""
    labels = [word_pieces[i] if i < len(word_pieces) else f"#{i}" for i in range(words.shape[0])]
    shown = content_words(labels)
    region_idx, sims = word_regions(np.asarray(regions, np.float32), np.asarray(words, np.float32), [w.pieces for w in shown])
    out = []
    for word, r, s in zip(shown, region_idx.tolist(), sims.tolist(), strict=True):
        box = [float(v) for v in boxes[r]] if boxes is not None and r < len(boxes) else []
        first = word.pieces[0]
        piece = word_pieces[first] if first < len(word_pieces) else ""
        out.append(WordAlignment(first, piece, word.text, list(word.pieces), int(r), box, float(s)))
    return out
