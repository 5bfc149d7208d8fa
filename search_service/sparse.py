"""Sparse surrogate text representations of the global vector (the seeds' indexable first stages).

Both start from c-relu(v) = [max(v, 0), max(-v, 0)] (2D non-negative components, so inner
products of surrogates approximate those of the vectors' positive and negative parts) and give a
{component: weight} sparse vector stored in a Milvus SPARSE_FLOAT_VECTOR field (inverted index,
inner product):
- scalar quantization (SQ): weight floor(scale * x); components below 1/scale are dropped, so the
  scale sets the sparsity;
- deep permutation (DP): the `keep` largest components, weight keep - rank (the truncated
  permutation as term frequencies); `keep` sets the sparsity.

Bag of Concepts (BoC) encodes the CONCEPT vectors instead: a k-means codebook of concept vectors
(spherical, `kmeans_codebook`, fitted on the image side's region vectors: word and region vectors need
not share clusters) is the vocabulary; each concept vector is soft-assigned to its `top` most similar
codewords (weights: softmax of the cosines / temperature over those), and the item's weights are pooled per
codeword: max over an image's regions, sum over a caption's word pieces, so that the inner product of a
caption's and an image's BoC approximates MrSw (sum over words of the max over regions). The codebook
size and `top` set the sparsity (`keep` optionally truncates to the largest weights). Served as the
BAG_OF_CONCEPTS first stage (`boc_vector` field) when the collections are created with a codebook
(`python -m search_service.codebook` builds one; `--boc-codebook` passes it; the codebook is then stored
in PREFIX_meta with the collections, see layout.py). The benchmark's strategies table measures it too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from teran.errors import TeranInputError

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


BOC = "boc"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans_codebook(vectors: np.ndarray, size: int, iterations: int = 15, seed: int = 0, sample: int = 50000) -> np.ndarray:
    """Spherical k-means (cosine, k-means++ seeding) over concept vectors [M, D] -> unit codebook [size, D]
    (deterministic for a seed; at most `sample` vectors are used)."""
    rng = np.random.default_rng(seed)
    x = _unit(vectors)
    if len(x) > sample:
        x = x[rng.choice(len(x), sample, replace=False)]
    if len(x) < size:
        raise ValueError(f"{len(x)} vectors for a codebook of {size}")
    # k-means++ seeding on the cosine distance 1 - cos
    centroids = np.empty((size, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(len(x))]
    distance = np.maximum(1.0 - x @ centroids[0], 0.0)
    for k in range(1, size):
        total = float(distance.sum())
        pick = rng.choice(len(x), p=distance / total) if total > 0 else rng.integers(len(x))
        centroids[k] = x[pick]
        distance = np.minimum(distance, np.maximum(1.0 - x @ centroids[k], 0.0))
    for _ in range(iterations):
        assign = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=size)
        empty = counts == 0
        sums[empty] = x[rng.choice(len(x), int(empty.sum()), replace=False)]  # re-seed empty clusters
        centroids = _unit(sums)
    return centroids


def bag_of_concepts(
    concepts: np.ndarray, codebook: np.ndarray, top: int = 1, pool: str = "sum", keep: int = 0, temperature: float = 0.05
) -> dict[int, float]:
    """Sparse BoC of one item's concept vectors [N, D]: each soft-assigned to its `top` most similar codewords with
    weights softmax(cosine / temperature) over those (positive, summing to 1 per concept; top=1: hard assignment),
    pooled per codeword by `pool` (max: an image's regions, sum: a caption's words); `keep` > 0 keeps the largest."""
    sims = _unit(concepts) @ codebook.T  # [N, K]
    top = min(top, codebook.shape[0])
    idx = np.argpartition(-sims, top - 1, axis=1)[:, :top]
    chosen = np.take_along_axis(sims, idx, axis=1) / temperature
    weights = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.zeros(codebook.shape[0], dtype=np.float32)
    if pool == "max":
        np.maximum.at(out, idx.ravel(), weights.ravel().astype(np.float32))
    elif pool == "sum":
        np.add.at(out, idx.ravel(), weights.ravel().astype(np.float32))
    else:
        raise ValueError(f"pool must be max or sum, got {pool!r}")
    nonzero = np.flatnonzero(out > 0)
    if keep and len(nonzero) > keep:
        nonzero = nonzero[np.argsort(-out[nonzero], kind="stable")[:keep]]
    return _nonempty(sims.max(axis=0), {int(i): float(out[i]) for i in nonzero})


# --------------------------------------------------------------------------- serving the BoC

BOC_DEFAULTS = {"boc_top": 1, "boc_keep": 0, "boc_temperature": 0.05}


def check_codebook(codebook, where: str = "codebook") -> np.ndarray:
    """A usable codebook: 2-D [K, D] finite float with K >= 1, D >= 1 and no zero rows -> unit float32 [K, D] (idempotent)
    (raises TeranInputError naming `where`)."""
    array = np.asarray(codebook)
    if array.dtype.kind not in "fiu":
        raise TeranInputError(f"{where}: dtype {array.dtype} is not numeric; expected float [codewords, dimension]")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise TeranInputError(f"{where}: shape {list(array.shape)}; expected [codewords, dimension] with both >= 1")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise TeranInputError(f"{where}: contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise TeranInputError(f"{where}: has all-zero codewords (rows)")
    off = np.abs(norms - 1) > 1e-5  # rows already unit stay bit-identical: checking twice changes nothing
    array[off] = _unit(array[off])
    return np.ascontiguousarray(array, dtype="<f4")


def load_arrays(path: str | Path, what: str, kind: str):
    """np.load without pickles; a missing or unreadable file is a TeranInputError naming `what` and `kind`."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TeranInputError(f"{what}: no such {kind} file") from None
    except (OSError, ValueError) as exc:
        raise TeranInputError(f"{what}: not a {kind} file ({exc})") from None


def load_codebook(path: str | Path) -> np.ndarray:
    """Read a codebook .npy (as written by `python -m search_service.codebook`) -> unit float32 [K, D]."""
    return check_codebook(load_arrays(path, str(path), ".npy codebook"), str(path))


def codebook_digest(codebook: np.ndarray) -> str:
    """sha256 of the unit float32 little-endian bytes and the shape: identifies a codebook."""
    array = np.ascontiguousarray(codebook, dtype="<f4")
    return hashlib.sha256(f"{array.shape[0]}x{array.shape[1]}:".encode() + array.tobytes()).hexdigest()


def item_boc(concepts: np.ndarray, image: bool, codebook: np.ndarray, params: dict) -> dict[int, float]:
    """The BoC of an item or query: an image's regions max-pooled, a caption's word pieces sum-pooled."""
    return bag_of_concepts(
        np.asarray(concepts, dtype=np.float32),
        codebook,
        top=int(params.get("boc_top", BOC_DEFAULTS["boc_top"])),
        pool="max" if image else "sum",
        keep=int(params.get("boc_keep", BOC_DEFAULTS["boc_keep"])),
        temperature=float(params.get("boc_temperature", BOC_DEFAULTS["boc_temperature"])),
    )
