"""The JSON API's core, without HTTP: requests as dicts and bytes in, JSON-ready dicts out, calling the
search service through the typed `SearchClient`. Refusals raise `ApiError` with the HTTP status, the
gRPC status name and a message saying what was wrong and what is allowed; the search service's own
refusals (a bad filter, a top_k above its limit, an unreadable photo) pass through with its message."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from teran_api.search_client import SearchClient, SearchError
from teran_api.types import Modality, SearchHit, SearchQuery, SearchResult

# gRPC status -> HTTP status (the mapping of grpc-gateway and Google APIs).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
QUERY_FIELDS = {"text", "top_k", "filter", "rerank_multiplier", "rerank", "explain"}
PHOTO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # a plain file name, no path
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class ApiError(Exception):
    def __init__(self, http_status: int, code: str, message: str):
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def from_search_error(error: SearchError, address: str) -> ApiError:
    """The search service's refusal as an API error; a search service that cannot be reached says so."""
    message = error.details
    if error.code == grpc.StatusCode.UNAVAILABLE:
        message = f"the search service at {address} is unavailable ({error.details}); is it running?"
    elif error.code == grpc.StatusCode.UNAUTHENTICATED:
        # the gateway's own token for the search service was refused: a server-side problem, not the caller's
        return ApiError(502, "UNAUTHENTICATED", f"the search service refused this gateway's token (--search-token): {error.details}")
    return ApiError(HTTP_STATUS.get(error.code, 500), error.code.name, message)


@dataclass
class QueryOptions:
    top_k: int
    filter: str = ""
    rerank_multiplier: int = 0
    rerank: bool = True
    explain: bool = True


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value).strip())
        except ValueError:
            raise invalid(f"{name} must be an integer, got {value!r}") from None
    return value


def _boolean(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise invalid(f"{name} must be true or false, got {value!r}")


def query_options(fields: dict, default_top_k: int) -> QueryOptions:
    """top_k, filter, rerank_multiplier, rerank and explain from a JSON body or URL parameters. Ranges are
    the search service's to check (its limits are configurable there); types are checked here."""
    top_k = _integer(fields.get("top_k", default_top_k), "top_k")
    if top_k < 1:
        raise invalid(f"top_k must be >= 1, got {top_k}")
    multiplier = _integer(fields.get("rerank_multiplier", 0), "rerank_multiplier")
    if multiplier < 0:
        raise invalid(f"rerank_multiplier must be >= 0 (0: the service default), got {multiplier}")
    filter_text = fields.get("filter", "")
    if not isinstance(filter_text, str):
        raise invalid("filter must be a string (a Milvus boolean expression over metadata and id)")
    return QueryOptions(
        top_k, filter_text, multiplier, _boolean(fields.get("rerank", True), "rerank"), _boolean(fields.get("explain", True), "explain")
    )


class Gateway:
    """Caption and photo queries, stats and photo files, over one SearchClient."""

    def __init__(self, client: SearchClient, address: str, images_dir: Path | None = None, default_top_k: int = 12):
        self.client = client
        self.address = address
        self.images_dir = Path(images_dir).resolve() if images_dir else None
        self.default_top_k = default_top_k

    def search_caption(self, body) -> dict:
        """Photos for {"text": ..., "top_k", "filter", "rerank_multiplier", "rerank", "explain"}."""
        if not isinstance(body, dict):
            raise invalid('the body must be a JSON object such as {"text": "a dog runs on the beach", "top_k": 10}')
        unknown = sorted(set(body) - QUERY_FIELDS)
        if unknown:
            raise invalid(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(QUERY_FIELDS))}")
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise invalid('"text" is required: the caption to search photos for (a non-empty string)')
        return self._search(text, query_options(body, self.default_top_k))

    def search_photo(self, photo: bytes, params: dict) -> dict:
        """Captions for a photo file (JPEG, PNG or WebP bytes); options from the URL parameters."""
        unknown = sorted(set(params) - (QUERY_FIELDS - {"text"}))
        if unknown:
            raise invalid(f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(QUERY_FIELDS - {'text'}))}")
        if not photo:
            raise invalid("the request body is empty: send the photo's bytes (JPEG, PNG or WebP)")
        return self._search(photo, query_options(params, self.default_top_k))

    def _search(self, content: str | bytes, options: QueryOptions) -> dict:
        query = SearchQuery(
            content,
            top_k=options.top_k,
            filter=options.filter,
            rerank_multiplier=options.rerank_multiplier,
            disable_rerank=not options.rerank,
            skip_explanation=not options.explain,
        )
        started = time.perf_counter()
        try:
            result = self.client.search(query)
        except SearchError as error:
            raise from_search_error(error, self.address) from None
        return self.result_json(result, (time.perf_counter() - started) * 1000)

    def stats(self) -> dict:
        try:
            stats = self.client.stats()
        except SearchError as error:
            raise from_search_error(error, self.address) from None
        return {
            "images": stats.images,
            "captions": stats.captions,
            "model": stats.model.describe() if stats.model else None,
            "backend": stats.backend,
            "limits": stats.limits,
            "photos_served": self.images_dir is not None,
        }

    def result_json(self, result: SearchResult, took_ms: float) -> dict:
        return {
            "target": result.target.value,
            "candidates": result.candidates,
            "reranked": result.reranked,
            "ranking": result.ranking,
            "model": result.model.describe() if result.model else None,
            "query_word_pieces": result.query_word_pieces,
            "took_ms": round(took_ms, 1),
            "hits": [self.hit_json(hit, result.target) for hit in result.hits],
        }

    def hit_json(self, hit: SearchHit, target: Modality) -> dict:
        metadata = hit.metadata or {}
        photo_id = hit.id if target == Modality.IMAGE else metadata.get("image")
        text = metadata.get("text") if target == Modality.CAPTION else metadata.get("caption")
        return {
            "id": hit.id,
            "score": round(hit.score, 5),
            "first_stage_score": round(hit.first_stage_score, 5),
            "first_stage_rank": hit.first_stage_rank,
            "metadata": metadata,
            "text": text if isinstance(text, str) else None,
            "photo_url": f"/photos/{photo_id}" if isinstance(photo_id, str) and self.photo_path(photo_id) else None,
            # image hits: boxes on the hit's photo; caption hits: boxes on the query photo
            "words": [
                {
                    "word": a.word,
                    "word_index": a.word_index,
                    "region": a.region_index,
                    "box": [round(v, 4) for v in a.box],
                    "similarity": round(a.similarity, 4),
                }
                for a in hit.alignment
            ],  # fmt: skip
        }

    def photo_path(self, photo_id: str) -> Path | None:
        """The file of a photo under --images-dir; None for an id that is not a plain photo file name there."""
        if self.images_dir is None or not PHOTO_ID.match(photo_id) or Path(photo_id).suffix.lower() not in PHOTO_TYPES:
            return None
        path = self.images_dir / photo_id
        return path if path.is_file() else None
