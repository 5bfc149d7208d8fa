"""Search service: re-rank agreement with exhaustive TERAN scoring, recall curves, and query latency.

    .venv/bin/python bench/bench_search.py --model-dir artifacts/teran-flickr8k \
        [--parts agreement,latency[,scale]] [--ranking model|mrsw|blend:W] [--sizes 100000] [--lite-sizes 100000] \
        [--backends lite,server] [--merge] [--output reports/bench-search.json]

One command runs everything (default parts: agreement, latency); `--parts` runs a subset (agreement,
strategies, latency, scale) and `--merge` updates the report in place, keeping what was not re-run.

The re-rank score (`--ranking`, passed to the service as its --ranking): `model` (default) is the exported
model's, from its manifest: global cosine + w x MrSw with w = `blend_weight` (MrSw when the manifest has no
weight), less the hub penalty when the manifest has one (teran.hubness: then the agreement part starts an
encoder on the model directory, from which the service takes the ranking and each item's hub statistic is
computed when indexing, as in production); `mrsw`; `blend:W`. The report's `ranking` says which
("blend w=0.08, hub 0.5", "blend w=0.08" or "MrSw", as the service's SearchResponse.ranking, checked on every
query). Latency runs have no encoder and rank by the blend (the penalty is one subtraction per candidate).

1. Encodes Flickr8k dev (1,000 images, 5,000 captions) with the real exported model through the
   encoder service (cached in .cache/bench-search/), stores the images and their captions in a fresh
   search service (milvus-lite, FLAT first stage, vectors sent precomputed, no encoder), and runs queries
   through gRPC at several R_m (top_k 10): `agreement` text to image (the first --queries dev captions
   against the images), `agreement_i2t` image to text (every gallery image against all its captions).
   `agreement_at_10[R_m]`: the fraction of queries whose re-ranked top-10 ids equal, as a set, the top-10
   of the exhaustive ranking by the same score over the whole gallery (numpy, on the stored fp16 concepts,
   fp16 query concepts as sent, fp32 global vectors); `agreement_at_10_ordered` the same for the ordered
   list. Recall@1/5/10 (text to image: the image of the caption; image to text: one of the image's own
   captions) for the exhaustive ranking, first stage only (global cosine), and first stage + re-rank at
   each R_m (the seed paper's Fig. 3c, dense first stage).
2. Latency: synthetic collections of N items built from the real image embeddings (item j = dev image
   j mod 1000 with Gaussian noise sigma 0.05 on every vector, renormalised), indexed through StreamIndex;
   p50/p99 of Search (caption vectors, top_k 10, R_m 10, through gRPC) per backend and N, plus the index
   rate and memory (RSS of the Milvus server process, or of this process for the embedded milvus-lite).
   Each N is measured with the re-rank cache (after a restart that rebuilds it from Milvus: cache_load_s)
   and without it (--rerank-cache-mb 0) on the same collections.
3. Scale (--parts scale): N (default 1M) items with --scale-concepts concept vectors each, written
   in-process through the service's store + cache (full-size items at 1M do not fit a 24 GB machine).
Strategies: Fig. 3c in numpy (text to image, re-ranked by the same score) for the dense, SQ, DP and
Bag-of-Concepts (--boc SIZE:TOP,...) first stages.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.runner import freeze_startup_heap  # noqa: E402
from teran.alignment_numpy import blend_scores  # noqa: E402
from teran_api.types import IndexItem, Modality, ModelRef, SearchQuery, Vectors  # noqa: E402

CACHE = ROOT / ".cache" / "bench-search"


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


# --------------------------------------------------------------------------- embeddings


def encode_split(model_dir: Path, limit: int, split: str = "dev") -> dict:
    """A split's images and captions through the real encoder service (cached), and the manifest's served ranking:
    `blend_weight` (None: MrSw) and `hub` (its hub penalty reference, teran.hubness; None: no penalty)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    import hashlib

    from teran.hubness import HubReference
    from teran.manifest import load_manifest

    manifest = load_manifest(model_dir, verify=False)
    served = {
        "blend_weight": manifest.blend_weight,
        "hub": None if manifest.hub_penalty is None else HubReference.load(model_dir, manifest.hub_penalty),
        "model_dir": model_dir,
    }
    digest = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()[:12]
    cache = CACHE / f"{split}-{model_dir.name}-{digest}-{limit}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {**{k: data[k] for k in data.files}, **served}
    from encoder_service.config import EncoderConfig
    from encoder_service.server import ServerThread
    from teran.data.flickr8k import load_split
    from teran_api.encoder_client import EncoderClient

    photos = load_split(split, limit=limit)
    config = EncoderConfig(model_dir=model_dir, host="127.0.0.1", port=0, metrics_port=-1, verify_model=False, max_items=64).validate()
    images_g, images_c, boxes, caps_g, caps_c, caps_n, owners = [], [], [], [], [], [], []
    with ServerThread(config) as server, EncoderClient(server.target, timeout=600) as client:
        model = client.model_info().model
        paths = [photos.image_path(i) for i in range(len(photos.names))]
        started = time.perf_counter()
        for start in range(0, len(paths), 16):
            for r in client.encode_images([p.read_bytes() for p in paths[start : start + 16]]):
                images_g.append(r.global_vector)
                images_c.append(r.concepts)
                boxes.append(r.boxes)
            if start % 160 == 0:
                log(f"encoded {start + 16}/{len(paths)} images")
        log(f"images encoded in {time.perf_counter() - started:.1f}s")
        texts, owner = photos.flat_captions()
        for start in range(0, len(texts), 64):
            for r in client.encode_captions(texts[start : start + 64]):
                caps_g.append(r.global_vector)
                caps_n.append(r.concepts.shape[0])
                caps_c.append(r.concepts)
        owners = owner
    width = max(caps_n)
    padded = np.zeros((len(caps_c), width, model.dimension), np.float32)
    for i, c in enumerate(caps_c):
        padded[i, : len(c)] = c
    data = {
        "image_global": np.stack(images_g),
        "image_concepts": np.stack(images_c),
        "image_boxes": np.stack(boxes),
        "caption_global": np.stack(caps_g),
        "caption_concepts": padded,
        "caption_lengths": np.array(caps_n),
        "caption_owner": np.array(owners),
        "model": np.array([model.name, str(model.version), str(model.dimension)]),
    }
    np.savez(cache, **data)
    return {**data, **served}


def resolve_ranking(option: str, manifest_weight: float | None, hub=None):
    """--ranking (model | mrsw | blend:W) -> (search_service.ranking.Ranking, the service's --ranking setting).
    With the manifest's hub penalty (`hub`, a teran.hubness.HubReference) the setting is "model": the service
    then takes the weight and the hub reference from an encoder serving the model."""
    from search_service.config import parse_ranking
    from search_service.ranking import Ranking

    parsed = parse_ranking(option)
    if parsed == "invalid":
        raise ValueError(f"--ranking {option!r}: give model, mrsw or blend:W with a number W >= 0")
    if parsed == "model" and hub is not None:
        return Ranking(manifest_weight, hub), "model"
    weight = manifest_weight if parsed == "model" else parsed
    if weight is None:
        return Ranking(), "mrsw"
    return Ranking(float(weight)), f"blend:{float(weight)!r}"


# --------------------------------------------------------------------------- service


def vectors(modality: Modality, g: np.ndarray, c: np.ndarray, model, boxes=None) -> Vectors:
    """Concepts travel as fp16 (as stored); the exhaustive reference rounds them the same way."""
    ref = ModelRef(model[0], int(model[1]), int(model[2]))
    return Vectors(modality, np.asarray(g, np.float32), np.asarray(c).astype(np.float16), boxes=boxes, model=ref)


def start_encoder(model_dir: Path):
    """An encoder service (ServerThread) on `model_dir`, for a search service that takes its ranking from it."""
    from encoder_service.config import EncoderConfig
    from encoder_service.server import ServerThread

    return ServerThread(EncoderConfig(model_dir=model_dir, host="127.0.0.1", port=0, metrics_port=-1, verify_model=False).validate())


