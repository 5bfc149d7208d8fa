"""Cross-modal search demo on real Flickr8k photos, end to end through both gRPC services.

    python -m demo                       # or: bash scripts/demo.sh (also sets up .venv)

Steps (each reused on a second run when its inputs are unchanged):
 1. model: models/teran-flickr8k.pt (trained here; retrained if missing)
 2. export: ONNX graphs + manifest in artifacts/teran-flickr8k
 3. services: the encoder (ONNX Runtime, no torch) and the search service (embedded
    milvus-lite file artifacts/demo/search-<model checksum>.db) on loopback
 4. index: every dev photo and caption streamed into the search service
 5. queries: captions -> photos and a photo -> captions (first stage on the global vector,
    re-ranked with the TERAN MrSw alignment), printing which word matched which region
 6. contact sheet: artifacts/demo/index.html, rendered to artifacts/demo/contact-sheet.png by a
    headless Chromium when one is installed (apt-get install -y chromium chromium-driver)
 7. search page: the webui gateway on http://127.0.0.1:8080/ (type a caption or upload a photo;
    each hit shows its words' regions), a screenshot of it answering the first query
    (artifacts/demo/search-page.png); from a terminal the demo then serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from demo.contact_sheet import PAGE_WIDTH, Section, write_contact_sheet
from demo.results import Hit
from demo.screenshot import BrowserUnavailable, screenshot
from demo.search_page import page_screenshot, start_page
from demo.steps import REPO, ensure_checkpoint, ensure_model_dir, log, service, short_path
from teran.data.flickr8k import load_split
from teran.manifest import load_manifest

CAPTION_QUERIES = [
    "a dog runs through the snow",
    "two children play on the beach near the water",
    "a man rides a bicycle down a dirt trail",
    "a group of people stand in front of a building",
    "a black dog jumps to catch a frisbee",
]
IMAGE_QUERY_INDEX = 7  # a dev photo whose own captions are in the index


def index_split(client, data, batch: int = 32) -> None:
    """Index the split's photos and captions into the search service, unless already there.

    One unary Index call per batch (32 photos, 128 captions): it returns once the batch is stored,
    so the progress bars count items stored, not items handed to gRPC's send buffer."""
    from teran_api.types import IndexItem, Modality

    captions, owners = data.flat_captions()
    stats = client.stats()
    photos_stored = False
    if stats.images == len(data.names) and stats.captions == len(captions):
        # Captions indexed before their metadata held their text are indexed again (an upsert).
        first = client.get(Modality.CAPTION, [f"{data.names[owners[0]]}#0"])[0] if captions else None
        if first is None or (first.found and "text" in (first.metadata or {})):
            log(f"index: reusing {stats.images} photos and {stats.captions} captions in {stats.uri}")
            return
        log(f"index: reusing the {stats.images} photos in {stats.uri}; its captions lack their text in metadata, indexing them again")
        photos_stored = True
    started = time.monotonic()

    if not photos_stored:
        with tqdm(total=len(data.names), desc="index photos", unit="img") as bar:
            for start in range(0, len(data.names), batch):
                items = [
                    IndexItem(data.names[i], data.image_path(i).read_bytes(), json.dumps({"caption": data.captions[i][0]}))
                    for i in range(start, min(start + batch, len(data.names)))
                ]
                bar.update(client.index(items).indexed)
    with tqdm(total=len(captions), desc="index captions", unit="cap") as bar:
        for start in range(0, len(captions), 4 * batch):
            items = [
                IndexItem(
                    f"{data.names[owners[k]]}#{k % 5}", captions[k], json.dumps({"image": data.names[owners[k]], "text": captions[k]})
                )
                for k in range(start, min(start + 4 * batch, len(captions)))
            ]
            bar.update(client.index(items).indexed)
    stats = client.stats()
    log(f"index: {stats.images} photos and {stats.captions} captions stored in {stats.uri} in {time.monotonic() - started:.0f}s")


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
    parser.add_argument("--output", default=str(REPO / "artifacts" / "demo"), help="where index.html and the milvus-lite file go")
    parser.add_argument(
        "--screenshot",
        default=None,
        metavar="PATH",
        help="PNG of the contact sheet, rendered by headless Chromium (default: contact-sheet.png in --output; skipped without a browser)",
    )
    parser.add_argument(
        "--page-screenshot",
        default=None,
        metavar="PATH",
        help="PNG of the search page answering the first query (default: search-page.png in --output; skipped without a browser)",
    )
    parser.add_argument("--web-port", type=int, default=8080, help="port of the search page on 127.0.0.1 (default 8080; 0: any free port)")
    parser.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the search page and the services up until Ctrl-C (default: when run from a terminal)",
    )
    args = parser.parse_args(argv)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(Path(args.checkpoint), Path(args.config))
    model_dir = ensure_model_dir(checkpoint, Path(args.model_dir))
    data = load_split(args.split, args.data_dir)
    # One milvus-lite file per exported model: a new model never meets vectors of another.
    database = output / f"search-{load_manifest(model_dir, verify=False).source.sha256[:12]}.db"

    from teran_api.search_client import SearchClient

    with (
        service("encoder_service", "teran.v1.EncoderService", ["--model-dir", str(model_dir)]) as encoder,
        service("search_service", "teran.v1.SearchService", ["--milvus-uri", str(database), "--encoder-address", encoder]) as search,
        SearchClient(search, timeout=120) as client,
    ):
        index_split(client, data)
        sections = []
        for text in args.query or CAPTION_QUERIES:
            response = client.search_caption(text, top_k=args.top_k, rerank_multiplier=args.rerank_multiplier)
            hits = [Hit.from_search_hit(h) for h in response.hits]
            print(f'\nQUERY "{text}"  ({response.candidates} first-stage candidates by global vector; score: {response.ranking})')
            for place, hit in enumerate(hits, 1):
                print(f"  {place}. {hit.id}  score {hit.score:.3f}  first-stage {hit.first_stage:.3f}  | {hit.metadata.get('caption', '')}")
                matches = ", ".join(
                    f"{m.word} -> region {m.region} box ({', '.join(f'{v:.2f}' for v in m.box)}) sim {m.similarity:.2f}"
                    for m in hit.strongest_matches(3)
                )
                print(f"     best-matched words: {matches}")
            sections.append(Section("caption", text, hits, response.ranking))

        image_query = data.names[IMAGE_QUERY_INDEX]
        response = client.search_image(
            data.image_path(IMAGE_QUERY_INDEX).read_bytes(), top_k=args.top_k, rerank_multiplier=args.rerank_multiplier
        )
        hits = [Hit.from_search_hit(h) for h in response.hits]
        print(f"\nIMAGE QUERY {image_query} (its own 5 captions are among the {len(data.names) * 5} indexed; score: {response.ranking})")
        for place, hit in enumerate(hits, 1):
            text = data.captions[data.names.index(hit.metadata["image"])][int(hit.id.split("#")[1])]
            mark = "  <- its own caption" if hit.metadata["image"] == image_query else ""
            print(f"  {place}. score {hit.score:.3f}  first-stage {hit.first_stage:.3f}  {text}{mark}")
        sections.append(Section("image", image_query, hits, response.ranking))
        sheet = write_contact_sheet(output / "index.html", sections, data)
        log(f"contact sheet: {short_path(sheet)}")
        png = Path(args.screenshot) if args.screenshot else output / "contact-sheet.png"
        in_browser("contact sheet screenshot", lambda: screenshot(sheet, png, width=PAGE_WIDTH), sheet)

        page = start_page(search, data.image_path(0).parent, args.web_port)
        try:
            page_png = Path(args.page_screenshot) if args.page_screenshot else output / "search-page.png"
            in_browser("search page screenshot", lambda: page_screenshot(page.url, (args.query or CAPTION_QUERIES)[0], page_png))
            log(f"search page: {page.url}  (type a caption or upload a photo; python -m webui --help)")
            serve = sys.stdin.isatty() if args.serve is None else args.serve
            if serve:
                log("serving the page and both services until Ctrl-C")
                wait_for_interrupt()
            else:
                log("the page stops with the demo: run `python -m demo --serve` to keep it up")
        finally:
            page.shutdown()
    return 0


def in_browser(label: str, render, written: Path | None = None) -> None:
    """Run a headless-Chromium step; a missing or failing browser is reported, not fatal (the files are the result)."""
    try:
        log(f"{label}: {short_path(render())}")
    except BrowserUnavailable as error:
        log(f"{label} skipped: {error}")
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        log(f"{label} failed ({type(error).__name__}: {reason})" + (f"; {short_path(written)} is written" if written else ""))


def wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")


if __name__ == "__main__":
    sys.exit(main())
