"""How arrays are stored as text in Milvus fields: their little-endian bytes in base64. Concept vectors
[N, D] go as fp16, or as compact codes (search_service.concept_codes: a caption's uint8 [N, bytes per
vector], an image's one uint8 string with its salient regions) in collections created with a concept codec,
split over a row's VARCHAR fields concepts_0..K-1 (K fixed by the codec and max_concepts); boxes [N, 4]
and the BoC codebook as float32.

Why VARCHAR/base64 fp16: milvus-lite 3.x has no BINARY_VECTOR or FLOAT16_VECTOR field, Milvus 2.3
no FLOAT16_VECTOR, and neither has array-of-vector fields (native MaxSim needs Milvus >= 2.6.4);
VARCHAR is portable everywhere, fp16 halves the bytes of fp32 (D=256, 49 regions: 25 KB raw,
33 KB stored), and the rounding (relative 2^-11 per component) leaves MrSw orderings intact.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

from search_service.concept_codes import ConceptCodec

CHUNK_CHARS = 65535  # Milvus VARCHAR max_length
CONCEPT_ENCODING = "fp16-le-base64-varchar"
CODED_CONCEPT_ENCODING = "transform-codes-base64-varchar"


def pack(array: np.ndarray, dtype: str) -> str:
    """`array` as `dtype` (little-endian, e.g. "<f2"), its bytes in base64."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def unpack(text: str, dtype: str) -> np.ndarray:
    """The values `pack` wrote, flat (a read-only view of the decoded bytes)."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def unpack_rows(text: str, dtype: str, columns: int) -> np.ndarray | None:
    """The rows of `columns` values `pack` wrote; None where `text` holds no whole number of them, or none."""
    raw = base64.b64decode(text)
    if not raw or len(raw) % (np.dtype(dtype).itemsize * columns):
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(-1, columns)


def concept_chunks(dimension: int, max_concepts: int, item_bytes: int | None = None) -> int:
    """The VARCHAR fields needed for `max_concepts` concept vectors of `dimension` in base64 (fp16, or `item_bytes`
    bytes in all)."""
    size = max_concepts * 2 * dimension if item_bytes is None else item_bytes
    return max(1, math.ceil(4 * math.ceil(size / 3) / CHUNK_CHARS))


def _split(text: str, chunks: int) -> list[str]:
    parts = [text[i * CHUNK_CHARS : (i + 1) * CHUNK_CHARS] for i in range(chunks)]
    if sum(map(len, parts)) != len(text):
        raise ValueError("concept vectors do not fit the collection's concept fields")
    return parts


def encode_concepts(concepts: np.ndarray, chunks: int) -> list[str]:
    return _split(pack(concepts, "<f2"), chunks)


def decode_concepts(parts: list[str], count: int, dim: int) -> np.ndarray:
    return unpack("".join(parts), "<f2").reshape(count, dim)


@dataclass(frozen=True)
class ConceptFormat:
    """How a collection's concept fields hold the vectors: fp16, or the codes of `codec` (caption word pieces coded one
    by one; an image's regions as one set, its salient regions kept: ConceptCodec.encode_images). Decoded vectors are
    fp16 either way (what the cache takes)."""

    codec: ConceptCodec | None = None

    @property
    def encoding(self) -> str:
        return CONCEPT_ENCODING if self.codec is None else CODED_CONCEPT_ENCODING

    def item_bytes(self, dimension: int, count: int, image: bool) -> int:
        """The stored bytes of an item's `count` concept vectors."""
        if self.codec is None:
            return 2 * dimension * count
        return self.codec.image_bytes(count) if image else self.codec.bytes_per_vector * count

    def chunks(self, dimension: int, max_concepts: int) -> int:
        """The VARCHAR fields of both collections (the larger of an image's and a caption's `max_concepts` vectors)."""
        size = max(self.item_bytes(dimension, max_concepts, image) for image in (True, False))
        return concept_chunks(dimension, max_concepts, size)

    def encode_many(self, sets: list[np.ndarray], chunks: int, image: bool) -> list[list[str]]:
        """Each item's concept fields; a codec encodes all the items' vectors in one call (its cost is per call)."""
        if self.codec is None:
            return [encode_concepts(concepts, chunks) for concepts in sets]
        if image:
            return [_split(pack(codes, "u1"), chunks) for codes in self.codec.encode_images(sets)]
        codes = self.codec.encode(np.concatenate([np.asarray(c, np.float32) for c in sets]))
        ends = np.cumsum([len(c) for c in sets])
        return [_split(pack(part, "u1"), chunks) for part in np.split(codes, ends[:-1])]

    def decode(self, parts: list[str], count: int, dim: int, image: bool) -> np.ndarray:
        if self.codec is None:
            return decode_concepts(parts, count, dim)
        codes = self.codes(parts, count, image)
        if image:
            return self.codec.image_vectors(self.codec.decode_images([codes], [count])[0, :count]).astype(np.float16)
        return self.codec.decode(codes).astype(np.float16)

    def codes(self, parts: list[str], count: int, image: bool) -> np.ndarray:
        """The stored codes (coded collections): an image's, uint8 [image_bytes(count)]; a caption's, uint8 [count, bytes
        per vector]."""
        assert self.codec is not None
        raw = unpack("".join(parts), "u1")
        return raw if image else raw.reshape(count, self.codec.bytes_per_vector)

    def describe(self, chunks: int) -> str:
        if self.codec is None:
            return f"fp16 base64 in {chunks} VARCHAR field(s)"
        return f"{self.codec.describe()} codes, base64 in {chunks} VARCHAR field(s)"


def encode_boxes(boxes: np.ndarray | None) -> str:
    return "" if boxes is None else pack(boxes, "<f4")


def decode_boxes(text: str, count: int) -> np.ndarray | None:
    return unpack(text, "<f4").reshape(count, 4) if text else None
