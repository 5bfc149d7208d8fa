"""Cross-modal search demo on real Flickr8k photos, end to end through the gRPC encoder service.

    python -m demo                       # or: bash scripts/demo.sh (also sets up .venv)

Steps (each reused on a second run when its inputs are unchanged):
 1. model: models/teran-flickr8k.pt (trained here; retrained if missing)
 2. export: ONNX graphs + manifest in artifacts/teran-flickr8k
 3. encoder service: started on loopback from the exported model (no torch)
 4. index: every dev photo encoded through the service (streaming); captions too
 5. queries: captions -> photos and a photo -> captions, first stage on the global vector,
    re-ranked with the TERAN MrSw alignment; prints which word matched which region
 6. contact sheet: artifacts/demo/index.html
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from demo.contact_sheet import write_contact_sheet
from demo.ranking import Gallery, rank
from demo.steps import REPO, encoder_service, ensure_checkpoint, ensure_model_dir, log, short_path
from teran.data.flickr8k import load_split

CAPTION_QUERIES = [
    "a dog runs through the snow",
    "two children play on the beach near the water",
    "a man rides a bicycle down a dirt trail",
    "a group of people stand in front of a building",
    "a black dog jumps to catch a frisbee",
]


def encode_gallery(address: str, data, cache: Path, batch: int = 32) -> tuple[Gallery, Gallery]:
    """Dev photos and their captions encoded by the service; cached per model and image list."""
    from encoder_service.client import EncoderClient

    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            log(f"index: reusing {short_path(cache)}")
            return Gallery.from_arrays(stored, "images"), Gallery.from_arrays(stored, "captions")
    captions, owners = data.flat_captions()
    started = time.monotonic()
    with EncoderClient(address, timeout=600) as client:
        paths = [data.image_path(i) for i in range(len(data.names))]
        image_parts = []
        with tqdm(total=len(paths), desc="index photos", unit="img") as bar:
            for result in client.stream_encode_images([p.read_bytes() for p in paths[s : s + batch]] for s in range(0, len(paths), batch)):
                image_parts.extend(result)
                bar.update(len(result))
        caption_parts = []
        with tqdm(total=len(captions), desc="index captions", unit="cap") as bar:
            for result in client.stream_encode_captions(captions[s : s + 4 * batch] for s in range(0, len(captions), 4 * batch)):
                caption_parts.extend(result)
                bar.update(len(result))
    images = Gallery.build(
        ids=data.names,
        globals_=[r.global_vector for r in image_parts],
        concepts=[r.concepts for r in image_parts],
        labels=[[f"region {k}" for k in range(len(r.concepts))] for r in image_parts],
        boxes=[r.boxes for r in image_parts],
    )
    texts = Gallery.build(
        ids=[f"{data.names[o]}#{k % 5}" for k, o in enumerate(owners)],
        globals_=[r.global_vector for r in caption_parts],
        concepts=[r.concepts for r in caption_parts],
        labels=[r.word_pieces for r in caption_parts],
        boxes=None,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **images.to_arrays("images"), **texts.to_arrays("captions"))
    log(f"index: {len(images.ids)} photos and {len(texts.ids)} captions encoded in {time.monotonic() - started:.0f}s")
    return images, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "models" / "teran-flickr8k.pt"), help="trained checkpoint (trained if missing)")
    parser.add_argument(
        "--config", default=str(REPO / "configs" / "flickr8k.yaml"), help="training config used when the checkpoint is missing"
    )
    parser.add_argument("--model-dir", default=str(REPO / "artifacts" / "teran-flickr8k"), help="exported model directory")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument("--split", default="dev", help="photos to index (default dev)")
    parser.add_argument("--query", action="append", default=None, help="caption query (repeatable; default: five built-in queries)")
    parser.add_argument("--top-k", type=int, default=5, help="hits per query (default 5)")
    parser.add_argument("--rerank-multiplier", type=int, default=10, help="first stage keeps top_k x this for re-ranking (default 10)")
    parser.add_argument("--output", default=str(REPO / "artifacts" / "demo"), help="where index.html and the caches go")
    args = parser.parse_args(argv)

    output = Path(args.output)
    checkpoint = ensure_checkpoint(Path(args.checkpoint), Path(args.config))
    model_dir = ensure_model_dir(checkpoint, Path(args.model_dir))
    data = load_split(args.split, args.data_dir)
    key = hashlib.sha256(
        (str(model_dir.resolve()) + (model_dir / "manifest.json").read_text() + "\n".join(data.names)).encode()
    ).hexdigest()[:12]

    from encoder_service.client import EncoderClient

    with encoder_service(model_dir) as address:
        images, texts = encode_gallery(address, data, output / f"index-{key}.npz")
        with EncoderClient(address) as client:
            queries = args.query or CAPTION_QUERIES
            encoded = client.encode_captions(queries)
            image_query = data.names[7]
            image_encoded = client.encode_images([data.image_path(7).read_bytes()])[0]

    sections = []
    for text, query in zip(queries, encoded, strict=True):
        hits = rank(query.global_vector, query.concepts, query.word_pieces, images, args.top_k, args.rerank_multiplier)
        print(f'\nQUERY "{text}"  (first stage: top {args.top_k * args.rerank_multiplier} by global vector; re-ranked by MrSw)')
        for place, hit in enumerate(hits, 1):
            reference = data.captions[data.names.index(hit.id)][0]
            print(f"  {place}. {hit.id}  score {hit.score:.3f}  first-stage {hit.first_stage:.3f}  | {reference}")
            matches = ", ".join(f"{m.word}->r{m.target}@({m.box[0]:.2f},{m.box[1]:.2f})={m.similarity:.2f}" for m in hit.matches[:6])
            print(f"     words -> regions: {matches}")
        sections.append(("caption", text, hits))
    caption_hits = rank(
        image_encoded.global_vector,
        image_encoded.concepts,
        [f"region {k}" for k in range(len(image_encoded.concepts))],
        texts,
        args.top_k,
        args.rerank_multiplier,
        alignment_from_targets=True,
        query_boxes=image_encoded.boxes,
    )
    print(f"\nIMAGE QUERY {image_query} (its own captions are in the gallery)")
    for place, hit in enumerate(caption_hits, 1):
        owner, number = hit.id.split("#")
        caption = data.captions[data.names.index(owner)][int(number)]
        mark = "  <- own caption" if owner == image_query else ""
        print(f"  {place}. score {hit.score:.3f}  first-stage {hit.first_stage:.3f}  {caption}{mark}")
    sections.append(("image", image_query, caption_hits))
    sheet = write_contact_sheet(output / "index.html", sections, data)
    log(f"contact sheet: {short_path(sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