class Service:
    """A search service (ServerThread) and its typed client, with the bench's items and queries."""

    def __init__(self, uri: str, **overrides):
        from search_service.config import SearchConfig
        from search_service.server import ServerThread
        from teran_api.search_client import SearchClient

        values = dict(milvus_uri=uri, host="127.0.0.1", port=0, metrics_port=-1, collection_prefix=f"bench_{os.getpid()}", max_top_k=100)
        values.update(overrides)
        self.thread = ServerThread(SearchConfig(**values).validate())
        self.client = SearchClient(self.thread.target, timeout=7200, max_message_bytes=256 << 20)
        freeze_startup_heap()  # as `python -m search_service` does once serving (this process hosts the service)

    def index(self, data: dict, n_items: int, noise: float = 0.0, batch: int = 128) -> float:
        rng = np.random.default_rng(0)
        model = [str(x) for x in data["model"]]
        n_images = len(data["image_global"])

        def batches():
            for start in range(0, n_items, batch):
                items = []
                for j in range(start, min(n_items, start + batch)):
                    src = j % n_images
                    g, c = data["image_global"][src], data["image_concepts"][src]
                    if noise:
                        g = g + rng.normal(0, noise, g.shape).astype(np.float32)
                        c = c + rng.normal(0, noise, c.shape).astype(np.float32)
                        g /= np.linalg.norm(g)
                        c /= np.linalg.norm(c, axis=1, keepdims=True)
                    content = vectors(Modality.IMAGE, g, c, model, data["image_boxes"][src])
                    items.append(IndexItem(f"i{j}", content, json.dumps({"src": int(src)})))
                yield items
                if start and start % (batch * 100) == 0:
                    log(f"  indexed {start}/{n_items}")

        started = time.perf_counter()
        result = self.client.stream_index(batches())
        assert result.indexed == n_items, result
        return time.perf_counter() - started

    def index_captions(self, data: dict, batch: int = 256) -> float:
        """Every caption of `data` (ids "c{index}", metadata: the owner image) as precomputed vectors."""
        model = [str(x) for x in data["model"]]
        lengths, n_captions = data["caption_lengths"], len(data["caption_global"])

        def batches():
            for start in range(0, n_captions, batch):
                items = []
                for j in range(start, min(n_captions, start + batch)):
                    concepts = data["caption_concepts"][j, : int(lengths[j])]
                    content = vectors(Modality.CAPTION, data["caption_global"][j], concepts, model)
                    items.append(IndexItem(f"c{j}", content, json.dumps({"owner": int(data["caption_owner"][j])})))
                yield items

        started = time.perf_counter()
        result = self.client.stream_index(batches())
        assert result.indexed == n_captions, result
        return time.perf_counter() - started

    def _search(self, content: Vectors, top_k: int, multiplier: int, rerank: bool, explain: bool):
        options = dict(top_k=top_k, rerank_multiplier=multiplier, disable_rerank=not rerank, skip_explanation=not explain)
        return self.client.search(SearchQuery(content, **options))

    def search(self, data: dict, q: int, top_k: int, multiplier: int, rerank: bool = True, explain: bool = False):
        """Caption `q`'s vectors against the images."""
        n = int(data["caption_lengths"][q])
        model = [str(x) for x in data["model"]]
        content = vectors(Modality.CAPTION, data["caption_global"][q], data["caption_concepts"][q, :n], model)
        return self._search(content, top_k, multiplier, rerank, explain)

    def search_image(self, data: dict, i: int, top_k: int, multiplier: int, rerank: bool = True, explain: bool = False):
        """Image `i`'s vectors (regions as concepts, with boxes) against the captions."""
        model = [str(x) for x in data["model"]]
        content = vectors(Modality.IMAGE, data["image_global"][i], data["image_concepts"][i], model, data["image_boxes"][i])
        return self._search(content, top_k, multiplier, rerank, explain)

    def close(self) -> None:
        self.client.close()
        self.thread.stop()
        gc.unfreeze()


# --------------------------------------------------------------------------- parts


def recall(ranked_ids: list[list[int]], owners: np.ndarray) -> dict:
    """Recall@1/5/10 (%): query q is a hit at K when owners[q] is among its first K ids."""
    out = {}
    for k in (1, 5, 10):
        out[f"r{k}"] = round(100.0 * float(np.mean([owners[q] in ids[:k] for q, ids in enumerate(ranked_ids)])), 2)
    return out


