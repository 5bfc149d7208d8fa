from . import common_pb2 as _common_pb2
from . import encoder_pb2 as _encoder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    IMAGE: _ClassVar[Modality]
    CAPTION: _ClassVar[Modality]

class FirstStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENSE: _ClassVar[FirstStage]
    SCALAR_QUANTIZATION: _ClassVar[FirstStage]
    DEEP_PERMUTATION: _ClassVar[FirstStage]
    BAG_OF_CONCEPTS: _ClassVar[FirstStage]
MODALITY_UNSPECIFIED: Modality
IMAGE: Modality
CAPTION: Modality
DENSE: FirstStage
SCALAR_QUANTIZATION: FirstStage
DEEP_PERMUTATION: FirstStage
BAG_OF_CONCEPTS: FirstStage

class Vectors(_message.Message):
    __slots__ = ("modality", "global_vector", "concepts", "boxes", "word_pieces", "model")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VECTOR_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    WORD_PIECES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    global_vector: _common_pb2.Tensor
    concepts: _common_pb2.Tensor
    boxes: _common_pb2.Tensor
    word_pieces: _containers.RepeatedScalarFieldContainer[str]
    model: _common_pb2.ModelRef
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., global_vector: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., concepts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., boxes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., word_pieces: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class IndexItem(_message.Message):
    __slots__ = ("id", "metadata_json", "caption", "image", "regions", "vectors")
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata_json: str
    caption: str
    image: bytes
    regions: _encoder_pb2.RegionFeatures
    vectors: Vectors
    def __init__(self, id: _Optional[str] = ..., metadata_json: _Optional[str] = ..., caption: _Optional[str] = ..., image: _Optional[bytes] = ..., regions: _Optional[_Union[_encoder_pb2.RegionFeatures, _Mapping]] = ..., vectors: _Optional[_Union[Vectors, _Mapping]] = ...) -> None: ...

class IndexRequest(_message.Message):
    __slots__ = ("items", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[IndexItem]
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[IndexItem, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class IndexResponse(_message.Message):
    __slots__ = ("indexed", "images", "captions", "model", "request_id")
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    indexed: int
    images: int
    captions: int
    model: _common_pb2.ModelRef
    request_id: str
    def __init__(self, indexed: _Optional[int] = ..., images: _Optional[int] = ..., captions: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("modality", "ids")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("modality", "ids", "include_vectors")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("id", "found", "metadata_json", "num_concepts", "word_pieces", "boxes", "global_vector", "concepts", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    WORD_PIECES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VECTOR_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    found: bool
    metadata_json: str
    num_concepts: int
    word_pieces: _containers.RepeatedScalarFieldContainer[str]
    boxes: _common_pb2.Tensor
    global_vector: _common_pb2.Tensor
    concepts: _common_pb2.Tensor
    model: _common_pb2.ModelRef
    def __init__(self, id: _Optional[str] = ..., found: _Optional[bool] = ..., metadata_json: _Optional[str] = ..., num_concepts: _Optional[int] = ..., word_pieces: _Optional[_Iterable[str]] = ..., boxes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., global_vector: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., concepts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("images", "captions", "model", "backend", "server_version", "uri", "index_type", "concept_encoding", "sparse_vectors_supported", "encoder_configured", "limits", "first_stages")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    SPARSE_VECTORS_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGES_FIELD_NUMBER: _ClassVar[int]
    images: int
    captions: int
    model: _common_pb2.ModelRef
    backend: str
    server_version: str
    uri: str
    index_type: str
    concept_encoding: str
    sparse_vectors_supported: bool
    encoder_configured: bool
    limits: _containers.ScalarMap[str, int]
    first_stages: _containers.RepeatedScalarFieldContainer[FirstStage]
    def __init__(self, images: _Optional[int] = ..., captions: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., backend: _Optional[str] = ..., server_version: _Optional[str] = ..., uri: _Optional[str] = ..., index_type: _Optional[str] = ..., concept_encoding: _Optional[str] = ..., sparse_vectors_supported: _Optional[bool] = ..., encoder_configured: _Optional[bool] = ..., limits: _Optional[_Mapping[str, int]] = ..., first_stages: _Optional[_Iterable[_Union[FirstStage, str]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("caption", "image", "regions", "vectors", "top_k", "filter", "rerank_multiplier", "disable_rerank", "skip_explanation", "request_id", "first_stage")
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RERANK_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DISABLE_RERANK_FIELD_NUMBER: _ClassVar[int]
    SKIP_EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_FIELD_NUMBER: _ClassVar[int]
    caption: str
    image: bytes
    regions: _encoder_pb2.RegionFeatures
    vectors: Vectors
    top_k: int
    filter: str
    rerank_multiplier: int
    disable_rerank: bool
    skip_explanation: bool
    request_id: str
    first_stage: FirstStage
    def __init__(self, caption: _Optional[str] = ..., image: _Optional[bytes] = ..., regions: _Optional[_Union[_encoder_pb2.RegionFeatures, _Mapping]] = ..., vectors: _Optional[_Union[Vectors, _Mapping]] = ..., top_k: _Optional[int] = ..., filter: _Optional[str] = ..., rerank_multiplier: _Optional[int] = ..., disable_rerank: _Optional[bool] = ..., skip_explanation: _Optional[bool] = ..., request_id: _Optional[str] = ..., first_stage: _Optional[_Union[FirstStage, str]] = ...) -> None: ...

class WordAlignment(_message.Message):
    __slots__ = ("word_index", "word_piece", "region_index", "box", "similarity", "word", "piece_indices")
    WORD_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORD_PIECE_FIELD_NUMBER: _ClassVar[int]
    REGION_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    PIECE_INDICES_FIELD_NUMBER: _ClassVar[int]
    word_index: int
    word_piece: str
    region_index: int
    box: _containers.RepeatedScalarFieldContainer[float]
    similarity: float
    word: str
    piece_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, word_index: _Optional[int] = ..., word_piece: _Optional[str] = ..., region_index: _Optional[int] = ..., box: _Optional[_Iterable[float]] = ..., similarity: _Optional[float] = ..., word: _Optional[str] = ..., piece_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "first_stage_score", "first_stage_rank", "metadata_json", "alignment")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_RANK_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    first_stage_score: float
    first_stage_rank: int
    metadata_json: str
    alignment: _containers.RepeatedCompositeFieldContainer[WordAlignment]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., first_stage_score: _Optional[float] = ..., first_stage_rank: _Optional[int] = ..., metadata_json: _Optional[str] = ..., alignment: _Optional[_Iterable[_Union[WordAlignment, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "target", "candidates", "reranked", "query_word_pieces", "model", "request_id", "ranking")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    QUERY_WORD_PIECES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    target: Modality
    candidates: int
    reranked: bool
    query_word_pieces: _containers.RepeatedScalarFieldContainer[str]
    model: _common_pb2.ModelRef
    request_id: str
    ranking: str
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., target: _Optional[_Union[Modality, str]] = ..., candidates: _Optional[int] = ..., reranked: _Optional[bool] = ..., query_word_pieces: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ..., ranking: _Optional[str] = ...) -> None: ...
