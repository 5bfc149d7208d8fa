"""Sparse surrogate text representations of the global vector (the seeds' indexable first stages).

Both start from c-relu(v) = [max(v, 0), max(-v, 0)] (2D non-negative components, so inner
products of surrogates approximate those of the vectors' positive and negative parts) and give a
{component: weight} sparse vector stored in a Milvus SPARSE_FLOAT_VECTOR field (inverted index,
inner product):
- scalar quantization (SQ): weight floor(scale * x); components below 1/scale are dropped, so the
  scale sets the sparsity;
- deep permutation (DP): the `keep` largest components, weight keep - rank (the truncated
  permutation as term frequencies); `keep` sets the sparsity.
"""

from __future__ import annotations

import numpy as np

SQ, DP = "sq", "dp"
KINDS = (SQ, DP)


def crelu(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    return np.concatenate([np.maximum(v, 0), np.maximum(-v, 0)])


def _nonempty(x: np.ndarray, out: dict[int, float]) -> dict[int, float]:
    if not out:  # Milvus refuses empty sparse vectors: keep the largest component
        out[int(np.argmax(x))] = 1.0
    return out


def scalar_quantization(vector: np.ndarray, scale: float = 30.0) -> dict[int, float]:
    x = crelu(vector)
    q = np.floor(scale * x)
    return _nonempty(x, {int(i): float(q[i]) for i in np.flatnonzero(q >= 1)})


def deep_permutation(vector: np.ndarray, keep: int = 64) -> dict[int, float]:
    x = crelu(vector)
    order = np.argsort(-x, kind="stable")[:keep]
    return _nonempty(x, {int(i): float(keep - rank) for rank, i in enumerate(order) if x[i] > 0})


def surrogate(kind: str, vector: np.ndarray, params: dict) -> dict[int, float]:
    if kind == SQ:
        return scalar_quantization(vector, float(params.get("sq_scale", 30.0)))
    if kind == DP:
        return deep_permutation(vector, int(params.get("dp_keep", 64)))
    raise ValueError(f"unknown sparse surrogate {kind!r}; choose from {KINDS}")