def reference_scores(data: dict, ranking, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The served re-rank score of every (image, caption) pair, exhaustively: (scores, global cosines), both
    float32 [n_images, n_captions].

    MrSw(image, caption) = sum over the caption's word pieces of the max over the image's regions of the cosine:
    the same number whichever side queries (search_service.ranking.mrsw_block), so one matrix serves both
    directions. Concepts rounded to fp16 on both sides (stored as fp16; the bench sends its query concepts as
    fp16), global vectors fp32. `ranking` (search_service.ranking.Ranking): MrSw without a blend weight, else
    blend_scores(global cosine, MrSw, weight); less the hub penalty of the ranked side when it has one (the
    matrix carries both sides' penalties: each is constant for the queries of the other direction)."""
    regions = data["image_concepts"].astype(np.float16).astype(np.float32)  # [Ni, R, D]
    lengths = np.asarray(data["caption_lengths"], np.int64)
    words = np.concatenate(
        [data["caption_concepts"][c, :n].astype(np.float16).astype(np.float32) for c, n in enumerate(lengths.tolist())]
    )  # [total word pieces, D]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n_images, n_regions, dim = regions.shape
    mrsw = np.zeros((n_images, len(lengths)), np.float32)
    for i in range(0, n_images, chunk):
        part = regions[i : i + chunk]
        best = (part.reshape(-1, dim) @ words.T).reshape(len(part), n_regions, -1).max(axis=1)  # [chunk, word pieces]
        mrsw[i : i + chunk] = np.add.reduceat(best, starts, axis=1)
    cosines = data["image_global"].astype(np.float32) @ data["caption_global"].astype(np.float32).T
    scores = mrsw if ranking.blend_weight is None else blend_scores(cosines, mrsw, ranking.blend_weight)
    if ranking.hub is not None:
        scores = ranking.hub.penalise(scores, data["image_global"], data["caption_global"])
    return scores, cosines


def top10(scores: np.ndarray) -> list[list[int]]:
    """Per row, the ids of the 10 best columns (ties: lower id first, as a stable sort)."""
    return [np.argsort(-row, kind="stable")[:10].tolist() for row in scores]


def check_ranking(response, expected: str) -> None:
    if response.ranking != expected:
        raise RuntimeError(f"the service ranked by {response.ranking!r}, the exhaustive reference by {expected!r}")


def run_queries(search, n_queries: int, exhaustive: list[list[int]], multipliers: list[int], label: str, to_target, targets) -> dict:
    """Each query through the service at each R_m: agreement with `exhaustive` and recall (ids mapped by
    `to_target` to the space of `targets`)."""
    out = {}
    for m in multipliers:
        ranked, same_set, same_order = [], 0, 0
        started = time.perf_counter()
        for q in range(n_queries):
            response = search(q, m)
            check_ranking(response, label)
            ids = [int(h.id[1:]) for h in response.hits]
            ranked.append([to_target(i) for i in ids])
            same_set += set(ids) == set(exhaustive[q])
            same_order += ids == exhaustive[q]
        elapsed = time.perf_counter() - started
        out[str(m)] = {
            "agreement_at_10": round(same_set / n_queries, 4),
            "agreement_at_10_ordered": round(same_order / n_queries, 4),
            "recall_reranked": recall(ranked, targets),
            "mean_query_ms": round(1000 * elapsed / n_queries, 2),
        }
        log(f"R_m={m}: {out[str(m)]}")
    return out


def agreement(
    data: dict,
    multipliers: list[int],
    queries: int,
    workdir: Path,
    boc: list[tuple[int, int]],
    ranking: tuple | None = None,
    image_queries: int | None = None,
) -> tuple[dict, dict]:
    """(text to image, image to text) agreement of the service's re-rank with the exhaustive ranking by the same
    score; `ranking`: resolve_ranking's (Ranking, service setting; default MrSw). The setting "model" (a hub
    penalty) starts an encoder serving data["model_dir"]: the service takes the ranking from it and computes
    each item's hub statistic when indexing, as in production."""
    from search_service.ranking import Ranking

    served, setting = ranking or (Ranking(), "mrsw")
    label = served.label
    n_images, n_captions = len(data["image_global"]), len(data["caption_global"])
    image_queries = n_images if image_queries is None else min(image_queries, n_images)
    encoder = start_encoder(data["model_dir"]) if setting == "model" else None
    service = Service(
        str(workdir / "agreement.db"),
        index_type="FLAT",
        max_candidates=2000,
        ranking=setting,
        **({"encoder_address": encoder.target} if encoder else {}),
    )
    try:
        index_s = service.index(data, n_images)
        log(f"indexed {n_images} dev images in {index_s:.1f}s")
        index_s = service.index_captions(data)
        log(f"indexed {n_captions} dev captions in {index_s:.1f}s")
        started = time.perf_counter()
        scores, cosines = reference_scores(data, served)
        log(f"exhaustive {label} of {n_images} images x {n_captions} captions in {time.perf_counter() - started:.1f}s")
        common = {"ranking": label, "blend_weight": served.blend_weight, "hub_penalty": served.hub.describe() if served.hub else None}

        owners = data["caption_owner"][:queries]
        full = np.ascontiguousarray(scores[:, :queries].T)  # [queries, images]
        exhaustive = top10(full)
        t2i = {
            "queries": queries,
            "gallery_images": n_images,
            **common,
            "recall_exhaustive": recall(exhaustive, owners),
            "recall_first_stage_only": recall(top10(cosines[:, :queries].T), owners),
        }
        log(f"text to image ({label}): {queries} caption queries, {n_images} images")
        t2i["per_multiplier"] = run_queries(
            lambda q, m: service.search(data, q, 10, m), queries, exhaustive, multipliers, label, lambda i: i, owners
        )

        caption_owner = data["caption_owner"]
        own = np.arange(image_queries)
        exhaustive_i2t = top10(scores[:image_queries])
        i2t = {
            "queries": image_queries,
            "gallery_captions": n_captions,
            "hit": "one of the query image's own captions",
            **common,
            "recall_exhaustive": recall([[int(caption_owner[c]) for c in ids] for ids in exhaustive_i2t], own),
            "recall_first_stage_only": recall([[int(caption_owner[c]) for c in ids] for ids in top10(cosines[:image_queries])], own),
        }
        log(f"image to text ({label}): {image_queries} image queries, {n_captions} captions")
        i2t["per_multiplier"] = run_queries(
            lambda q, m: service.search_image(data, q, 10, m),
            image_queries,
            exhaustive_i2t,
            multipliers,
            label,
            lambda c: int(caption_owner[c]),
            own,
        )
    finally:
        service.close()
        if encoder is not None:
            encoder.stop()
    # numpy only, after the queries (an idle service's Milvus channel gets GOAWAY too_many_pings during it)
    t2i["strategies"] = strategies(data, full, exhaustive, owners, multipliers, boc)
    return t2i, i2t


def concept_vectors(data: dict) -> np.ndarray:
    """Every concept vector of a split: the images' regions and the captions' word pieces (no padding)."""
    words = [data["caption_concepts"][c, :n] for c, n in enumerate(np.asarray(data["caption_lengths"]).tolist())]
    return np.concatenate([data["image_concepts"].reshape(-1, data["image_concepts"].shape[-1]), *words]).astype(np.float32)


def word_vectors(data: dict) -> np.ndarray:
    """Every caption word piece of a split (no padding)."""
    return concept_vectors(data)[data["image_concepts"].shape[0] * data["image_concepts"].shape[1] :]


def decoded(codec, concepts: np.ndarray, images: bool = False) -> np.ndarray:
    """[..., D] concepts through `codec` and back (padding rows stay zero); `images`: [N, R, D] images' regions as a
    collection stores them (ConceptCodec.encode_images: the salient ones kept)."""
    if images:
        block = codec.decode_images(codec.encode_images(list(np.asarray(concepts, np.float32))), [concepts.shape[1]] * len(concepts))
        return codec.image_vectors(block)
    flat = concepts.reshape(-1, concepts.shape[-1]).astype(np.float32)
    out = codec.decode(codec.encode(flat)) * (np.abs(flat).sum(axis=1, keepdims=True) > 0)
    return out.reshape(concepts.shape)


def best_regions_kept(data: dict, decoded_regions: np.ndarray, exhaustive_t2i: list[list[int]]) -> float:
    """Over each caption query's exhaustive top-10 photos, the share of its word pieces whose best region (the
    explanation's, word piece by word piece) is the same on `decoded_regions` as on the stored fp16 regions."""
    regions = data["image_concepts"].astype(np.float16).astype(np.float32)
    kept = total = 0
    for q, hits in enumerate(exhaustive_t2i):
        words = data["caption_concepts"][q, : int(data["caption_lengths"][q])].astype(np.float16).astype(np.float32)
        best = (regions[hits] @ words.T).argmax(axis=1)  # [10, words]
        kept += int((best == (decoded_regions[hits] @ words.T).argmax(axis=1)).sum())
        total += best.size
    return round(kept / max(total, 1), 4)


def grounding_kept(codec, model_dir: Path) -> dict:
    """The pointing game (teran.grounding: Flickr30k Entities dev phrases, hit when the best region's centre lies in
    a phrase box) of the explanations coded collections give, against those of fp16 ones: each phrase's best region
    on its photo's decoded regions, the caption (the query) at full precision. Explanations go word piece by word
    piece; the pointing game scores the same argmax for phrases of one or more pieces, against ground-truth boxes:
    where a code moves a word to another region, whether it still points at the named thing."""
    from teran import grounding
    from teran.exported import ExportedModel

    captions = grounding.load_phrase_captions("dev")
    photos, index = grounding._dev_photos("dev", None, captions)
    exported = ExportedModel(model_dir, "fp32")
    regions, words, boxes = grounding.exported_concepts(exported, photos, [c.caption for c in captions])
    phrases = grounding.build_phrase_set(captions, index, boxes, exported.tokenizer)
    words = words.astype(np.float16).astype(np.float32)  # as sent
    stored_scores = grounding.phrase_region_scores(regions.astype(np.float16), words, phrases)
    coded_scores = grounding.phrase_region_scores(decoded(codec, regions, images=True), words, phrases)
    stored, coded = grounding.pointing_game(stored_scores, phrases), grounding.pointing_game(coded_scores, phrases)
    return {
        "phrases": stored["phrases"],
        "pointing_fp16": round(stored["pointing"], 4),
        "pointing_codes": round(coded["pointing"], 4),
        "same_best_region": round(float((stored_scores.argmax(1) == coded_scores.argmax(1)).mean()), 4),
        "same_outcome": round(float((stored["hits"] == coded["hits"]).mean()), 4),
        "note": "pointing game of the phrases' best regions on fp16 regions and on the codec's decoded regions (captions "
        "as sent, fp16); same_best_region: phrases whose best region is unchanged; same_outcome: phrases hit (or missed) "
        "on both",
    }


def codec_sweep(
    data: dict,
    train: dict,
    sizes: list[int],
    salient: list[int],
    image_bytes: int,
    word_bytes: int,
    served,
    exhaustive_t2i,
    exhaustive_i2t,
    scores,
) -> dict:
    """Agreement and explanations kept against bytes per vector, in numpy (the service's scoring on decoded concepts,
    every pair: the first stage keeps every exhaustive top 10 at R_m 10), and how close the exhaustive ranking's 10th and 11th scores are:
    the score precision a set-equality agreement asks of any codec."""
    from search_service.concept_codes import train_codec

    def same(ranked, exhaustive) -> float:
        return round(float(np.mean([set(a) == set(b) for a, b in zip(ranked, exhaustive, strict=True)])), 4)

    queries, image_queries = len(exhaustive_t2i), len(exhaustive_i2t)
    train_vectors = concept_vectors(train)
    rows, salient_rows = [], []
    for count in salient:
        codec = train_codec(
            train_vectors,
            word_bytes,
            words=word_vectors(train),
            salient=count,
            image_bytes=image_bytes,
            regions=train["image_concepts"].shape[1],
        )
        regions = decoded(codec, data["image_concepts"], images=True)
        t2i, _ = reference_scores({**data, "image_concepts": regions}, served)
        salient_rows.append(
            {
                "salient_regions": count,
                "region_bytes": codec.region_codec.bytes_per_vector,
                "concept_bytes_per_image": codec.image_bytes(int(data["image_concepts"].shape[1])),
                "agreement_at_10": same(top10(np.ascontiguousarray(t2i[:, :queries].T)), exhaustive_t2i),
                "explanations_unchanged": best_regions_kept(data, regions, exhaustive_t2i),
            }
        )
        log(f"codec sweep: {salient_rows[-1]}")
    for size in sizes:
        codec = train_codec(train_vectors, size)
        regions = decoded(codec, data["image_concepts"])
        t2i, _ = reference_scores({**data, "image_concepts": regions}, served)
        i2t, _ = reference_scores({**data, "caption_concepts": decoded(codec, data["caption_concepts"])}, served)
        rows.append(
            {
                "bytes_per_vector": codec.bytes_per_vector,
                "concept_bytes_per_image": codec.bytes_per_vector * int(data["image_concepts"].shape[1]),
                "agreement_at_10": same(top10(np.ascontiguousarray(t2i[:, :queries].T)), exhaustive_t2i),
                "agreement_at_10_i2t": same(top10(i2t[:image_queries]), exhaustive_i2t),
                "explanations_unchanged": best_regions_kept(data, regions, exhaustive_t2i),
            }
        )
        log(f"codec sweep: {rows[-1]}")
    ordered = -np.sort(-np.ascontiguousarray(scores[:, :queries].T), axis=1)
    gaps = ordered[:, 9] - ordered[:, 10]
    return {
        "by_bytes": rows,
        "by_salient": salient_rows,
        "rank_10_11_gap_t2i": {f"q{int(100 * q)}": float(f"{np.quantile(gaps, q):.3g}") for q in (0.01, 0.05, 0.1, 0.5)},
        "note": "numpy, every pair scored on decoded concepts (no ANN, no service); the gap quantiles are the exhaustive "
        "ranking's score differences between a query's 10th and 11th image: a codec keeps the top-10 set of a query only "
        "where its score errors stay below that query's gap",
    }


def codec_part(data: dict, args, workdir: Path, ranking: tuple) -> dict:
    """Train the concept codec on the train split's concepts, serve the dev split from collections that store its
    codes (no re-rank cache), and compare with the exhaustive full-precision ranking: the top-10 sets at R_m
    (`agreement_at_10`, both directions), Recall@K, and the best region of each explained word (t2i hits)."""
    from search_service.concept_codes import train_codec
    from search_service.ranking import explain

    started = time.perf_counter()
    train = encode_split(args.model_dir, args.codec_train_images, "train")
    codec = train_codec(
        concept_vectors(train),
        args.codec_bytes,
        words=word_vectors(train),
        salient=args.codec_salient,
        image_bytes=args.codec_image_bytes,
        regions=train["image_concepts"].shape[1],
    )
    args.concept_codec.parent.mkdir(parents=True, exist_ok=True)
    codec.save(args.concept_codec)
    log(f"codec: {codec.describe()} trained in {time.perf_counter() - started:.1f}s -> {args.concept_codec}")
    served, setting = ranking
    multiplier = args.rerank_multiplier
    n_images, n_captions = len(data["image_global"]), len(data["caption_global"])
    queries = min(args.queries, n_captions)
    image_queries = n_images if args.image_queries is None else min(args.image_queries, n_images)
    scores, _ = reference_scores(data, served)
    exhaustive_t2i = top10(np.ascontiguousarray(scores[:, :queries].T))
    exhaustive_i2t = top10(scores[:image_queries])
    regions16 = data["image_concepts"].astype(np.float16).astype(np.float32)
    encoder = start_encoder(data["model_dir"]) if setting == "model" else None
    service = Service(
        str(workdir / "codec.db"),
        index_type="FLAT",
        max_candidates=2000,
        ranking=setting,
        rerank_cache_mb=0,
        concept_codec=args.concept_codec,
        collection_prefix=f"codec_{os.getpid()}",
        **({"encoder_address": encoder.target} if encoder else {}),
    )
    try:
        service.index(data, n_images)
        service.index_captions(data)
        stats = service.client.stats()
        t2i_ids, same_words, words = [], 0, 0
        for q in range(queries):
            result = service.search(data, q, 10, multiplier, explain=True)
            check_ranking(result, served.label)
            t2i_ids.append([int(h.id[1:]) for h in result.hits])
            n = int(data["caption_lengths"][q])
            query_words = data["caption_concepts"][q, :n].astype(np.float16).astype(np.float32)
            for hit in result.hits:  # the full-precision explanation of the same pair
                reference = explain(regions16[int(hit.id[1:])], None, query_words, [])
                same_words += sum(a.region_index == r.region_index for a, r in zip(hit.alignment, reference, strict=True))
                words += len(reference)
        i2t_ids = []
        for i in range(image_queries):
            result = service.search_image(data, i, 10, multiplier)
            i2t_ids.append([int(h.id[1:]) for h in result.hits])
    finally:
        service.close()
        if encoder is not None:
            encoder.stop()
    caption_owner = data["caption_owner"]

    def agreement(ranked: list[list[int]], exhaustive: list[list[int]]) -> float:
        return round(float(np.mean([set(a) == set(b) for a, b in zip(ranked, exhaustive, strict=True)])), 4)

    return {
        "codec": codec.describe(),
        "sha256": codec.digest(),
        "path": str(args.concept_codec.relative_to(ROOT)) if args.concept_codec.is_relative_to(ROOT) else str(args.concept_codec),
        "trained_on": f"train split: {len(train['image_global'])} photos' regions, {len(train['caption_global'])} captions' word pieces",
        "bytes_per_vector": codec.bytes_per_vector,
        "salient_regions": codec.salient,
        "concept_bytes_per_image": codec.image_bytes(int(data["image_concepts"].shape[1])),
        "fp16_concept_bytes_per_image": 2 * int(data["image_concepts"].shape[1]) * int(data["image_concepts"].shape[2]),
        "concept_encoding": stats.concept_encoding,
        "rerank_multiplier": multiplier,
        "ranking": served.label,
        "queries": queries,
        "image_queries": image_queries,
        "agreement_at_10": agreement(t2i_ids, exhaustive_t2i),
        "agreement_at_10_i2t": agreement(i2t_ids, exhaustive_i2t),
        "recall_t2i": recall(t2i_ids, data["caption_owner"][:queries]),
        "recall_t2i_exhaustive_full_precision": recall(exhaustive_t2i, data["caption_owner"][:queries]),
        "recall_i2t": recall([[int(caption_owner[c]) for c in ids] for ids in i2t_ids], np.arange(image_queries)),
        "recall_i2t_exhaustive_full_precision": recall(
            [[int(caption_owner[c]) for c in ids] for ids in exhaustive_i2t], np.arange(image_queries)
        ),
        "explanations_unchanged": round(same_words / max(words, 1), 4),
        "explained_words": words,
        "grounding": grounding_kept(codec, args.model_dir),
    } | (
        {
            "sweep": codec_sweep(
                data,
                train,
                args.codec_sweep,
                args.codec_salient_sweep,
                args.codec_image_bytes,
                served,
                exhaustive_t2i,
                exhaustive_i2t,
                scores,
            )
        }
        if args.codec_sweep or args.codec_salient_sweep
        else {}
    )


def summary(direction: str, result: dict, multiplier: int) -> str:
    """One line: first-stage vs re-ranked Recall@1/5/10 at R_m `multiplier`, exhaustive, and the agreement."""

    def r(x: dict) -> str:
        return "/".join(f"{x[k]:.1f}" for k in ("r1", "r5", "r10"))

    at = result["per_multiplier"].get(str(multiplier))
    line = f"{direction} [{result['ranking']}, {result['queries']} queries]: R@1/5/10 first stage {r(result['recall_first_stage_only'])}"
    if at is None:
        return line + f", exhaustive {r(result['recall_exhaustive'])} (no run at R_m={multiplier})"
    return (
        line + f" -> re-ranked (R_m={multiplier}) {r(at['recall_reranked'])} (exhaustive {r(result['recall_exhaustive'])}); "
        f"agreement@10 {at['agreement_at_10']:.3f} (ordered {at['agreement_at_10_ordered']:.3f})"
    )


def strategies(
    data: dict, full: np.ndarray, exhaustive: list[list[int]], owners: np.ndarray, multipliers: list[int], boc: list[tuple[int, int]] = ()
) -> dict:
    """Fig. 3c in numpy: each first stage (dense cosine, SQ, DP surrogates, Bag of Concepts: exact sparse inner
    products, i.e. what Milvus' inverted index returns) + re-rank of its top R_m x 10 by the reference score `full`
    ([queries, images]: the served score, reference_scores), agreement with its exhaustive top 10s, on the same queries.
    BoC (size, top): a spherical k-means codebook of `size` fitted on the gallery's region vectors; each concept
    soft-assigned to its `top` nearest codewords; max-pooled over an image's regions, summed over a caption's words."""
    from search_service.sparse import bag_of_concepts, deep_permutation, kmeans_codebook, scalar_quantization

    queries = len(exhaustive)
    ig, cg = data["image_global"], data["caption_global"][:queries]

    def dense_matrix(fn, vectors):
        out = np.zeros((len(vectors), 2 * vectors.shape[1]), np.float32)
        for row, v in enumerate(vectors):
            for i, w in fn(v).items():
                out[row, i] = w
        return out

    settings = {"dense": (cg @ ig.T, {})}
    for scale in (10, 30, 100):
        fn = lambda v, s=scale: scalar_quantization(v, s)  # noqa: E731
        first = dense_matrix(fn, cg) @ dense_matrix(fn, ig).T
        settings[f"sq_scale{scale}"] = (first, {"mean_nonzero_image": float((dense_matrix(fn, ig) > 0).sum(1).mean())})
    for keep in (16, 64, 128):
        fn = lambda v, k=keep: deep_permutation(v, k)  # noqa: E731
        first = dense_matrix(fn, cg) @ dense_matrix(fn, ig).T
        settings[f"dp_keep{keep}"] = (first, {"mean_nonzero_image": float((dense_matrix(fn, ig) > 0).sum(1).mean())})
    if boc:
        lengths = data["caption_lengths"]
        regions = data["image_concepts"].reshape(-1, data["image_concepts"].shape[-1])
        for size, top in boc:
            started = time.perf_counter()
            codebook = kmeans_codebook(regions, size, seed=0)
            images = np.zeros((len(ig), size), np.float32)
            for i, concepts in enumerate(data["image_concepts"]):
                for k, w in bag_of_concepts(concepts, codebook, top, "max").items():
                    images[i, k] = w
            caps = np.zeros((queries, size), np.float32)
            for q in range(queries):
                for k, w in bag_of_concepts(data["caption_concepts"][q, : lengths[q]], codebook, top, "sum").items():
                    caps[q, k] = w
            extra = {"mean_nonzero_image": float((images > 0).sum(1).mean()), "mean_nonzero_query": float((caps > 0).sum(1).mean())}
            settings[f"boc_k{size}_top{top}"] = (caps @ images.T, {**extra, "codebook_s": round(time.perf_counter() - started, 1)})
    out = {}
    # Ties (frequent with coarse sparse surrogates) are broken by a fixed random permutation, not by image index:
    # the queries' own images are the first ones, so index order would flatter a surrogate that ties.
    tie_break = np.random.default_rng(0).permutation(len(ig))
    for name, (first, extra) in settings.items():
        order = np.lexsort((np.broadcast_to(tie_break, first.shape), -first), axis=1)
        entry = {**extra, "recall_first_stage_only": recall([o[:10].tolist() for o in order], owners), "per_multiplier": {}}
        for m in multipliers:
            ranked, same = [], 0
            for q in range(queries):
                cands = order[q, : m * 10]
                top = cands[np.argsort(-full[q, cands], kind="stable")][:10].tolist()
                ranked.append(top)
                same += set(top) == set(exhaustive[q])
            entry["per_multiplier"][str(m)] = {"agreement_at_10": round(same / queries, 4), "recall_reranked": recall(ranked, owners)}
        out[name] = entry
        log(f"strategy {name}: first-stage {entry['recall_first_stage_only']}, R_m=10 {entry['per_multiplier'].get('10')}")
    return out


def percentiles(times: list[float]) -> dict:
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p99_ms": round(float(np.percentile(times, 99)), 2),
        "mean_ms": round(float(np.mean(times)), 2),
    }


class TimedSearches:
    """A Milvus client whose `search` calls are timed (`on_search(ms)`); every other attribute is the client's."""

    def __init__(self, client, on_search: Callable[[float], None]):
        self._client, self._on_search = client, on_search

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def search(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._client.search(*args, **kwargs)
        finally:
            self._on_search(1000 * (time.perf_counter() - started))


class QueryTrace:
    """Where each query's time went: the searcher's stage timings (the ones its Prometheus histogram gets) and the
    interpreter's garbage-collection pauses, per query, so that a latency tail can be laid at a stage's door. With
    `store`, also `milvus_search`: the pymilvus search call alone, inside first_stage (the rest of that stage is the
    hop to the service's database thread and turning the rows into candidates)."""

    def __init__(self, searcher, store=None):
        self.searcher, self.stages, self.gc_ms, self.full_collections, self._gc_started = searcher, {}, 0.0, 0, 0.0
        self._observe, self.store = searcher._observe, store

        def observe(stage: str, started: float) -> None:
            self.stages[stage] = self.stages.get(stage, 0.0) + 1000 * (time.perf_counter() - started)
            self._observe(stage, started)

        def on_search(ms: float) -> None:
            self.stages["milvus_search"] = self.stages.get("milvus_search", 0.0) + ms

        searcher._observe = observe
        if store is not None:
            self._client = store.client
            store.client = TimedSearches(store.client, on_search)
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_ms += 1000 * (time.perf_counter() - self._gc_started)
            self.full_collections += info["generation"] == 2

    def start(self) -> None:
        self.stages, self.gc_ms, self.full_collections = {}, 0.0, 0

    def record(self, total_ms: float, at_s: float) -> dict:
        known = sum(v for k, v in self.stages.items() if k != "milvus_search")  # milvus_search lies within first_stage
        stages = {**self.stages, "gc": self.gc_ms, "outside_stages": total_ms - known}
        return {"total_ms": total_ms, "at_s": at_s, "gc_full": self.full_collections, **{k: round(v, 2) for k, v in stages.items()}}

    def close(self) -> None:
        self.searcher._observe = self._observe
        if self.store is not None:
            self.store.client = self._client
        gc.callbacks.remove(self._on_gc)


def tail_profile(traces: list[dict]) -> dict:
    """Median stage times of all queries against those of the slowest 1%, and when the slow ones ran: a tail from
    one stage shows there; slow queries bunched in time point at something else on the machine."""
    totals = np.array([t["total_ms"] for t in traces])
    slow = [t for t in traces if t["total_ms"] >= np.percentile(totals, 99)]
    stages = sorted({k for t in traces for k in t} - {"total_ms", "at_s", "gc_full"})

    def medians(group: list[dict]) -> dict:
        return {k: round(float(np.median([t.get(k, 0.0) for t in group])), 2) for k in stages}

    return {
        "stage_median_ms_all": medians(traces),
        "stage_median_ms_slowest_1pct": medians(slow),
        "gc_full_collections": int(sum(t["gc_full"] for t in traces)),
        "gc_tracked_objects": len(gc.get_objects()),
        "slowest_1pct": sorted(({k: round(v, 2) for k, v in t.items()} for t in slow), key=lambda t: -t["total_ms"]),
        "note": "per query: the searcher's stage timings (encode, first_stage, concepts, rerank; milvus_search: the "
        "pymilvus search call alone, inside first_stage), garbage-collection "
        "pauses of the benchmark process (client and service share it; gc_full: full collections; a pause falls within "
        "whichever stage it interrupts), and the time outside the stages (gRPC, explanations, client); at_s: seconds into "
        "the timed queries",
    }


def measure(service: Service, data: dict, queries: int) -> dict:
    for q in range(5):  # warm-up
        service.search(data, q, 10, 10)
    times, traces = [], []
    trace = QueryTrace(service.thread.server.searcher, service.thread.server.store)
    began = time.perf_counter()
    try:
        for q in range(queries):
            trace.start()
            started = time.perf_counter()
            response = service.search(data, q % len(data["caption_global"]), 10, 10)
            times.append(1000 * (time.perf_counter() - started))
            traces.append(trace.record(times[-1], started - began))
            assert len(response.hits) == 10
    finally:
        trace.close()
    return {**percentiles(times), "tail": tail_profile(traces)}


def first_stage_probe(store, data: dict, queries: int) -> dict:
    """The first stage's Milvus calls from this thread, three ways interleaved per query (caption vectors, 100
    candidates as at top_k 10, R_m 10): the store's search with the candidates' fields and concepts, an ids-only
    search, and an ids-only search followed by one query by primary key for those fields. Whether fetching the
    fields apart would shorten the tail, measured on the same collections as the row."""
    from search_service.filters import id_filter

    name, fields, read = store.name("images"), store._fields(True, False), store._read()
    search_params = {"metric_type": "IP", "params": store.dense_search_params(100)}
    times: dict[str, list[float]] = {"search_with_fields": [], "search_ids_only": [], "ids_then_query_by_id": []}

    def search(vector: list, output_fields: list[str]) -> list:
        options = dict(anns_field="global_vector", limit=100, output_fields=output_fields, search_params=search_params)
        return store.client.search(name, data=[vector], **options, **read)[0]

    for q in range(queries):
        vector = np.asarray(data["caption_global"][q % len(data["caption_global"])], np.float32).tolist()
        started = time.perf_counter()
        search(vector, fields)
        times["search_with_fields"].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        search(vector, ["id"])
        times["search_ids_only"].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        ids = [hit["id"] for hit in search(vector, ["id"])]
        rows = store.client.query(name, filter=id_filter(ids), output_fields=fields, **read)
        times["ids_then_query_by_id"].append(1000 * (time.perf_counter() - started))
        assert len(rows) == len(ids)
    return {way: {**percentiles(ms), "max_ms": round(max(ms), 2)} for way, ms in times.items()} | {
        "queries": queries,
        "note": "pymilvus calls from the benchmark's thread, not through the service; the three ways interleaved per query",
    }


def cache_stats(service: Service) -> dict:
    cache = service.thread.server.cache
    return cache.stats() if cache is not None else {}


def service_settings(prefix: str, args) -> dict:
    """Service settings of a latency / scale run's collections."""
    return dict(
        ranking=args.ranking_setting,
        collection_prefix=prefix,
        consistency_level="Bounded",
        index_type=args.index_type,
        index_params=args.index_params,
        max_candidates=2000,
        **({"concept_codec": args.concept_codec} if args.store_codes else {}),
    )


def concept_bytes(store, base: dict) -> None:
    """What one image item's concepts take: the raw bytes (codes or fp16) and the encoding."""
    base["concept_encoding"] = store.layout.concepts.describe(store.chunks)
    base["concept_bytes_per_image"] = store.layout.concepts.item_bytes(store.known_model.dimension, int(base["concepts_per_item"]), True)


def measure_phases(data: dict, uri: str, prefix: str, base: dict, queries: int, server_pid: int | None, args) -> list[dict]:
    """After indexing: restart (the re-rank cache is rebuilt from Milvus, timed), query with the cache, then (with
    --compare-no-cache) query the same collections with --rerank-cache-mb 0; --drop removes the collections."""
    common = service_settings(prefix, args)
    entries = []
    if args.rerank_cache_mb <= 0:  # no cache at all: the phase without it only
        return entries + measure_without_cache(data, uri, prefix, base, queries, server_pid, args)
    started = time.perf_counter()
    service = Service(uri, rerank_cache_mb=args.rerank_cache_mb, **common)
    try:
        service.thread.server.cache.loaded.wait(3600)
        load_s = time.perf_counter() - started
        stats = cache_stats(service)
        log(f"{base['backend']} {base['n_items']}: re-rank cache rebuilt from Milvus in {load_s:.1f}s: {stats}")
        timing = measure(service, data, queries)
        stats = cache_stats(service)
        entries.append(
            {
                **base,
                "rerank_cache": True,
                **timing,
                "cache_load_s": round(load_s, 1),
                "cache_mib": round(stats["bytes"] / 2**20, 1),
                "cache_limit_mib": args.rerank_cache_mb,
                "cache_items": stats["items"],
                "cache_full": stats["full"],
                "cache_hits": stats["hits"],
                "cache_misses": stats["misses"],
                "rss_mb": rss_mb(server_pid) if server_pid else None,
                "service_rss_mb": rss_mb(os.getpid()),
                "rss_of": "rss_mb: milvus standalone process; service_rss_mb: benchmark process (service + cache"
                + (" + embedded milvus-lite)" if not server_pid else ")"),
            }
        )
        log(entries[-1])
    finally:
        service.close()
    if args.compare_no_cache:
        return entries + measure_without_cache(data, uri, prefix, base, queries, server_pid, args)
    drop(uri, prefix, args)
    return entries


def measure_without_cache(data: dict, uri: str, prefix: str, base: dict, queries: int, server_pid: int | None, args) -> list[dict]:
    """Query with --rerank-cache-mb 0: every search's candidates bring their concepts from Milvus."""
    service = Service(uri, rerank_cache_mb=0, **service_settings(prefix, args))
    try:
        timing = measure(service, data, queries)
        if args.probe_first_stage:
            timing["first_stage_probe"] = first_stage_probe(service.thread.server.store, data, queries)
        entry = {
            **base,
            "rerank_cache": False,
            **timing,
            "rss_mb": rss_mb(server_pid) if server_pid else rss_mb(os.getpid()),
            "service_rss_mb": rss_mb(os.getpid()),
        }
        log(entry)
    finally:
        service.close()
    drop(uri, prefix, args)
    return [entry]


def drop(uri: str, prefix: str, args) -> None:
    if args.drop:
        from demo.milvus_standalone import drop_collections

        drop_collections(uri, prefix)


def latency(data: dict, backend: str, uri: str, n_items: int, queries: int, server_pid: int | None, args) -> list[dict]:
    """Index N items into a fresh collection pair (re-rank cache on, filled by the writes), flush (seal: milvus-lite
    searches its unsealed memtable brute force), then: restart to time the cache rebuild from Milvus, query with the
    cache, query again with --rerank-cache-mb 0 on the same collections (the previous design: concepts come with
    the search)."""
    prefix = f"lat_{n_items}_{os.getpid()}"
    common = service_settings(prefix, args)
    service = Service(uri, rerank_cache_mb=args.rerank_cache_mb, **common)
    base = {"backend": backend, "n_items": n_items, "queries": queries, "top_k": 10, "rerank_multiplier": 10}
    base["concepts_per_item"] = int(data["image_concepts"].shape[1])
    try:
        index_s = service.index(data, n_items, noise=0.05, batch=256)
        store = service.thread.server.store
        flush_s = seal(store, base)
        concept_bytes(store, base)
        log(f"{backend}: indexed {n_items} items in {index_s:.1f}s (flush {flush_s:.1f}s), index {store.index_type}")
    finally:
        service.close()
    base.update(index_s=round(index_s, 1), index_items_per_s=round(n_items / index_s, 1), flush_s=round(flush_s, 1))
    return measure_phases(data, uri, prefix, base, queries, server_pid, args)


def wait_indexed(store, timeout: float = 1800.0) -> float:
    """Seconds until the dense index covers every row (Milvus builds it in the background after a flush)."""
    started = time.perf_counter()
    name = store.name("images")
    while time.perf_counter() - started < timeout:
        try:
            info = store.client.describe_index(name, "global_vector")
        except Exception:  # noqa: BLE001 - milvus-lite: no background building to wait for
            return 0.0
        if not info or int(info.get("pending_index_rows", 0) or 0) == 0:
            return time.perf_counter() - started
        time.sleep(2)
    return time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(store, server_pid: int | None, base: dict, window_s: float = 30.0, idle_cores: float = 0.1, timeout_s: float = 3600.0) -> None:
    """After the index build, let the server reach its steady state before queries are timed: compact the image
    collection (Milvus merges the small sealed segments of a bulk load, then indexes the merged ones: minutes of
    CPU on 2 cores, which otherwise lands in the latency tail), wait for the new segments' index, then until the
    server uses under `idle_cores` of a core over `window_s`. Records compact_s and settle_s in `base`."""
    if server_pid is None:  # milvus-lite: no background work
        return
    started = time.perf_counter()
    name = store.name("images")
    job = store.client.compact(name)
    while store.client.get_compaction_state(job) == "Executing" and time.perf_counter() - started < timeout_s:
        time.sleep(5)
    base["compact_s"] = round(time.perf_counter() - started, 1)
    wait_indexed(store, timeout_s)
    while time.perf_counter() - started < timeout_s:
        before = cpu_seconds(server_pid)
        time.sleep(window_s)
        busy = (cpu_seconds(server_pid) - before) / window_s
        if busy < idle_cores:
            break
        log(f"  settle: milvus busy at {busy:.2f} cores ({time.perf_counter() - started:.0f}s)")
    base["settle_s"] = round(time.perf_counter() - started, 1)
    log(f"  settled in {base['settle_s']}s (compaction {base['compact_s']}s)")


def record_segments(store, base: dict, args) -> None:
    """The server's segment size setting and the image collection's loaded segments (each search visits every one)."""
    base["segment_max_mb"] = args.segment_max_mb
    try:
        base["segments"] = len(store.client.list_loaded_segments(store.name("images")))
    except Exception as exc:  # noqa: BLE001 - diagnostic only (milvus-lite has no segment listing)
        log(f"  segments of {store.name('images')}: not listed ({exc})")


def seal(store, base: dict) -> float:
    """Flush both collections, wait for their indexes and record the index settings in `base`; returns the flush seconds."""
    started = time.perf_counter()
    for name in (store.name("images"), store.name("captions")):
        store.client.flush(name)
    flush_s = time.perf_counter() - started
    base["index_wait_s"] = round(wait_indexed(store), 1)
    base.update(index_type=store.index_type, index_params=store.index_params, search_params=store.search_params)
    return flush_s


def scale(data: dict, backend: str, uri: str, n_items: int, queries: int, server_pid: int | None, args) -> list[dict]:
    """Large N where full-size items do not fit this machine: items with `--scale-concepts` concept vectors each
    (global vector: a dev image's + noise; concepts: its first regions + noise), written in-process through the
    service's store and cache code (MilvusStore.upsert + ConceptSource.written, no gRPC: much faster to fill), then the
    same measurements as `latency` (cache rebuild on restart, queries with and without the cache)."""
    from search_service.layout import ModelRef
    from search_service.store import Item

    prefix = f"scale_{n_items}_{os.getpid()}"
    common = service_settings(prefix, args)
    concepts_per_item = args.scale_concepts
    service = Service(uri, rerank_cache_mb=args.rerank_cache_mb, **common)
    base = {"backend": backend, "n_items": n_items, "queries": queries, "top_k": 10, "rerank_multiplier": 10}
    base["items"] = f"{concepts_per_item} concept vector(s) per item (scale run: written in-process, not through gRPC)"
    base["concepts_per_item"] = concepts_per_item
    try:
        server = service.thread.server
        store = server.store
        model = [str(x) for x in data["model"]]
        store.ensure(ModelRef(model[0], int(model[1]), int(model[2])))
        rng = np.random.default_rng(0)
        n_images = len(data["image_global"])
        started = time.perf_counter()
        step = 2000
        for start in range(0, n_items, step):
            src = np.arange(start, min(n_items, start + step)) % n_images
            g = data["image_global"][src] + rng.normal(0, 0.05, (len(src), data["image_global"].shape[1])).astype(np.float32)
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            c = data["image_concepts"][src, :concepts_per_item] + rng.normal(0, 0.05, (len(src), concepts_per_item, g.shape[1])).astype(
                np.float32
            )
            c /= np.linalg.norm(c, axis=2, keepdims=True)
            boxes = data["image_boxes"][src, :concepts_per_item]
            items = [Item(f"i{start + j}", g[j], c[j], {"src": int(src[j])}, boxes=boxes[j]) for j in range(len(src))]
            store.upsert("images", items)
            server.concepts.written("images", items)
            if start % 100000 == 0:
                log(f"  scale {backend}: wrote {start + len(src)}/{n_items} ({time.perf_counter() - started:.0f}s)")
        index_s = time.perf_counter() - started
        flush_s = seal(store, base)
        settle(store, server_pid, base)
        if server_pid is not None:
            record_segments(store, base, args)
        concept_bytes(store, base)
        log(f"scale {backend}: wrote {n_items} items in {index_s:.1f}s (flush {flush_s:.1f}s), {base['concept_encoding']}")
    finally:
        service.close()
    base.update(index_s=round(index_s, 1), index_items_per_s=round(n_items / index_s, 1), flush_s=round(flush_s, 1))
    return measure_phases(data, uri, prefix, base, queries, server_pid, args)


def merge_latency(old: list[dict], new: list[dict]) -> list[dict]:
    """Replace old entries measured again (same backend, N, cache setting, concepts per item and their encoding);
    keep the others."""

    def key(e: dict) -> tuple:
        encoding = str(e.get("concept_encoding", "fp16")).split(" ")[0]  # fp16 / transform
        return (e.get("backend"), e.get("n_items"), e.get("rerank_cache", False), e.get("concepts_per_item"), encoding)

    fresh = {key(e) for e in new}
    return [e for e in old if key(e) not in fresh] + new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "teran-flickr8k")
    parser.add_argument("--images", type=int, default=1000, help="dev images (gallery of the agreement part)")
    parser.add_argument("--queries", type=int, default=5000, help="caption queries of the agreement part (default: all 5,000 dev captions)")
    parser.add_argument(
        "--image-queries", type=int, default=None, help="image queries of the agreement part (default: every gallery image)"
    )
    parser.add_argument(
        "--ranking",
        default="model",
        help="re-rank score given to the service and used by the exhaustive reference: model (the manifest's blend_weight; "
        "MrSw when it has none), mrsw, or blend:W",
    )
    parser.add_argument("--multipliers", default="1,2,3,5,10")
    parser.add_argument("--rerank-multiplier", type=int, default=10, help="R_m of the top-level agreement_at_10")
    parser.add_argument(
        "--parts",
        default="agreement,latency",
        help="comma-separated: agreement (service + strategies), strategies (only the numpy first-stage table), latency, "
        "scale (--scale-sizes with small items, on --scale-backend), codec (train the concept codec, serve dev from its codes)",
    )
    parser.add_argument("--scale-sizes", default="1000000")
    parser.add_argument("--scale-backend", default="server")
    parser.add_argument(
        "--segment-max-mb",
        type=int,
        default=1024,
        help="Milvus server: dataCoord.segment.maxSize in MB (default 1024, as Milvus 2.4+; the package's 2.3: 512)",
    )
    parser.add_argument("--scale-concepts", type=int, default=1, help="concept vectors per item of the scale part")
    parser.add_argument("--codec-bytes", type=int, default=80, help="codec part: bytes per caption word piece (default 80)")
    parser.add_argument("--codec-salient", type=int, default=4, help="codec part: regions per image kept as fp16 (default 4; 0: none)")
    parser.add_argument(
        "--codec-image-bytes", type=int, default=4096, help="codec part: bytes per image with salient regions (default 4096)"
    )
    parser.add_argument(
        "--codec-salient-sweep",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[3, 4, 5],
        help="codec part: fp16 regions per image of the salient sweep at --codec-image-bytes (numpy, comma separated; empty: none)",
    )
    parser.add_argument(
        "--codec-sweep",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[80, 120, 160, 240],
        help="codec part: bytes per vector of the agreement sweep (numpy, comma separated; empty: none)",
    )
    parser.add_argument("--codec-train-images", type=int, default=2000, help="codec part: train photos (and their captions) fitted")
    parser.add_argument(
        "--concept-codec",
        type=Path,
        default=ROOT / "models" / "concept-codec-teran-flickr8k-80.npz",
        help="codec part: where the trained codec is written",
    )
    parser.add_argument(
        "--store-codes", action="store_true", help="latency / scale runs: collections store --concept-codec's codes, not fp16"
    )
    parser.add_argument("--boc", default="256:1,1024:1,1024:4", help="Bag of Concepts settings SIZE:TOP of the strategies table")
    parser.add_argument("--sizes", default="100000", help="collection sizes on the Milvus server backend")
    parser.add_argument("--lite-sizes", default="100000", help="collection sizes on milvus-lite")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--index-type", default="auto", help="dense index (search service --index-type)")
    parser.add_argument("--index-params", type=json.loads, default={}, help="JSON build parameters (search service --index-params)")
    parser.add_argument("--rerank-cache-mb", type=float, default=8192, help="re-rank cache limit of the latency runs")
    parser.add_argument("--no-compare", dest="compare_no_cache", action="store_false", help="skip the run without the cache")
    parser.add_argument(
        "--probe-first-stage",
        action="store_true",
        help="runs without the re-rank cache: after the timed queries, time the first stage's Milvus calls from the "
        "benchmark (search with fields, ids only, ids then a query by id; the row's first_stage_probe)",
    )
    parser.add_argument("--keep", dest="drop", action="store_false", help="keep the latency collections")
    parser.add_argument("--merge", action="store_true", help="update --output in place: keep the parts and entries not re-run")
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench-search.json")
    args = parser.parse_args(argv)
    parts = {p for p in args.parts.split(",") if p}
    boc = [(int(a), int(b)) for a, b in (x.split(":") for x in args.boc.split(",") if x)]
    multipliers = [int(x) for x in args.multipliers.split(",")]
    data = encode_split(args.model_dir, args.images)
    try:
        ranking = resolve_ranking(args.ranking, data["blend_weight"], data["hub"])
    except ValueError as exc:
        parser.error(str(exc))
    # Latency runs have no encoder: they rank by the blend alone (the hub penalty adds one subtraction per candidate).
    args.ranking_setting = resolve_ranking(args.ranking, data["blend_weight"])[1]
    log(f"embeddings: {data['image_concepts'].shape} images, {data['caption_concepts'].shape} captions; ranking {ranking[0].label}")
    report: dict = json.loads(args.output.read_text()) if args.merge and args.output.exists() else {}
    command = "python bench/bench_search.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if "agreement" in parts:
        report["model"] = {
            "name": str(data["model"][0]),
            "version": int(data["model"][1]),
            "dimension": int(data["model"][2]),
            "blend_weight": data["blend_weight"],
            "hub_penalty": data["hub"].describe() if data["hub"] else None,
        }
        report["rerank_multiplier"] = args.rerank_multiplier
        report["command"] = command
    else:
        report.setdefault("rerank_multiplier", args.rerank_multiplier)
    workdir = Path(tempfile.mkdtemp(prefix="bench-search-"))
    standalone = None
    try:
        if "agreement" in parts:
            queries = min(args.queries, len(data["caption_global"]))
            report["agreement"], report["agreement_i2t"] = agreement(data, multipliers, queries, workdir, boc, ranking, args.image_queries)
            report["agreement_at_10"] = report["agreement"]["per_multiplier"][str(args.rerank_multiplier)]["agreement_at_10"]
            for direction, key in (("text to image", "agreement"), ("image to text", "agreement_i2t")):
                line = summary(direction, report[key], args.rerank_multiplier)
                log(line)
                print(line, flush=True)
        elif "strategies" in parts:
            queries = min(args.queries, len(data["caption_global"]))
            scores, _ = reference_scores(data, ranking[0])
            full = np.ascontiguousarray(scores[:, :queries].T)
            owners = data["caption_owner"][:queries]
            report.setdefault("agreement", {})["strategies"] = strategies(data, full, top10(full), owners, multipliers, boc)
            report["strategies_command"] = command
            report["strategies_ranking"] = ranking[0].label
        if "codec" in parts:
            report["codec"] = codec_part(data, args, workdir, ranking)
            report["codec_command"] = command
            args.output.write_text(json.dumps(report, indent=2) + "\n")
            log(f"codec: {json.dumps(report['codec'])}")
        if "scale" in parts:
            if args.scale_backend == "server":
                from demo.milvus_standalone import MilvusStandalone

                standalone = MilvusStandalone(workdir / "milvus-scale", segment_max_mb=args.segment_max_mb)
                uri, pid = standalone.uri, standalone.pid
            else:
                uri, pid = str(workdir / "scale.db"), None
            report["scale_command"] = command
            scale_entries: list[dict] = []
            for n in [int(x) for x in args.scale_sizes.split(",") if x]:
                scale_entries += scale(data, args.scale_backend, uri, n, args.latency_queries, pid, args)
                report["latency"] = merge_latency(report.get("latency", []), scale_entries)
                args.output.write_text(json.dumps(report, indent=2) + "\n")
            if standalone is not None:
                standalone.stop()
                standalone = None
        if "latency" in parts:
            report["latency_command"] = command
            report["latency_model"] = {"name": str(data["model"][0]), "version": int(data["model"][1])}
            latency_entries: list[dict] = []
            for backend in [b for b in args.backends.split(",") if b]:
                if backend == "server":
                    from demo.milvus_standalone import MilvusStandalone

                    standalone = MilvusStandalone(workdir / "milvus", segment_max_mb=args.segment_max_mb)
                    uri, pid = standalone.uri, standalone.pid
                else:
                    uri, pid = str(workdir / "latency.db"), None
                for n in [int(x) for x in (args.sizes if backend == "server" else args.lite_sizes).split(",") if x]:
                    latency_entries += latency(data, backend, uri, n, args.latency_queries, pid, args)
                    report["latency"] = merge_latency(report.get("latency", []), latency_entries)
                    args.output.write_text(json.dumps(report, indent=2) + "\n")
                if standalone is not None:
                    standalone.stop()
                    standalone = None
    finally:
        if standalone is not None:
            standalone.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.output}: agreement_at_10={report.get('agreement_at_10')} at R_m={report.get('rerank_multiplier')}")
    for entry in report.get("latency", []):
        cached = entry.get("rerank_cache")
        log(f"  {entry['backend']:>6} n={entry['n_items']:>7} cache={cached}: p50 {entry['p50_ms']} ms, p99 {entry['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
