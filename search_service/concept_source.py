"""Where the re-rank gets its candidates' concept vectors: the in-memory re-rank cache when it is
enabled and usable, Milvus for what it misses. Keeps the cache in step with writes and deletes and
its gauges current."""

from __future__ import annotations

import logging

import numpy as np

from search_service.cache import RerankCache
from search_service.layout import CAPTIONS, IMAGES
from search_service.metrics import Metrics
from search_service.store import Item, MilvusStore, Stored


class ConceptSource:
    def __init__(self, store: MilvusStore, cache: RerankCache | None, metrics: Metrics, limit_mib: float, log: logging.Logger):
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.limit_mib = limit_mib
        self.log = log
        self._full_logged = False

    def usable(self) -> RerankCache | None:
        """The cache, if enabled and the collections carry stamps (schema format 2) and hold fp16 concepts (codes
        come with each candidate, a few KB an image: the re-rank decodes them, a cache would only hold more)."""
        store = self.store
        if self.cache is None or store.model is None or not store.stamped or store.layout.codec is not None:
            return None
        return self.cache

    def update_gauges(self) -> None:
        cache = self.cache
        if cache is None:
            return
        for modality in (IMAGES, CAPTIONS):
            self.metrics.cache_items.labels(modality).set(cache.items(modality))
        self.metrics.cache_bytes.set(cache.bytes())
        self.metrics.cache_full.set(1 if cache.full else 0)
        if cache.full and not self._full_logged:
            self._full_logged = True
            self.log.warning(
                "rerank cache full: items beyond --rerank-cache-mb are not cached; their concepts are fetched from Milvus per search",
                extra={"limit_mib": self.limit_mib, "items": cache.items(), "mib": round(cache.bytes() / 2**20, 1)},
            )
        elif not cache.full:
            self._full_logged = False

    def written(self, modality: str, items: list[Item]) -> None:
        """After Milvus acknowledged an upsert: cache the new versions (their stamps were set by the upsert)."""
        cache = self.usable()
        if cache is None:
            return
        for item in items:
            if not cache.put(modality, item.id, item.stamp, item.concepts):
                cache.remove(modality, [item.id])  # an older version must not linger (it would only miss, but holds memory)
        self.update_gauges()

    def deleted(self, modality: str, ids: list[str]) -> None:
        if self.cache is not None:
            self.cache.remove(modality, ids)
            self.update_gauges()

    def gather(self, cache: RerankCache, modality: str, candidates: list[Stored]) -> tuple[np.ndarray, np.ndarray, list[Stored]]:
        """(block [C, L, D] fp16, counts [C], candidates): hits from the cache, misses (absent or stale stamp) from Milvus.
        A candidate deleted since the first stage is dropped; one rewritten since takes the new version's fields."""
        store = self.store
        dim = store.known_model.dimension
        gathered = cache.gather(
            modality, [c.id for c in candidates], [c.stamp for c in candidates], [c.num_concepts for c in candidates], dim
        )
        block, counts = gathered.block, gathered.counts
        self.metrics.cache_lookups.labels("hit").inc(len(candidates) - len(gathered.missing))
        if not gathered.missing:
            return block, counts, candidates
        self.metrics.cache_lookups.labels("miss").inc(len(gathered.missing))
        fetched = store.concepts(modality, [candidates[i].id for i in gathered.missing])
        keep = np.ones(len(candidates), dtype=bool)
        for i in gathered.missing:
            c = candidates[i]
            row = fetched.get(c.id)
            if row is None:
                keep[i] = False
                continue
            if row.stamp != c.stamp:  # rewritten between the first stage and now: serve the new version whole
                c.metadata, c.labels, c.boxes, c.num_concepts, c.model, c.stamp = (
                    row.metadata,
                    row.labels,
                    row.boxes,
                    row.num_concepts,
                    row.model,
                    row.stamp,
                )
            assert row.concepts is not None  # store.concepts() always fetches them
            count = row.concepts.shape[0]
            if count > block.shape[1]:
                block = np.pad(block, ((0, 0), (0, count - block.shape[1]), (0, 0)))
            block[i, :count] = row.concepts
            counts[i] = count
            cache.put(modality, c.id, row.stamp, row.concepts)
        self.update_gauges()
        if not keep.all():
            candidates = [c for c, k in zip(candidates, keep, strict=True) if k]
            block, counts = block[keep], counts[keep]
        return block, counts, candidates
