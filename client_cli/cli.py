"""The `teran` command line: argparse, subcommands, output (human-readable or --json), exit codes."""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Caption items carry their text in this metadata key (`teran index --captions`); "caption" is read too.
CAPTION_TEXT_KEYS = ("text", "caption")
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE: what a shell reports for a command that a closed pipe ended


@dataclass(frozen=True)
class Service:
    """A service the CLI calls: its address option, and what to tell a user who cannot reach it."""

    name: str
    dest: str  # the option is --{dest}
    env: str
    default: str
    grpc_service: str
    start: str  # the command that starts it

    @property
    def flag(self) -> str:
        return f"--{self.dest}"


ENCODER = Service(
    "encoder service", "encoder", "TERAN_ENCODER_ADDRESS", "localhost:50051", "teran.v1.EncoderService",
    "python -m encoder_service --model-dir DIR",
)  # fmt: skip
SEARCH = Service(
    "search service", "search", "TERAN_SEARCH_ADDRESS", "localhost:50052", "teran.v1.SearchService",
    "python -m search_service --milvus-uri URI --encoder-address HOST:PORT",
)  # fmt: skip


class UsageError(Exception):
    """Bad input found after parsing (a missing file, a malformed CSV): exit 2."""


# --------------------------------------------------------------------------- parser


class Parser(argparse.ArgumentParser):
    """argparse's parser, but help that cannot be written fails like any other output: argparse ignores
    a failed write, so `teran --help | true` would exit 0; here the BrokenPipeError reaches `main`,
    which ends with the status of SIGPIPE as for a command's output (`teran stats | head -3`)."""

    def print_help(self, file=None) -> None:
        (file or sys.stdout).write(self.format_help())


class CommandParser(Parser):
    """A subcommand's parser. An argument it does not know is an error reported with this command's
    usage and the closest valid option; argparse's default hands it to the top-level parser, whose
    usage says nothing about the command's options."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return namespace, extras

    def _suggestion(self, extras: list[str]) -> str:
        options = [option for option in self._option_string_actions if option.startswith("--")]
        for extra in extras:
            if extra.startswith("-"):
                close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


def _common(service: Service) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        service.flag,
        default=os.environ.get(service.env, service.default),
        help=f"{service.name} address (env {service.env}, default %(default)s)",
    )
    common.set_defaults(service=service)
    common.add_argument("--token", default=os.environ.get("TERAN_TOKEN") or None, help="bearer token (env TERAN_TOKEN)")
    common.add_argument(
        "--tls", action="store_true", default=os.environ.get("TERAN_TLS", "") in ("1", "true"), help="connect over TLS (env TERAN_TLS=1)"
    )
    common.add_argument(
        "--root-cert",
        type=Path,
        default=os.environ.get("TERAN_ROOT_CERT") or None,
        help="PEM CA bundle of the service (implies --tls; env TERAN_ROOT_CERT)",
    )
    common.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds (default %(default)s)")
    common.add_argument("--json", action="store_true", help="print one JSON document instead of human-readable text")
    return common


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}: {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _metadata(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="teran",
        description="Command-line client of the TERAN encoder and search services (gRPC).",
        epilog=(
            "Exit codes: 0 ok, 1 RPC error (`error: <STATUS_CODE>: <details>` on stderr, with a `hint:` line when the "
            "address looks wrong), 2 usage or bad input, 141 the output pipe closed early (like SIGPIPE)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    search_common = _common(SEARCH)

    p = sub.add_parser(
        "search", parents=[search_common], help="search images by caption or captions by image", description="Cross-modal search."
    )
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--caption", help="a caption: finds images")
    query.add_argument("--image", type=Path, metavar="FILE", help="an image file (JPEG, PNG, WebP): finds captions")
    p.add_argument("--top-k", type=_positive, default=10, help="number of hits (default %(default)s)")
    p.add_argument("--filter", default="", metavar="EXPR", help='Milvus expression over metadata / id, e.g. metadata["split"] == "test"')
    p.add_argument(
        "--rerank-multiplier", type=_non_negative, default=0, metavar="N", help="first stage: N x top-k candidates (0: server default)"
    )
    p.add_argument("--no-rerank", action="store_true", help="first stage only (scores = global cosine)")
    p.add_argument("--explain", action="store_true", help="show the word -> region alignment of every hit")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "index",
        parents=[search_common],
        help="index images or captions (streamed)",
        description="Stream images or captions to the search service (upserts; ids default to file names / name#k).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", type=Path, metavar="FILE_OR_DIR", help="image files or directories (jpg, jpeg, png, webp)")
    source.add_argument("--captions", type=Path, metavar="CSV", help="CSV of image,caption (Flickr8k; ids name#k) or id,caption")
    p.add_argument("--metadata", type=_metadata, default={}, metavar="JSON", help="a JSON object stored with every item")
    p.add_argument("--batch", type=_positive, default=16, metavar="N", help="items per streamed message (default %(default)s)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "encode",
        parents=[_common(ENCODER)],
        help="encode captions or images with the encoder service",
        description="Encode captions or images; --json prints the vectors.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--caption", nargs="+", metavar="TEXT", help="one or more captions")
    what.add_argument("--image", nargs="+", type=Path, metavar="FILE", help="one or more image files")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="output dtype (default %(default)s)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("stats", parents=[search_common], help="item counts, model, backend, limits", description="Search service stats.")
    p.set_defaults(func=cmd_stats)

    for name, func, text in (("get", cmd_get, "fetch stored items by id"), ("delete", cmd_delete, "delete items by id")):
        p = sub.add_parser(name, parents=[search_common], help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--modality", choices=("image", "caption"), required=True, help="which collection")
        p.add_argument("--ids", nargs="+", required=True, metavar="ID", help="item ids")
        p.set_defaults(func=func)
    return parser


# --------------------------------------------------------------------------- helpers


def _search_client(args):
    from teran_api.search_client import SearchClient

    return SearchClient(args.search, token=args.token, timeout=args.timeout, tls=args.tls, root_cert=args.root_cert)


def _encoder_client(args):
    from teran_api.encoder_client import EncoderClient

    return EncoderClient(args.encoder, token=args.token, timeout=args.timeout, tls=args.tls, root_cert=args.root_cert)


def _read(path: Path, size: int = -1) -> bytes:
    """The file's bytes (its first `size` bytes when size >= 0)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _is_image(head: bytes) -> bool:
    """JPEG, PNG or WebP, by the magic bytes the file starts with (the formats the encoder accepts)."""
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _check_image(path: Path, head: bytes) -> None:
    # Checked here, before anything is sent: the service can only say that some request field is not an image.
    if not _is_image(head):
        raise UsageError(f"{path}: not a JPEG, PNG or WebP image")


