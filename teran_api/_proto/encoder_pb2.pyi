from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeCaptionsRequest(_message.Message):
    __slots__ = ("captions", "output_dtype", "global_only", "request_id")
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: _common_pb2.Tensor.DType
    global_only: bool
    request_id: str
    def __init__(self, captions: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[_common_pb2.Tensor.DType, str]] = ..., global_only: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class CaptionEmbedding(_message.Message):
    __slots__ = ("global_vector", "concepts", "word_pieces", "token_positions", "num_tokens")
    GLOBAL_VECTOR_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    WORD_PIECES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    global_vector: _common_pb2.Tensor
    concepts: _common_pb2.Tensor
    word_pieces: _containers.RepeatedScalarFieldContainer[str]
    token_positions: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    def __init__(self, global_vector: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., concepts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., word_pieces: _Optional[_Iterable[str]] = ..., token_positions: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class EncodeCaptionsResponse(_message.Message):
    __slots__ = ("captions", "model", "request_id")
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[CaptionEmbedding]
    model: _common_pb2.ModelRef
    request_id: str
    def __init__(self, captions: _Optional[_Iterable[_Union[CaptionEmbedding, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RegionFeatures(_message.Message):
    __slots__ = ("features", "boxes", "image_width", "image_height")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    features: _common_pb2.Tensor
    boxes: _common_pb2.Tensor
    image_width: int
    image_height: int
    def __init__(self, features: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., boxes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("encoded", "regions")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    regions: RegionFeatures
    def __init__(self, encoded: _Optional[bytes] = ..., regions: _Optional[_Union[RegionFeatures, _Mapping]] = ...) -> None: ...

class EncodeImagesRequest(_message.Message):
    __slots__ = ("images", "output_dtype", "global_only", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    output_dtype: _common_pb2.Tensor.DType
    global_only: bool
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., output_dtype: _Optional[_Union[_common_pb2.Tensor.DType, str]] = ..., global_only: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImageEmbedding(_message.Message):
    __slots__ = ("global_vector", "concepts", "boxes", "image_width", "image_height")
    GLOBAL_VECTOR_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    global_vector: _common_pb2.Tensor
    concepts: _common_pb2.Tensor
    boxes: _common_pb2.Tensor
    image_width: int
    image_height: int
    def __init__(self, global_vector: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., concepts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., boxes: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ...) -> None: ...

class EncodeImagesResponse(_message.Message):
    __slots__ = ("images", "model", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageEmbedding]
    model: _common_pb2.ModelRef
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageEmbedding, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "backend", "backend_detail", "precision", "alignment_mode", "concept_mode", "checkpoint_kind", "checkpoint_sha256", "region_dim", "accepts_encoded_images", "max_items", "max_tokens", "max_caption_chars", "max_regions", "max_image_bytes", "max_image_pixels", "max_image_side", "max_message_bytes", "max_batch", "image_size", "region_count", "blend_weight", "hub_penalty_weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_DETAIL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_MODE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_MODE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KIND_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    REGION_DIM_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGION_COUNT_FIELD_NUMBER: _ClassVar[int]
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HUB_PENALTY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    backend: str
    backend_detail: str
    precision: str
    alignment_mode: str
    concept_mode: str
    checkpoint_kind: str
    checkpoint_sha256: str
    region_dim: int
    accepts_encoded_images: bool
    max_items: int
    max_tokens: int
    max_caption_chars: int
    max_regions: int
    max_image_bytes: int
    max_image_pixels: int
    max_image_side: int
    max_message_bytes: int
    max_batch: int
    image_size: int
    region_count: int
    blend_weight: float
    hub_penalty_weight: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., backend: _Optional[str] = ..., backend_detail: _Optional[str] = ..., precision: _Optional[str] = ..., alignment_mode: _Optional[str] = ..., concept_mode: _Optional[str] = ..., checkpoint_kind: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., region_dim: _Optional[int] = ..., accepts_encoded_images: _Optional[bool] = ..., max_items: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_caption_chars: _Optional[int] = ..., max_regions: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., image_size: _Optional[int] = ..., region_count: _Optional[int] = ..., blend_weight: _Optional[float] = ..., hub_penalty_weight: _Optional[float] = ...) -> None: ...

class GetHubReferenceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HubReference(_message.Message):
    __slots__ = ("model", "k", "weight", "image_reference", "caption_reference")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    k: int
    weight: float
    image_reference: _common_pb2.Tensor
    caption_reference: _common_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., k: _Optional[int] = ..., weight: _Optional[float] = ..., image_reference: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., caption_reference: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
