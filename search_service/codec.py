"""How arrays are stored as text in Milvus fields: their little-endian bytes in base64. Concept vectors
[N, D] go as fp16, split over a row's VARCHAR fields concepts_0..K-1 (K fixed by D and max_concepts);
boxes [N, 4] and the BoC codebook as float32.

Why VARCHAR/base64 fp16: milvus-lite 3.x has no BINARY_VECTOR or FLOAT16_VECTOR field, Milvus 2.3
no FLOAT16_VECTOR, and neither has array-of-vector fields (native MaxSim needs Milvus >= 2.6.4);
VARCHAR is portable everywhere, fp16 halves the bytes of fp32 (D=256, 49 regions: 25 KB raw,
33 KB stored), and the rounding (relative 2^-11 per component) leaves MrSw orderings intact.
"""

from __future__ import annotations

import base64
import math

import numpy as np

CHUNK_CHARS = 65535  # Milvus VARCHAR max_length
CONCEPT_ENCODING = "fp16-le-base64-varchar"


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


def concept_chunks(dimension: int, max_concepts: int) -> int:
    """The VARCHAR fields needed for `max_concepts` concept vectors of `dimension` (fp16 in base64)."""
    return max(1, math.ceil(4 * math.ceil(max_concepts * dimension * 2 / 3) / CHUNK_CHARS))


def encode_concepts(concepts: np.ndarray, chunks: int) -> list[str]:
    text = pack(concepts, "<f2")
    parts = [text[i * CHUNK_CHARS : (i + 1) * CHUNK_CHARS] for i in range(chunks)]
    if sum(map(len, parts)) != len(text):
        raise ValueError("concept vectors do not fit the collection's concept fields")
    return parts


def decode_concepts(parts: list[str], count: int, dim: int) -> np.ndarray:
    return unpack("".join(parts), "<f2").reshape(count, dim)


def encode_boxes(boxes: np.ndarray | None) -> str:
    return "" if boxes is None else pack(boxes, "<f4")


def decode_boxes(text: str, count: int) -> np.ndarray | None:
    return unpack(text, "<f4").reshape(count, 4) if text else None