def _read_image(path: Path) -> bytes:
    data = _read(path)
    _check_image(path, data)
    return data


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _print_hint(text: str) -> None:
    print(f"hint: {text}", file=sys.stderr)


def _model(ref) -> dict:
    if ref is None:  # the service has no collections yet
        return {"name": "", "version": 0, "dimension": 0}
    return {"name": ref.name, "version": int(ref.version), "dimension": int(ref.dimension)}


def _emit(document) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


def _floats(values, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


# --------------------------------------------------------------------------- search


def cmd_search(args) -> int:
    fields = dict(
        top_k=args.top_k,
        filter=args.filter,
        rerank_multiplier=args.rerank_multiplier,
        disable_rerank=args.no_rerank,
        skip_explanation=not args.explain,
    )
    from teran_api.search_messages import modality_name
    from teran_api.types import SearchQuery

    query = SearchQuery(_read_image(args.image) if args.image is not None else args.caption, **fields)
    with _search_client(args) as client:
        response = client.search(query)
        hint = None if response.hits else _empty_store_hint(client, response.target)
    if hint:
        _print_hint(hint)
    hits = []
    for rank, hit in enumerate(response.hits, 1):
        entry = {
            "rank": rank,
            "id": hit.id,
            "score": float(hit.score),
            "first_stage_score": float(hit.first_stage_score),
            "first_stage_rank": int(hit.first_stage_rank),
            "metadata": hit.metadata,
        }
        if args.explain:
            entry["alignment"] = [
                {
                    "word": a.word,
                    "word_index": a.word_index,
                    "piece_indices": list(a.piece_indices),
                    "region_index": a.region_index,
                    "box": [float(b) for b in a.box],
                    "similarity": float(a.similarity),
                }
                for a in hit.alignment
            ]
        hits.append(entry)
    document = {
        "target": modality_name(response.target),
        "candidates": int(response.candidates),
        "reranked": bool(response.reranked),
        "ranking": response.ranking,
        "query_word_pieces": list(response.query_word_pieces),
        "model": _model(response.model),
        "hits": hits,
    }
    if args.json:
        _emit(document)
        return 0
    query = f"caption {args.caption!r}" if args.image is None else f"image {args.image}"
    rerank = f"re-ranked by {document['ranking']}" if document["reranked"] else "first stage only"
    found = _plural(len(hits), f"{document['target'].lower()} hit")
    print(f"{query} -> {found} ({_plural(document['candidates'], 'candidate')}, {rerank})")
    if document["query_word_pieces"]:
        print("query word pieces: " + " ".join(document["query_word_pieces"]))
    for hit in hits:
        label, metadata = hit["id"], hit["metadata"]
        if document["target"] == "CAPTION":
            label, metadata = _caption_label(hit["id"], metadata)
        shown = json.dumps(metadata, ensure_ascii=False) if metadata else ""
        print(
            f"{hit['rank']:>3}. {label}  score {hit['score']:.4f}  "
            f"first-stage {hit['first_stage_score']:.4f} (#{hit['first_stage_rank'] + 1})  {shown}".rstrip()
        )
        for a in hit.get("alignment", []):
            box = _floats(a["box"], 2) if a["box"] else "[no box]"
            print(f"       {a['word']:<14} -> region {a['region_index']:<3} {box}  sim {a['similarity']:.4f}")
    return 0


def _caption_label(item_id: str, metadata: dict) -> tuple[str, dict]:
    """A caption hit as `id  "text"` when its metadata holds its text ("text", else "caption"), and the
    metadata left to show."""
    for key in CAPTION_TEXT_KEYS:
        if isinstance(metadata.get(key), str):
            rest = {k: v for k, v in metadata.items() if k != key}
            return f"{item_id}  {json.dumps(metadata[key], ensure_ascii=False)}", rest
    return item_id, metadata


def _empty_store_hint(client, target) -> str | None:
    """Why a search found nothing, when the reason is that nothing of its target modality is indexed."""
    from teran_api.search_client import SearchError
    from teran_api.types import Modality

    try:
        stats = client.stats()
    except SearchError:  # only a hint: the search itself succeeded
        return None
    if (stats.images if target == Modality.IMAGE else stats.captions) > 0:
        return None
    noun, source = ("images", "--images FILE_OR_DIR") if target == Modality.IMAGE else ("captions", "--captions FILE")
    return f"no {noun} are indexed in this search service; index some with `teran index {source}`"


# --------------------------------------------------------------------------- index


def _image_files(paths: Sequence[Path]) -> list[Path]:
    """The image files of `paths` (directories: their jpg, jpeg, png, webp files), each checked to
    start like an image, so that a stray file fails the run before anything is sent."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such file or directory: {path}")
    if not files:
        raise UsageError("no image files found (jpg, jpeg, png, webp)")
    for file in files:
        _check_image(file, _read(file, 12))
    return files


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(id, caption) pairs of a CSV `image,caption` (Flickr8k: ids image#k) or `id,caption` (ids as given).

    A header row `image,caption` / `id,caption` is recognised; without one, ids are taken as given when
    the first column is unique, else numbered name#k."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    except csv.Error as exc:
        raise UsageError(f"{path}: bad CSV: {exc}") from None
    numbered = None
    if rows and len(rows[0]) >= 2 and rows[0][1].strip().lower() == "caption" and rows[0][0].strip().lower() in ("image", "id"):
        numbered = rows[0][0].strip().lower() == "image"
        rows = rows[1:]
    pairs = []
    for line, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip():
            raise UsageError(f"{path}: row {line}: expected two columns (image or id, caption)")
        # Captions may contain commas: everything after the first column is the caption.
        pairs.append((row[0].strip(), ",".join(row[1:]).strip()))
    if not pairs:
        raise UsageError(f"{path}: no captions")
    if numbered is None:
        numbered = len({key for key, _ in pairs}) != len(pairs)
    if numbered:
        counts: dict[str, int] = {}
        renamed = []
        for key, caption in pairs:
            k = counts.get(key, 0)
            counts[key] = k + 1
            renamed.append((f"{key}#{k}", caption))
        pairs = renamed
    return pairs


def caption_metadata(metadata: dict, caption: str) -> dict:
    """A caption item's metadata: the user's, plus the caption's text under "text" (unless the user's
    has that key), so that a search for captions can show the text and not only the id."""
    return {CAPTION_TEXT_KEYS[0]: caption, **metadata}


def cmd_index(args) -> int:
    from teran_api.types import IndexItem

    if args.images is not None:
        metadata_json = json.dumps(args.metadata)
        files = _image_files(args.images)
        names = [f.name for f in files]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UsageError(f"duplicate file names (ids): {', '.join(duplicates[:5])}")
        total = len(files)

        def items() -> Iterator[IndexItem]:
            for f in files:
                yield IndexItem(f.name, _read(f), metadata_json)
    else:
        pairs = read_captions(args.captions)
        total = len(pairs)

        def items() -> Iterator[IndexItem]:
            for item_id, caption in pairs:
                yield IndexItem(item_id, caption, json.dumps(caption_metadata(args.metadata, caption)))

    sent = 0
    interactive = sys.stderr.isatty()
    failure: list[BaseException] = []

    def safe_items() -> Iterator[IndexItem]:
        try:
            yield from items()
        except UsageError as exc:  # grpc would swallow it into a CANCELLED / UNKNOWN call
            failure.append(exc)
            raise

    def batches():
        nonlocal sent
        batch = []
        for item in safe_items():
            batch.append(item)
            if len(batch) == args.batch:
                sent += len(batch)
                yield batch
                _progress(sent, total, interactive)
                batch = []
        if batch:
            sent += len(batch)
            yield batch
            _progress(sent, total, interactive)

    start = time.monotonic()
    with _search_client(args) as client:
        try:
            response = client.stream_index(batches(), timeout=args.timeout)
        except Exception:
            if failure:
                raise failure[0] from None
            raise
        finally:
            if interactive and sent:
                print(file=sys.stderr)
    seconds = time.monotonic() - start
    document = {
        "indexed": int(response.indexed),
        "images": int(response.images),
        "captions": int(response.captions),
        "seconds": round(seconds, 3),
        "model": _model(response.model),
    }
    if args.json:
        _emit(document)
    else:
        rate = document["indexed"] / seconds if seconds > 0 else 0.0
        counts = f"{_plural(document['images'], 'image')}, {_plural(document['captions'], 'caption')}"
        print(f"indexed {_plural(document['indexed'], 'item')} ({counts}) in {seconds:.2f} s ({rate:.1f}/s)")
    return 0


def _progress(sent: int, total: int, interactive: bool) -> None:
    line = f"sent {sent}/{_plural(total, 'item')} ({100 * sent / max(total, 1):.0f}%)"
    print(("\r" + line) if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- encode


def _vector(values: np.ndarray) -> list:
    return np.asarray(values, dtype=np.float64).tolist()


def cmd_encode(args) -> int:
    with _encoder_client(args) as client:
        if args.caption is not None:
            results = client.encode_captions(args.caption, dtype=args.dtype)
            labels = args.caption
        else:
            results = client.encode_images([_read_image(p) for p in args.image], dtype=args.dtype)
            labels = [str(p) for p in args.image]
    items = []
    for label, r in zip(labels, results, strict=True):
        g = np.asarray(r.global_vector, dtype=np.float32)
        entry = {
            "caption" if args.caption is not None else "image": label,
            "dimension": int(g.shape[-1]),
            "norm": float(np.linalg.norm(g)),
            "num_concepts": 0 if r.concepts is None else int(r.concepts.shape[0]),
        }
        if args.caption is not None:
            entry["word_pieces"] = list(r.word_pieces)
        else:
            entry["width"], entry["height"] = int(r.width), int(r.height)
            entry["boxes"] = [] if r.boxes is None else _vector(r.boxes)
        if args.json:
            entry["global_vector"] = _vector(g)
            entry["concepts"] = [] if r.concepts is None else _vector(r.concepts)
        items.append(entry)
    model = _model(results[0].model) if results else {}
    if args.json:
        _emit({"model": model, "dtype": args.dtype, "items": items})
        return 0
    if model:
        print(f"model {model['name']} v{model['version']} (dimension {model['dimension']}, {args.dtype})")
    for entry in items:
        if args.caption is not None:
            concepts = _plural(entry["num_concepts"], "concept")
            print(f"caption {entry['caption']!r}: dim {entry['dimension']}, norm {entry['norm']:.4f}, {concepts}")
            print("  word pieces: " + " ".join(entry["word_pieces"]))
        else:
            size = f"{entry['width']}x{entry['height']}"
            concepts = _plural(entry["num_concepts"], "concept")
            print(f"image {entry['image']} ({size}): dim {entry['dimension']}, norm {entry['norm']:.4f}, {concepts}")
            for i, box in enumerate(entry["boxes"]):
                print(f"  region {i:<3} {_floats(box, 3)}")
    return 0


# --------------------------------------------------------------------------- stats, get, delete


def cmd_stats(args) -> int:
    from teran_api.search_messages import first_stage_name

    with _search_client(args) as client:
        s = client.stats()
    document = {
        "images": int(s.images),
        "captions": int(s.captions),
        "model": _model(s.model),
        "backend": s.backend,
        "server_version": s.server_version,
        "uri": s.uri,
        "index_type": s.index_type,
        "concept_encoding": s.concept_encoding,
        "sparse_vectors_supported": bool(s.sparse_vectors_supported),
        "encoder_configured": bool(s.encoder_configured),
        "first_stages": [first_stage_name(f) for f in s.first_stages],
        "limits": dict(sorted((k, int(v)) for k, v in s.limits.items())),
    }
    if args.json:
        _emit(document)
        return 0
    for key, value in document.items():
        if key == "limits":
            print("limits:")
            for name, limit in value.items():
                print(f"  {name}: {limit}")
        else:
            print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


def _modality(args):
    from teran_api.types import Modality

    return Modality(args.modality)


def cmd_get(args) -> int:
    with _search_client(args) as client:
        response = client.get(_modality(args), list(args.ids))
    items = [
        {
            "id": item.id,
            "found": bool(item.found),
            "metadata": item.metadata,
            "num_concepts": int(item.num_concepts),
            **({"word_pieces": list(item.word_pieces)} if item.word_pieces else {}),
        }
        for item in response
    ]
    if args.json:
        _emit({"items": items})
        return 0
    for item in items:
        if not item["found"]:
            print(f"{item['id']}: not found")
            continue
        pieces = f", word pieces: {' '.join(item['word_pieces'])}" if item.get("word_pieces") else ""
        metadata = json.dumps(item["metadata"], ensure_ascii=False)
        print(f"{item['id']}: {_plural(item['num_concepts'], 'concept')}, metadata {metadata}{pieces}")
    return 0


def cmd_delete(args) -> int:
    with _search_client(args) as client:
        response = client.delete(_modality(args), list(args.ids))
    document = {"deleted": int(response.deleted), "not_found": list(response.not_found)}
    if args.json:
        _emit(document)
    else:
        missing = f" (not found: {', '.join(document['not_found'])})" if document["not_found"] else ""
        print(f"deleted {_plural(document['deleted'], 'item')}{missing}")
    return 0


# --------------------------------------------------------------------------- main


# How a gRPC channel says that it never reached the server (connection refused, unknown host), in the
# wordings of gRPC versions and load-balancing policies; a server's own UNAVAILABLE starts otherwise.
_CONNECT_FAILURES = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "errors resolving",
    "DNS resolution failed",
)


def rpc_hint(args, code, details: str) -> str | None:
    """What to do about an RPC error that means the address is wrong or the service is not running."""
    import grpc

    service: Service = args.service
    address = getattr(args, service.dest)
    where = f"pass {service.flag} HOST:PORT or set {service.env}"
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_CONNECT_FAILURES):
        return f"cannot reach the {service.name} at {address} (is it running? start it with `{service.start}`; or {where})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        other = ENCODER if service is SEARCH else SEARCH
        return f"the service at {address} is not a {service.grpc_service} (the {other.name}'s address, maybe?); {where}"
    return None


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    from teran_api.encoder_client import EncoderError
    from teran_api.search_client import SearchError

    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (EncoderError, SearchError) as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        hint = rpc_hint(args, exc.code, exc.details)
        if hint:
            _print_hint(hint)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stdout_to_devnull() -> None:
    # Python's recipe (signal module docs, "Note on SIGPIPE"): later writes, and the interpreter's
    # final flush, go to /dev/null instead of raising BrokenPipeError again.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (an embedding program's stream)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code. A reader that stops early (`teran stats | head -3`) ends the
    command quietly, with the status of a command ended by SIGPIPE, like other Unix tools."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, and not as a traceback at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
