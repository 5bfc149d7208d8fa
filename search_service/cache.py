"""In-process re-rank cache: the decoded fp16 concept vectors of the stored items, rebuilt from Milvus.

Milvus stays the system of record; the cache only saves moving (and base64-decoding) every
candidate's concepts per search: with it the first stage returns ids, scores, small fields and each
row's `stamp`, and the re-rank gathers the candidates' concepts from here.

Layout per modality: one contiguous float16 array `rows [capacity, D]` (allocated once, lazily
committed by the OS, so resident memory grows with what is stored) holding every cached item's
concept vectors back to back, and `id -> (start, count, stamp)`. An upsert appends (the old rows
become garbage, reclaimed by an in-place compaction when the limit is reached); a delete drops the
id. `limit_bytes` bounds the concept rows of both modalities together (live + garbage); an item that
does not fit is not cached (`full` is set, logged once, `teran_search_rerank_cache_full` = 1) and its
concepts are fetched from Milvus at each search that needs it (a miss).

Consistency: every stored row carries a random 63-bit `stamp`, new at each write (any replica). A
search reads the candidates' stamps from Milvus with the first stage and uses a cached entry only if
its stamp matches; a missing or stale entry is a miss: fetched from Milvus, then cached. So a write
by another replica is never served stale (whatever the refresh period); `refresh` (periodic, optional)
drops entries of rows deleted or rewritten elsewhere and loads rows written elsewhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

FP16 = np.dtype("<f2")


@dataclass
class Gathered:
    """Concepts of a candidate list: block [C, L, D] float16 (rows past counts[i] are padding), counts [C],
    and the indices of the candidates that missed (not cached or stale) and still need filling."""

    block: np.ndarray
    counts: np.ndarray
    missing: list[int]


class _Modality:
    def __init__(self, dim: int, capacity_rows: int):
        self.dim = dim
        self.capacity = capacity_rows
        self.rows: np.ndarray | None = None  # allocated at the first put
        self.index: dict[str, tuple[int, int, int]] = {}  # id -> (start, count, stamp)
        self.top = 0  # rows in use (live + garbage)
        self.live = 0

    def _allocate(self) -> np.ndarray:
        """The rows, allocated at the first call."""
        while self.rows is None:
            try:
                self.rows = np.empty((self.capacity, self.dim), dtype=FP16)  # untouched pages cost no memory
            except MemoryError:  # strict overcommit: reserve less (the limit then binds earlier)
                if self.capacity <= 1024:
                    raise
                self.capacity //= 2
        return self.rows

    def compact(self) -> None:
        """Move the live entries down over the garbage, in place (ascending starts: each copy goes down)."""
        if self.rows is None or self.live == self.top:
            return
        position = 0
        for key, (start, count, stamp) in sorted(self.index.items(), key=lambda kv: kv[1][0]):
            if start != position:
                self.rows[position : position + count] = self.rows[start : start + count]
                self.index[key] = (position, count, stamp)
            position += count
        self.top = position


class RerankCache:
    """Thread-safe. `limit_bytes` bounds the fp16 concept rows of all modalities together."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self.dim = 0
        self._modalities: dict[str, _Modality] = {}
        self._lock = threading.RLock()
        self.full = False  # an item was left out for the limit (misses go to Milvus)
        self.hits = 0
        self.misses = 0
        self.loaded = threading.Event()  # the startup load finished (or there was nothing to load)
        self.state = "empty"

    # ------------------------------------------------------------------ sizes

    @property
    def row_bytes(self) -> int:
        return 2 * self.dim

    def _budget_rows(self) -> int:
        return self.limit_bytes // self.row_bytes if self.dim else 0

    def _used_rows(self) -> int:
        return sum(m.top for m in self._modalities.values())

    def bytes(self) -> int:
        with self._lock:
            return self._used_rows() * self.row_bytes

    def items(self, modality: str | None = None) -> int:
        with self._lock:
            if modality is not None:
                m = self._modalities.get(modality)
                return len(m.index) if m else 0
            return sum(len(m.index) for m in self._modalities.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "state": self.state,
                "items": {k: len(m.index) for k, m in self._modalities.items()},
                "bytes": self._used_rows() * self.row_bytes,
                "limit_bytes": self.limit_bytes,
                "full": self.full,
                "hits": self.hits,
                "misses": self.misses,
            }

    def _modality(self, modality: str, dim: int) -> _Modality:
        if self.dim == 0:
            self.dim = dim
        if dim != self.dim:
            raise ValueError(f"concept dimension {dim} != the cache's {self.dim}")
        m = self._modalities.get(modality)
        if m is None:
            # Each modality may use the whole budget (virtual); the budget is checked over both.
            m = self._modalities[modality] = _Modality(dim, max(1, self.limit_bytes // (2 * dim)))
        return m

    # ------------------------------------------------------------------ writes

    def put(self, modality: str, item_id: str, stamp: int, concepts: np.ndarray, *, if_absent: bool = False) -> bool:
        """Cache `concepts` [N, D] of `item_id` at `stamp`; False if it does not fit the limit (then not cached).
        if_absent: keep an entry already there (the loader must not overwrite a newer write by this service)."""
        concepts = np.asarray(concepts)
        count, dim = concepts.shape
        with self._lock:
            m = self._modality(modality, dim)
            old = m.index.get(item_id)
            if old is not None:
                if if_absent or old[2] == stamp:
                    return True
                del m.index[item_id]
                m.live -= old[1]
            m._allocate()
            if not self._reserve(m, count):
                self.full = True
                return False
            start = m.top
            rows = m._allocate()  # the array allocated above (compaction works in place)
            rows[start : start + count] = concepts
            m.index[item_id] = (start, count, int(stamp))
            m.top += count
            m.live += count
            return True

    def _reserve(self, m: _Modality, count: int) -> bool:
        budget = self._budget_rows()
        if self._used_rows() + count <= budget and m.top + count <= m.capacity:
            return True
        # Reclaim garbage only when it is worth a pass over the rows (>= 1/8 of them, and enough for this item):
        # amortised O(1) per write even when a full cache keeps being rewritten.
        garbage = sum(x.top - x.live for x in self._modalities.values())
        if garbage >= count and garbage * 8 >= self._used_rows():
            for other in self._modalities.values():
                other.compact()
        return self._used_rows() + count <= budget and m.top + count <= m.capacity

    def remove(self, modality: str, ids) -> None:
        with self._lock:
            m = self._modalities.get(modality)
            if m is None:
                return
            for item_id in ids:
                old = m.index.pop(item_id, None)
                if old is not None:
                    m.live -= old[1]

    def retain(self, modality: str, live: dict[str, int]) -> int:
        """Drop entries whose id is not in `live` (id -> stamp in Milvus) or whose stamp differs; returns how many."""
        with self._lock:
            m = self._modalities.get(modality)
            if m is None:
                return 0
            stale = [k for k, (_s, _c, stamp) in m.index.items() if live.get(k) != stamp]
            self.remove(modality, stale)
            if stale:
                self.full = False  # room may have come back; set again when an item does not fit
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._modalities.clear()
            self.dim = 0
            self.full = False

    def has(self, modality: str, item_id: str, stamp: int) -> bool:
        with self._lock:
            m = self._modalities.get(modality)
            entry = m.index.get(item_id) if m else None
            return entry is not None and entry[2] == stamp

    # ------------------------------------------------------------------ reads

    def gather(self, modality: str, ids: list[str], stamps: list[int], counts: list[int], dim: int) -> Gathered:
        """The candidates' concepts as one padded block; entries missing or with another stamp are listed in `missing`
        (their block rows are left for the caller to fill)."""
        counts_arr = np.asarray(counts, dtype=np.int64)
        width = max(1, int(counts_arr.max(initial=1)))
        block = np.zeros((len(ids), width, dim), dtype=FP16)
        missing: list[int] = []
        with self._lock:
            m = self._modalities.get(modality)
            hit_pos, starts = [], []
            for i, (item_id, stamp) in enumerate(zip(ids, stamps, strict=True)):
                entry = m.index.get(item_id) if m is not None else None
                if entry is None or entry[2] != stamp or entry[1] != counts_arr[i]:
                    missing.append(i)
                else:
                    hit_pos.append(i)
                    starts.append(entry[0])
            if hit_pos:
                assert m is not None and m.rows is not None  # hits come from an allocated modality
                pos = np.asarray(hit_pos)
                start = np.asarray(starts, dtype=np.int64)[:, None]
                offsets = np.arange(width, dtype=np.int64)[None, :]
                # padding positions repeat the entry's first row (masked out by the scoring)
                idx = np.where(offsets < counts_arr[pos][:, None], start + offsets, start)
                block[pos] = m.rows[idx]
            self.hits += len(hit_pos)
            self.misses += len(missing)
        return Gathered(block, counts_arr, missing)


# --------------------------------------------------------------------------- filling from Milvus


def load(cache: RerankCache, store, modalities, log, stop: threading.Event, progress_every: int = 10000, on_progress=None) -> dict:
    """Startup: every stored row's concepts through the query iterator, put unless this service already wrote a
    newer version meanwhile (if_absent). Stops early at the memory limit (the rest are misses) or on `stop`."""
    counts: dict[str, int] = {}
    for modality in modalities:
        loaded = skipped = 0
        for batch in store.scan(modality, concepts=True):
            if stop.is_set():
                return counts
            for item_id, stamp, concepts in batch:
                if cache.put(modality, item_id, stamp, concepts, if_absent=True):
                    loaded += 1
                else:
                    skipped += 1
            if (loaded + skipped) // progress_every != (loaded + skipped - len(batch)) // progress_every:
                log.info(
                    "rerank cache loading",
                    extra={"modality": modality, "rows": loaded + skipped, "cached": loaded, "mib": round(cache.bytes() / 2**20, 1)},
                )
                if on_progress is not None:
                    on_progress()
            if cache.full:  # the limit is reached: the rest stay in Milvus only (misses)
                break
        counts[modality] = loaded
        if cache.full:
            break
    return counts


def refresh(cache: RerankCache, store, modalities, stop: threading.Event, fetch_batch: int = 256) -> dict:
    """Reconcile with Milvus: scan ids + stamps, drop entries deleted or rewritten elsewhere, load rows not cached."""
    out: dict[str, dict] = {}
    for modality in modalities:
        live: dict[str, int] = {}
        for batch in store.scan(modality, concepts=False):
            if stop.is_set():
                return out
            live.update((item_id, stamp) for item_id, stamp, _ in batch)
        dropped = cache.retain(modality, live)
        todo = [i for i, s in live.items() if not cache.has(modality, i, s)]
        added = 0
        for start in range(0, len(todo), fetch_batch):
            if stop.is_set() or cache.full:
                break
            for item_id, stored in store.concepts(modality, todo[start : start + fetch_batch]).items():
                added += cache.put(modality, item_id, stored.stamp, stored.concepts, if_absent=True)
        out[modality] = {"rows": len(live), "dropped": dropped, "added": added}
    return out
