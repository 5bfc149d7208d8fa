"""The API's values as plain dataclasses (numpy arrays, no protobuf): what the typed clients return
and what the search service's `Searcher` takes and returns. `teran_api.search_messages` converts
them to and from the wire messages of proto/teran/v1/search.proto."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Modality(StrEnum):
    IMAGE = "image"
    CAPTION = "caption"


class FirstStage(StrEnum):
    """How candidates are found before the re-rank (values: the collections' field prefixes)."""

    DENSE = "dense"  # ANN on the global vector (cosine)
    SCALAR_QUANTIZATION = "sq"
    DEEP_PERMUTATION = "dp"
    BAG_OF_CONCEPTS = "boc"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int
    dimension: int  # of every global and concept vector

    def describe(self) -> str:
        return f"{self.name} v{self.version} (dimension {self.dimension})"


@dataclass
class RegionFeatures:
    """Precomputed regions of one image: features [R, C]; boxes [R, 4] in pixels when width/height are given, else 0..1."""

    features: np.ndarray
    boxes: np.ndarray
    width: int = 0
    height: int = 0


@dataclass
class Vectors:
    """An encoded image or caption, stored or searched as given. `modality` None: not set (refused)."""

    modality: Modality | None
    global_vector: np.ndarray  # [D], unit norm
    concepts: np.ndarray  # [N, D], unit rows: regions (IMAGE) or word pieces (CAPTION)
    boxes: np.ndarray | None = None  # IMAGE: [N, 4] normalised x1, y1, x2, y2
    word_pieces: list[str] = field(default_factory=list)  # CAPTION: N labels ("#i" when absent)
    model: ModelRef | None = None  # checked against the collections' model when set


# What an item or a query holds: a caption (str), an image file (bytes), region features, or
# vectors; None when nothing was set.
Content = str | bytes | RegionFeatures | Vectors | None


@dataclass
class IndexItem:
    id: str
    content: Content
    metadata_json: str = ""  # a JSON object ("" = {})


@dataclass
class SearchQuery:
    query: Content
    top_k: int = 0  # 0: 10
    filter: str = ""  # a Milvus boolean expression over `metadata` and `id`
    rerank_multiplier: int = 0  # 0: the service default
    disable_rerank: bool = False
    skip_explanation: bool = False
    request_id: str = ""
    first_stage: FirstStage = FirstStage.DENSE


@dataclass
class WordAlignment:
    """One caption word and the image region it matched best."""

    word_index: int  # position of the word's first word piece among the caption's concepts
    word_piece: str  # that first word piece
    word: str  # the whole word
    piece_indices: list[int]
    region_index: int
    box: list[float]  # x1, y1, x2, y2 normalised ([] when the image has no boxes)
    similarity: float


@dataclass
class SearchHit:
    id: str
    score: float  # the re-rank score when re-ranked, else the first-stage score
    first_stage_score: float
    first_stage_rank: int  # 0-based
    metadata: dict
    alignment: list[WordAlignment] = field(default_factory=list)


@dataclass
class SearchResult:
    hits: list[SearchHit]  # best first
    target: Modality
    candidates: int  # first-stage candidates scored
    reranked: bool
    ranking: str
    model: ModelRef | None
    query_word_pieces: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass
class IndexResult:
    indexed: int
    images: int
    captions: int
    model: ModelRef | None
    request_id: str = ""


@dataclass
class StoredItem:
    id: str
    found: bool
    metadata: dict | None = None  # None when not found
    num_concepts: int = 0
    word_pieces: list[str] = field(default_factory=list)
    boxes: np.ndarray | None = None  # images: [N, 4]
    global_vector: np.ndarray | None = None  # with include_vectors
    concepts: np.ndarray | None = None  # with include_vectors: [N, D] as stored (float16)
    model: ModelRef | None = None


@dataclass
class DeleteResult:
    deleted: int
    not_found: list[str]


@dataclass
class Stats:
    images: int
    captions: int
    model: ModelRef | None
    backend: str
    server_version: str
    uri: str
    index_type: str
    concept_encoding: str
    sparse_vectors_supported: bool
    encoder_configured: bool
    limits: dict[str, int]
    first_stages: list[FirstStage]
