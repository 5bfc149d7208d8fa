"""Search service: re-rank agreement with exhaustive TERAN scoring, recall curves, and query latency.

    .venv/bin/python bench/bench_search.py --model-dir artifacts/teran-flickr8k \
        [--sizes 100000] [--lite-sizes 10000] [--backends lite,server] [--output reports/bench-search.json]

1. Encodes Flickr8k dev (1,000 images, 5,000 captions) with the real exported model through the
   encoder service (cached in .cache/bench-search/), stores the images in a fresh search service
   (milvus-lite, FLAT first stage, vectors sent precomputed), and runs every dev caption's query
   through gRPC at several R_m (top_k 10). `agreement_at_10[R_m]`: the fraction of queries whose
   re-ranked top-10 ids equal, as a set, the top-10 of exhaustive MrSw over all 1,000 images (numpy,
   on the stored fp16 concepts); `agreement_at_10_ordered` the same for the ordered list. Recall@1/5/10
   (text-to-image, the image of the caption) for exhaustive MrSw, first stage only (global cosine), and
   first stage + re-rank at each R_m (the seed paper's Fig. 3c, dense first stage).
2. Latency: synthetic collections of N items built from the real image embeddings (item j = dev image
   j mod 1000 with Gaussian noise sigma 0.05 on every vector, renormalised), indexed through StreamIndex;
   p50/p99 of Search (caption vectors, top_k 10, R_m 10, through gRPC) per backend and N, plus the index
   rate and memory (RSS of the Milvus server process, or of this process for the embedded milvus-lite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from encoder_service.tensors import to_tensor  # noqa: E402
from search_service._proto import search_pb2, search_pb2_grpc  # noqa: E402
from teran.alignment_numpy import alignment_scores  # noqa: E402

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


def encode_dev(model_dir: Path, limit: int) -> dict:
    """Dev images and captions through the real encoder service (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    import hashlib

    digest = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()[:12]
    cache = CACHE / f"dev-{model_dir.name}-{digest}-{limit}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {k: data[k] for k in data.files}
    from encoder_service.client import EncoderClient
    from encoder_service.config import EncoderConfig
    from encoder_service.server import ServerThread
    from teran.data.flickr8k import load_split

    split = load_split("dev", limit=limit)
    config = EncoderConfig(model_dir=model_dir, host="127.0.0.1", port=0, metrics_port=-1, verify_model=False, max_items=64).validate()
    images_g, images_c, boxes, caps_g, caps_c, caps_n, owners = [], [], [], [], [], [], []
    with ServerThread(config) as server, EncoderClient(server.target, timeout=600) as client:
        model = client.model_info().model
        paths = [split.image_path(i) for i in range(len(split.names))]
        started = time.perf_counter()
        for start in range(0, len(paths), 16):
            for r in client.encode_images([p.read_bytes() for p in paths[start : start + 16]]):
                images_g.append(r.global_vector)
                images_c.append(r.concepts)
                boxes.append(r.boxes)
            if start % 160 == 0:
                log(f"encoded {start + 16}/{len(paths)} images")
        log(f"images encoded in {time.perf_counter() - started:.1f}s")
        texts, owner = split.flat_captions()
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
    return data


# --------------------------------------------------------------------------- service


def vectors(modality: int, g: np.ndarray, c: np.ndarray, model, boxes=None) -> search_pb2.Vectors:
    v = search_pb2.Vectors(modality=modality)
    v.global_vector.CopyFrom(to_tensor(g, np.float32))
    v.concepts.CopyFrom(to_tensor(c, np.float16))
    if boxes is not None:
        v.boxes.CopyFrom(to_tensor(boxes, np.float32))
    v.model.name, v.model.version, v.model.dimension = model[0], int(model[1]), int(model[2])
    return v


class Service:
    def __init__(self, uri: str, **overrides):
        from search_service.config import SearchConfig
        from search_service.server import ServerThread

        values = dict(milvus_uri=uri, host="127.0.0.1", port=0, metrics_port=-1, collection_prefix=f"bench_{os.getpid()}", max_top_k=100)
        values.update(overrides)
        self.thread = ServerThread(SearchConfig(**values).validate())
        self.channel = grpc.insecure_channel(self.thread.target, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def index(self, data: dict, n_items: int, noise: float = 0.0, batch: int = 128) -> float:
        rng = np.random.default_rng(0)
        model = [str(x) for x in data["model"]]
        n_images = len(data["image_global"])

        def messages():
            for start in range(0, n_items, batch):
                request = search_pb2.IndexRequest()
                for j in range(start, min(n_items, start + batch)):
                    src = j % n_images
                    g, c = data["image_global"][src], data["image_concepts"][src]
                    if noise:
                        g = g + rng.normal(0, noise, g.shape).astype(np.float32)
                        c = c + rng.normal(0, noise, c.shape).astype(np.float32)
                        g /= np.linalg.norm(g)
                        c /= np.linalg.norm(c, axis=1, keepdims=True)
                    item = request.items.add(id=f"i{j}", metadata_json=json.dumps({"src": int(src)}))
                    item.vectors.CopyFrom(vectors(search_pb2.IMAGE, g, c, model, data["image_boxes"][src]))
                yield request
                if start and start % (batch * 100) == 0:
                    log(f"  indexed {start}/{n_items}")

        started = time.perf_counter()
        response = self.stub.StreamIndex(messages(), timeout=7200)
        assert response.indexed == n_items, response
        return time.perf_counter() - started

    def search(self, data: dict, q: int, top_k: int, multiplier: int, rerank: bool = True):
        n = int(data["caption_lengths"][q])
        v = vectors(search_pb2.CAPTION, data["caption_global"][q], data["caption_concepts"][q, :n], [str(x) for x in data["model"]])
        request = search_pb2.SearchRequest(
            vectors=v, top_k=top_k, rerank_multiplier=multiplier, disable_rerank=not rerank, skip_explanation=True
        )
        return self.stub.Search(request, timeout=120)

    def close(self) -> None:
        self.channel.close()
        self.thread.stop()


# --------------------------------------------------------------------------- parts


def recall(ranked_ids: list[list[int]], owners: np.ndarray) -> dict:
    out = {}
    for k in (1, 5, 10):
        out[f"r{k}"] = round(100.0 * float(np.mean([owners[q] in ids[:k] for q, ids in enumerate(ranked_ids)])), 2)
    return out


def agreement(data: dict, multipliers: list[int], queries: int, workdir: Path) -> dict:
    n_images = len(data["image_global"])
    service = Service(str(workdir / "agreement.db"), index_type="FLAT", max_candidates=2000)
    try:
        index_s = service.index(data, n_images)
        log(f"indexed {n_images} dev images in {index_s:.1f}s")
        stored = data["image_concepts"].astype(np.float16).astype(np.float32)
        owners = data["caption_owner"][:queries]
        exhaustive, first_only = [], []
        mask_r = np.ones(stored.shape[:2], bool)
        full = np.zeros((queries, n_images), np.float32)
        for q in range(queries):
            n = int(data["caption_lengths"][q])
            words = data["caption_concepts"][q : q + 1, :n]
            scores = alignment_scores(stored, mask_r, words, np.ones((1, n), bool))[:, 0]
            full[q] = scores
            exhaustive.append(np.argsort(-scores, kind="stable")[:10].tolist())
            first_only.append(np.argsort(-(data["image_global"] @ data["caption_global"][q]), kind="stable")[:10].tolist())
        result = {
            "queries": queries,
            "gallery_images": n_images,
            "recall_exhaustive_mrsw": recall(exhaustive, owners),
            "recall_first_stage_only": recall(first_only, owners),
            "per_multiplier": {},
        }
        for m in multipliers:
            ranked, same_set, same_order = [], 0, 0
            started = time.perf_counter()
            for q in range(queries):
                ids = [int(h.id[1:]) for h in service.search(data, q, 10, m).hits]
                ranked.append(ids)
                same_set += set(ids) == set(exhaustive[q])
                same_order += ids == exhaustive[q]
            elapsed = time.perf_counter() - started
            result["per_multiplier"][str(m)] = {
                "agreement_at_10": round(same_set / queries, 4),
                "agreement_at_10_ordered": round(same_order / queries, 4),
                "recall_reranked": recall(ranked, owners),
                "mean_query_ms": round(1000 * elapsed / queries, 2),
            }
            log(f"R_m={m}: {result['per_multiplier'][str(m)]}")
        result["strategies"] = strategies(data, full, exhaustive, owners, multipliers)
        return result
    finally:
        service.close()


def strategies(data: dict, full: np.ndarray, exhaustive: list[list[int]], owners: np.ndarray, multipliers: list[int]) -> dict:
    """Fig. 3c in numpy: each first stage (dense cosine, SQ, DP surrogates: exact sparse inner products,
    i.e. what Milvus' inverted index returns) + MrSw re-rank of its top R_m x 10, on the same queries."""
    from search_service.sparse import deep_permutation, scalar_quantization

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
    out = {}
    for name, (first, extra) in settings.items():
        order = np.argsort(-first, axis=1, kind="stable")
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


def latency(data: dict, backend: str, uri: str, n_items: int, queries: int, server_pid: int | None) -> dict:
    service = Service(uri, collection_prefix=f"lat_{n_items}_{os.getpid()}", consistency_level="Bounded")
    try:
        index_s = service.index(data, n_items, noise=0.05, batch=256)
        log(f"{backend}: indexed {n_items} items in {index_s:.1f}s")
        for q in range(5):  # warm-up
            service.search(data, q, 10, 10)
        times = []
        for q in range(queries):
            started = time.perf_counter()
            response = service.search(data, q % len(data["caption_global"]), 10, 10)
            times.append(1000 * (time.perf_counter() - started))
            assert len(response.hits) == 10
        return {
            "backend": backend,
            "n_items": n_items,
            "queries": queries,
            "top_k": 10,
            "rerank_multiplier": 10,
            "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2),
            "mean_ms": round(float(np.mean(times)), 2),
            "index_s": round(index_s, 1),
            "index_items_per_s": round(n_items / index_s, 1),
            "rss_mb": rss_mb(server_pid or os.getpid()),
            "rss_of": "milvus standalone process" if server_pid else "benchmark process (embedded milvus-lite + service)",
        }
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "teran-flickr8k")
    parser.add_argument("--images", type=int, default=1000, help="dev images (gallery of the agreement part)")
    parser.add_argument("--queries", type=int, default=1000, help="caption queries of the agreement part")
    parser.add_argument("--multipliers", default="1,2,3,5,10")
    parser.add_argument("--rerank-multiplier", type=int, default=10, help="R_m of the top-level agreement_at_10")
    parser.add_argument("--sizes", default="100000", help="collection sizes on the Milvus server backend")
    parser.add_argument("--lite-sizes", default="10000", help="collection sizes on milvus-lite (pure Python: slow to fill)")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench-search.json")
    args = parser.parse_args(argv)
    multipliers = [int(x) for x in args.multipliers.split(",")]
    data = encode_dev(args.model_dir, args.images)
    log(f"embeddings: {data['image_concepts'].shape} images, {data['caption_concepts'].shape} captions")
    report: dict = {
        "model": {"name": str(data["model"][0]), "version": int(data["model"][1]), "dimension": int(data["model"][2])},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rerank_multiplier": args.rerank_multiplier,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-search-"))
    standalone = None
    try:
        report["agreement"] = agreement(data, multipliers, min(args.queries, len(data["caption_global"])), workdir)
        report["agreement_at_10"] = report["agreement"]["per_multiplier"][str(args.rerank_multiplier)]["agreement_at_10"]
        report["latency"] = []
        for backend in [b for b in args.backends.split(",") if b]:
            if backend == "server":
                from search_fixtures import MilvusStandalone

                standalone = MilvusStandalone(workdir / "milvus")
                uri, pid = standalone.uri, standalone.pid
            else:
                uri, pid = str(workdir / "latency.db"), None
            for n in [int(x) for x in (args.sizes if backend == "server" else args.lite_sizes).split(",") if x]:
                entry = latency(data, backend, uri, n, args.latency_queries, pid)
                log(entry)
                report["latency"].append(entry)
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
    log(f"wrote {args.output}: agreement_at_10={report['agreement_at_10']} at R_m={args.rerank_multiplier}")
    for entry in report["latency"]:
        log(f"  {entry['backend']:>6} n={entry['n_items']:>7}: p50 {entry['p50_ms']} ms, p99 {entry['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
