"""Concept vectors as compact codes: transform coding in the concepts' principal basis.

A vector x [D] is centred and rotated into the principal basis of training concepts (PCA: y = (x - mean)
@ basis.T); component i is replaced by the nearest of 2^b_i levels (spread over that component's
training range, denser where its values are: `companded_levels`), with the bits b_i (0..10, summing to
a byte budget) allocated by reverse water-filling: b_i ~ log2(variance_i), so the components where
concepts (and the queries they are scored against, which live in the same space) vary most are kept
most precisely, and the weakest get no bits (their training mean). The codes of a vector are its b_i-bit fields bit-packed into
`bytes_per_vector` bytes. Decoding looks the levels up and rotates back; the re-rank scores decoded
candidates against the query's full-precision concepts (asymmetric).

Why not product quantization: at the same bytes PQ/OPQ has a lower plain reconstruction error, but
spreads it over every direction, including those the query words weigh most; what MrSw sees is the error
along the queries' directions. In a trial on the dev split at 80 bytes per vector, OPQ 64 x 8 bits kept
about half of the exhaustive top-10 sets where this codec keeps about nine in ten (the codec's own
numbers: reports/bench-search.json, `codec`).

Salient regions (images only, codecs trained with `salient` > 0): the best region of a caption's word is, for
nearly every word, one of a few regions of the image (on the dev split, 99.9% of training words' best regions
fall among each image's 5 most often best). Those regions decide MrSw and the explanations, and a set-equality
agreement with the full-precision ranking asks them to be nearly exact: an image's `salient` regions most often
best for the codec's reference words (a sample of training word pieces) are stored as fp16, its other regions as
codes of a coarser second table (`region_bits`, `region_levels`, same principal basis). An image's codes:
the salient regions' indices (one byte each), their fp16 vectors, then the other regions' codes in region order.
Caption word pieces are coded one by one with `bits`/`levels` (every word counts in MrSw). At 4,096 bytes per
image (4 fp16 regions, 45 others at 45 bytes) the dev split keeps 0.99 of the top-10 sets where 80 bytes on every
region keep 0.94 (reports/bench-search.json, `codec`).

Numpy only, training included. A codec is identified by the sha256 of its arrays (`digest`), recorded
with the collections that store its codes. Codecs without salient regions (files written before them) keep
their digest and code every region alike.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teran.errors import TeranInputError, run_tool

MAX_BITS = 10  # per component (the strongest components need more than a byte)
# the spacing of each component's levels (companded_levels), chosen on the training split: top-10 agreement with the
# exhaustive full-precision ranking of 1,000 training photos at 80 bytes per vector: Lloyd-Max levels 0.933,
# power 1/3 0.939, 1/2 0.946, 2/3 0.945, 0.8 0.938
COMPANDING_POWER = 0.5
MAX_SALIENT_REGIONS = 256  # an image's regions with salient ones kept: their indices are stored in one byte each


@dataclass(frozen=True, eq=False)
class ConceptCodec:
    mean: np.ndarray  # float32 [D]
    basis: np.ndarray  # float32 [D, D], orthonormal rows (principal directions, by falling variance)
    bits: np.ndarray  # int [D]: bits of each component, 0..MAX_BITS
    levels: np.ndarray  # float32 [D, 2^MAX_BITS]: component i's 2^bits[i] levels, ascending, first ones used
    # images: `salient` regions per image kept as fp16, the others coded with region_bits / region_levels
    salient: int = 0
    region_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # int [D]
    region_levels: np.ndarray = field(default_factory=lambda: np.zeros((0, 1 << MAX_BITS), np.float32))  # float32 [D, 2^MAX_BITS]
    reference_words: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))  # [M, D]: rank an image's regions

    @property
    def dimension(self) -> int:
        return self.mean.shape[0]

    @functools.cached_property
    def region_codec(self) -> ConceptCodec:
        """The codec of an image's regions other than its salient ones (this codec itself without salient regions)."""
        if not self.salient:
            return self
        return ConceptCodec(self.mean, self.basis, self.region_bits, self.region_levels)

    def image_bytes(self, regions: int) -> int:
        """The bytes of an image's codes with `regions` regions."""
        kept = min(self.salient, regions)
        return kept * (1 + 2 * self.dimension) + (regions - kept) * self.region_codec.bytes_per_vector

    def salient_regions(self, regions: np.ndarray) -> np.ndarray:
        """The indices (ascending) of the `salient` regions [R, D] that are most often the best region of a reference
        word (ties: the lower index)."""
        return self._salient_of([np.asarray(regions, np.float32)])[0]

    @functools.cached_property
    def _references(self) -> np.ndarray:
        return np.ascontiguousarray(self.reference_words.T, np.float32)  # [D, M]

    def _salient_of(self, sets: list[np.ndarray], images_per_product: int = 64) -> list[np.ndarray]:
        """salient_regions of each set, a few dozen images per matrix product (one product per image is slower)."""
        out = []
        for start in range(0, len(sets), images_per_product):
            chunk = sets[start : start + images_per_product]
            sims = np.concatenate(chunk) @ self._references  # [regions of the chunk, M]
            bounds = np.cumsum([0] + [len(s) for s in chunk])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                wins = np.bincount(sims[a:b].argmax(axis=0), minlength=b - a)
                out.append(np.sort(np.argsort(-wins, kind="stable")[: min(self.salient, b - a)]))
        return out

    def encode_images(self, sets: list[np.ndarray]) -> list[np.ndarray]:
        """Each image's regions [R_i, D] -> its codes, uint8 [image_bytes(R_i)] (every region coded alike without
        salient regions)."""
        sets = [np.asarray(s, np.float32) for s in sets]
        if self.salient and max(map(len, sets), default=0) > MAX_SALIENT_REGIONS:
            raise ValueError(f"an image of {max(map(len, sets))} regions; salient regions are kept for at most {MAX_SALIENT_REGIONS}")
        kept = self._salient_of(sets) if self.salient else [np.zeros(0, np.intp)] * len(sets)
        others = [np.delete(s, k, axis=0) for s, k in zip(sets, kept, strict=True)]
        codes = self.region_codec.encode(np.concatenate(others))
        parts = np.split(codes, np.cumsum([len(o) for o in others])[:-1])
        return [
            np.concatenate([k.astype(np.uint8), np.ascontiguousarray(s[k], "<f2").view(np.uint8).reshape(-1), c.reshape(-1)])
            for s, k, c in zip(sets, kept, parts, strict=True)
        ]

    def decode_images(self, blobs: list[np.ndarray], counts: list[int] | np.ndarray) -> np.ndarray:
        """Images' codes (`encode_images`) -> float32 block [len, max R_i, D + 1] of their regions' coefficients in the
        full principal basis (ordered as `_image_basis`), then 1 (zero rows past each image's count): with `image_query`,
        dot products equal those with the decoded regions (the salient ones' exactly as fp16). Images with the same
        number of regions are decoded together, and every coded region in one call."""
        counts = np.asarray(counts, np.int64)
        dim, width = self.dimension, max(1, int(counts.max(initial=1)))
        block = np.zeros((len(blobs), width, dim + 1), np.float32)
        rows = block.reshape(-1, dim + 1)
        kept_bytes, step = 1 + 2 * dim, self.region_codec.bytes_per_vector  # a salient region: its index, its fp16 vector
        kept_vectors, kept_rows, coded, coded_rows = [], [], [], []
        for n in np.unique(counts).tolist():  # images of n regions share one layout: decoded together
            images = np.flatnonzero(counts == n)
            wrong = sorted({len(blobs[i]) for i in images.tolist()} - {self.image_bytes(n)})
            if wrong:
                raise ValueError(f"image codes of {', '.join(map(str, wrong))} bytes for {n} regions; expected {self.image_bytes(n)}")
            blob = np.stack([np.asarray(blobs[i], np.uint8) for i in images.tolist()])
            kept = min(self.salient, n)
            index = blob[:, :kept].astype(np.intp)  # [m, kept]
            is_coded = np.ones((len(images), n), bool)
            is_coded[np.arange(len(images))[:, None], index] = False
            image_of, region = np.nonzero(is_coded)  # row-major: each image's coded regions in region order
            kept_vectors.append(np.ascontiguousarray(blob[:, kept : kept * kept_bytes]).view("<f2").reshape(-1, dim))
            kept_rows.append((images[:, None] * width + index).reshape(-1))
            coded.append(blob[:, kept * kept_bytes :].reshape(-1, step))
            coded_rows.append(images[image_of] * width + region)
        at = np.concatenate(kept_rows)
        rows[at, :dim] = (np.concatenate(kept_vectors).astype(np.float32) - self.mean) @ self._image_basis.T
        rows[at, dim] = 1.0
        at = np.concatenate(coded_rows)
        principal = self.region_codec.decode_principal(np.concatenate(coded))  # [N, K + 1]: the first K of _image_basis, then 1
        rows[at, : principal.shape[1] - 1] = principal[:, :-1]
        rows[at, dim] = 1.0
        return block

    @functools.cached_property
    def _image_basis(self) -> np.ndarray:
        """The principal directions in the order of `decode_images` blocks [D, D]: the region codes' coded components in
        their packing order (so decode_principal's coefficients fill the first columns as they are), then the others."""
        coded = self.region_codec._coded_dims
        return np.ascontiguousarray(self.basis[np.concatenate([coded, np.setdiff1d(np.arange(self.dimension), coded)])])

    def image_query(self, vectors: np.ndarray) -> np.ndarray:
        """Full-precision word pieces [N, D] -> [N, D + 1] against `decode_images` blocks: their coefficients along every
        principal direction (in the blocks' order), then their dot product with the mean."""
        q = np.asarray(vectors, np.float32)
        return np.concatenate([q @ self._image_basis.T, (q @ self.mean)[:, None]], axis=1)

    def image_vectors(self, block: np.ndarray) -> np.ndarray:
        """A `decode_images` block [..., D + 1] -> the decoded regions [..., D] (padding rows decode to the mean)."""
        return block[..., :-1] @ self._image_basis + self.mean

    @functools.cached_property
    def bytes_per_vector(self) -> int:
        return sum(-(-int((self.bits == b).sum()) * b // 8) for b in range(1, MAX_BITS + 1))

    def digest(self) -> str:
        h = hashlib.sha256()
        for array, dtype in ((self.mean, "<f4"), (self.basis, "<f4"), (self.bits, "<i4"), (self.levels, "<f4")):
            h.update(np.ascontiguousarray(array, dtype).tobytes())
        if self.salient:  # codecs without salient regions keep the digest of the files written before them
            h.update(np.int32(self.salient).tobytes())
            for array, dtype in ((self.region_bits, "<i4"), (self.region_levels, "<f4"), (self.reference_words, "<f2")):
                h.update(np.ascontiguousarray(array, dtype).tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        coded = int((self.bits > 0).sum())
        words = (
            f"{self.bytes_per_vector} bytes per vector ({int(self.bits.sum())} bits over {coded} of {self.dimension} principal components"
        )
        if not self.salient:
            return f"transform codec, {words}, sha256 {self.digest()[:12]})"
        regions = self.region_codec
        return (
            f"transform codec, {words}; images: {self.salient} salient regions as fp16, the others "
            f"{regions.bytes_per_vector} bytes ({int(regions.bits.sum())} bits over {int((regions.bits > 0).sum())} components), "
            f"an image of R regions {self.image_bytes(self.salient)} + {regions.bytes_per_vector} x (R - {self.salient}) bytes; "
            f"sha256 {self.digest()[:12]})"
        )

    @functools.cached_property
    def _groups(self) -> list[tuple[int, np.ndarray]]:
        """(bits, component indices) for each bit width in use, in the order their fields are packed."""
        return [(b, np.flatnonzero(self.bits == b)) for b in range(1, MAX_BITS + 1) if (self.bits == b).any()]

    @functools.cached_property
    def _field_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Where each coded component's field lies in the codes: (first byte, bit shift, mask, index of its first level
        in `_coded_levels`), one entry per component with bits, in packing order (`_coded_dims`). A field of b <= 10
        bits starting at bit s <= 7 of its first byte lies within that byte and the next two."""
        first, shift, mask, base = [], [], [], []
        offset = offset_fields = 0
        for b, dims in self._groups:
            starts = offset * 8 + np.arange(len(dims)) * b  # bit positions in the codes (little-endian bit order)
            first.append(starts // 8)
            shift.append(starts % 8)
            mask.append(np.full(len(dims), (1 << b) - 1))
            base.append((offset_fields + np.arange(len(dims))) * self.levels.shape[1])
            offset += -(-len(dims) * b // 8)
            offset_fields += len(dims)
        return (
            np.concatenate(first).astype(np.intp),
            np.concatenate(shift).astype(np.uint32),
            np.concatenate(mask).astype(np.uint32),
            np.concatenate(base).astype(np.intp),
        )

    @functools.cached_property
    def _coded_dims(self) -> np.ndarray:
        """The components with bits, in packing order."""
        return np.concatenate([dims for _, dims in self._groups])

    @functools.cached_property
    def _coded_basis(self) -> np.ndarray:
        """The principal directions of the coded components [K, D], in packing order."""
        return np.ascontiguousarray(self.basis[self._coded_dims])

    @functools.cached_property
    def _coded_levels(self) -> np.ndarray:
        """The coded components' level tables, flat: component k's levels start at k * 2^MAX_BITS."""
        return np.ascontiguousarray(self.levels[self._coded_dims]).reshape(-1)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """[N, D] -> uint8 codes [N, bytes_per_vector]."""
        x = np.asarray(vectors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dimension:
            raise ValueError(f"expected vectors [N, {self.dimension}], got {list(x.shape)}")
        if not len(x):
            return np.zeros((0, self.bytes_per_vector), np.uint8)
        y = (x - self.mean) @ self.basis.T
        packed = []
        for b, dims in self._groups:
            fields = np.empty((len(x), len(dims)), np.uint16)
            for j, i in enumerate(dims):
                levels = self.levels[i, : 1 << b]
                fields[:, j] = np.searchsorted((levels[1:] + levels[:-1]) / 2, y[:, i])  # nearest level
            bits = ((fields[:, :, None] >> np.arange(b, dtype=np.uint16)) & 1).astype(np.uint8)  # [N, n, b], least significant first
            packed.append(np.packbits(bits.reshape(len(x), -1), axis=1, bitorder="little"))
        return np.concatenate(packed, axis=1) if packed else np.zeros((len(x), 0), np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 codes [..., bytes_per_vector] -> float32 vectors [..., D]."""
        y = self.decode_principal(codes)
        return y[..., :-1] @ self._coded_basis + self.mean

    def decode_principal(self, codes: np.ndarray) -> np.ndarray:
        """uint8 codes [..., bytes_per_vector] -> [..., K + 1]: the K coded principal coefficients (the components
        with bits, in packing order; the others decode to 0), then 1. With `principal_query`, dot products equal
        those with the decoded vectors without rotating each one back (the re-rank's inner products, at the cost of
        a lookup): principal_query(q) . decode_principal(c) = q . decode(c)."""
        codes = np.asarray(codes, np.uint8)
        lead = codes.shape[:-1]
        flat = codes.reshape(-1, codes.shape[-1])
        if flat.shape[1] != self.bytes_per_vector:
            raise ValueError(f"expected codes [..., {self.bytes_per_vector}], got {list(codes.shape)}")
        first, shift, mask, base = self._field_layout
        # every byte with the two after it as one little-endian 24-bit word; each field is then one shift and mask
        padded = np.zeros((len(flat), flat.shape[1] + 2), np.uint32)
        padded[:, : flat.shape[1]] = flat
        words = padded[:, :-2] | (padded[:, 1:-1] << 8) | (padded[:, 2:] << 16)
        fields = (words[:, first] >> shift) & mask
        y = np.empty((len(flat), len(first) + 1), np.float32)
        y[:, :-1] = self._coded_levels[base + fields]
        y[:, -1] = 1.0
        return y.reshape(*lead, len(first) + 1)

    def principal_query(self, vectors: np.ndarray) -> np.ndarray:
        """Full-precision vectors [N, D] -> [N, K + 1]: their coefficients along the coded principal directions,
        then their dot product with the mean (see `decode_principal`)."""
        q = np.asarray(vectors, np.float32)
        return np.concatenate([q @ self._coded_basis.T, (q @ self.mean)[:, None]], axis=1)

    def to_bytes(self) -> bytes:
        """The .npz file's bytes (what `save` writes and `codec_from_bytes` reads)."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = dict(mean=self.mean, basis=self.basis, bits=self.bits, levels=self.levels)
        if self.salient:
            arrays |= dict(
                salient=np.asarray(self.salient, np.int32),
                region_bits=self.region_bits,
                region_levels=self.region_levels,
                reference_words=self.reference_words,
            )
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())


def _check_table(bits, levels, dim: int, where: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    bits, levels = np.asarray(bits), np.asarray(levels)
    if bits.shape != (dim,) or levels.shape != (dim, 1 << MAX_BITS):
        raise TeranInputError(
            f"{where}: {name} of shapes {list(bits.shape)}, {list(levels.shape)}; expected [{dim}], [{dim}, {1 << MAX_BITS}]"
        )
    if not np.issubdtype(levels.dtype, np.floating) or not np.isfinite(levels).all():
        raise TeranInputError(f"{where}: {name}: the levels must be finite floating-point numbers")
    if not np.issubdtype(bits.dtype, np.integer) or bits.min() < 0 or bits.max() > MAX_BITS or bits.sum() == 0:
        raise TeranInputError(f"{where}: {name}: bits must be integers 0..{MAX_BITS}, not all 0")
    return bits.astype(np.int32), levels.astype(np.float32)


def check_codec(mean, basis, bits, levels, where: str = "concept codec", salient=None) -> ConceptCodec:
    """A codec from its arrays, refused (TeranInputError naming `where`) unless they make one. `salient`: None, or
    (count, region_bits, region_levels, reference_words) for a codec that keeps each image's salient regions."""
    mean, basis = np.asarray(mean), np.asarray(basis)
    dim = mean.shape[0] if mean.ndim == 1 else 0
    if dim < 1 or basis.shape != (dim, dim):
        raise TeranInputError(
            f"{where}: arrays of shapes mean {list(mean.shape)}, basis {list(basis.shape)}, bits {list(np.shape(bits))}, levels "
            f"{list(np.shape(levels))}; expected [D], [D, D], [D], [D, {1 << MAX_BITS}]"
        )
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in (mean, basis)):
        raise TeranInputError(f"{where}: mean and basis must be finite floating-point numbers")
    bits, levels = _check_table(bits, levels, dim, where, "bits and levels")
    basis = basis.astype(np.float32)
    if not np.allclose(basis @ basis.T, np.eye(dim), atol=1e-3):
        raise TeranInputError(f"{where}: the basis must be orthonormal")
    if salient is None:
        return ConceptCodec(mean.astype(np.float32), basis, bits, levels)
    count, region_bits, region_levels, reference_words = salient
    count, reference_words = int(np.asarray(count)), np.asarray(reference_words)
    if not 1 <= count <= 255:
        raise TeranInputError(f"{where}: salient regions {count}; expected 1..255")
    region_bits, region_levels = _check_table(region_bits, region_levels, dim, where, "region_bits and region_levels")
    if reference_words.ndim != 2 or reference_words.shape[1] != dim or len(reference_words) < 1 or not np.isfinite(reference_words).all():
        raise TeranInputError(f"{where}: reference_words of shape {list(reference_words.shape)}; expected finite [M, {dim}]")
    return ConceptCodec(mean.astype(np.float32), basis, bits, levels, count, region_bits, region_levels, reference_words.astype(np.float16))


def codec_from_bytes(data: bytes, where: str) -> ConceptCodec:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            salient = None
            if "salient" in arrays.files:
                salient = (arrays["salient"], arrays["region_bits"], arrays["region_levels"], arrays["reference_words"])
            return check_codec(arrays["mean"], arrays["basis"], arrays["bits"], arrays["levels"], where, salient)
    except (OSError, ValueError, KeyError) as exc:
        raise TeranInputError(f"{where}: not a concept codec file ({exc})") from None


def load_codec(path: str | Path) -> ConceptCodec:
    path = Path(path)
    if not path.is_file():
        raise TeranInputError(f"{path}: no such concept codec file (.npz written by python -m search_service.concept_codes)")
    return codec_from_bytes(path.read_bytes(), str(path))


def allocate_bits(variances: np.ndarray, budget_bits: int) -> np.ndarray:
    """Reverse water-filling: b_i = round(log2(variance_i / theta)) within 0..MAX_BITS, theta chosen (bisection)
    so that the bits sum to at most `budget_bits`."""
    var = np.maximum(np.asarray(variances, np.float64), 1e-30)

    def bits_for(theta: float) -> np.ndarray:
        return np.clip(np.round(np.log2(var / theta)), 0, MAX_BITS).astype(np.int32)

    low, high = 1e-30, float(var.max()) * 2.0  # bits_for(low): all at MAX_BITS; bits_for(high): none
    for _ in range(200):
        theta = float(np.sqrt(low * high))
        if bits_for(theta).sum() > budget_bits:
            low = theta
        else:
            high = theta
    return bits_for(high)


def companded_levels(values: np.ndarray, count: int, power: float = COMPANDING_POWER, bins: int = 2048) -> np.ndarray:
    """`count` levels over the range of `values`, ascending, spaced with a point density proportional to the values'
    (smoothed histogram) density raised to `power`: the k-th level at the (k + 1/2) / count quantile of that density.

    Power 0 spaces the levels evenly, 1/3 is the high-resolution least-squares spacing. Why not Lloyd-Max levels
    (the least squared error over all training values): MrSw sees the error of each word's best region, a max over
    an image's regions, not the average error of a vector, and on the training split Lloyd-Max levels kept fewer
    exhaustive top-10 sets (see COMPANDING_POWER). The smoothing keeps sparse tails from placing levels on single
    training values."""
    values = np.asarray(values, np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.full(count, low)
    histogram, edges = np.histogram(values, bins=bins, range=(low, high))
    kernel = np.exp(-0.5 * (np.arange(-8, 9) / 3.0) ** 2)  # a Gaussian of 3 bins: the density, not the sample's noise
    density = np.convolve(histogram.astype(np.float64), kernel / kernel.sum(), mode="same") + 1e-3
    weight = density**power
    cdf = np.concatenate([[0.0], np.cumsum(weight)]) / weight.sum()
    return np.interp((np.arange(count) + 0.5) / count, cdf, edges)


def _fit_table(y: np.ndarray, variances: np.ndarray, bytes_per_vector: int, mean, basis) -> tuple[np.ndarray, np.ndarray]:
    """Bits (reverse water-filling within `bytes_per_vector`) and companded levels of principal coefficients y [N, D]."""
    dim = y.shape[1]
    bits = allocate_bits(variances, 8 * bytes_per_vector)
    while ConceptCodec(mean, basis, bits, np.zeros((dim, 1 << MAX_BITS), np.float32)).bytes_per_vector > bytes_per_vector:
        bits[np.flatnonzero(bits)[-1]] -= 1  # field padding to whole bytes: take a bit from the weakest component kept
    levels = np.zeros((dim, 1 << MAX_BITS), np.float32)
    for i in np.flatnonzero(bits):
        count = 1 << int(bits[i])
        levels[i, :count] = companded_levels(y[:, i], count)
        levels[i, count:] = levels[i, count - 1]
    return bits, levels


def train_codec(
    vectors: np.ndarray,
    bytes_per_vector: int,
    *,
    sample: int = 200000,
    seed: int = 0,
    words: np.ndarray | None = None,
    salient: int = 0,
    image_bytes: int = 4096,
    regions: int = 49,
    reference_words: int = 4096,
) -> ConceptCodec:
    """Fit on concept vectors [N, D] (the training photos' regions and captions' word pieces): `bytes_per_vector`
    for caption word pieces (and every image region without salient regions). With `salient` > 0, images of
    `regions` regions take `image_bytes`: `salient` fp16 regions, the others coded in what is left; `words` (the
    training word pieces) give the `reference_words` sample that picks an image's salient regions."""
    x = np.asarray(vectors, np.float32)
    if x.ndim != 2 or len(x) < 1024:
        raise TeranInputError(f"{list(x.shape)} training vectors; give at least 1024 concept vectors [N, D]")
    dim = x.shape[1]
    if not 1 <= bytes_per_vector <= dim * MAX_BITS // 8:
        raise TeranInputError(f"--bytes {bytes_per_vector}: give 1..{dim * MAX_BITS // 8} bytes per vector for dimension {dim}")
    region_bytes = 0
    if salient:
        if not 1 <= salient < regions <= MAX_SALIENT_REGIONS:
            raise TeranInputError(f"--salient {salient} of --regions {regions}: give 1 <= salient < regions <= {MAX_SALIENT_REGIONS}")
        region_bytes = (image_bytes - salient * (1 + 2 * dim)) // (regions - salient)
        if not 1 <= region_bytes <= dim * MAX_BITS // 8:
            raise TeranInputError(
                f"--image-bytes {image_bytes}: {salient} fp16 regions take {salient * (1 + 2 * dim)} bytes, leaving {region_bytes} "
                "bytes for "
                f"each of the other {regions - salient} regions; give room for 1..{dim * MAX_BITS // 8}"
            )
        if words is None or len(words) < 1:
            raise TeranInputError("salient regions need training word pieces (the captions' concept vectors) to rank an image's regions")
    rng = np.random.default_rng(seed)
    if len(x) > sample:
        x = x[rng.choice(len(x), sample, replace=False)]
    mean = x.mean(axis=0)
    variances, vectors_ = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(-variances)
    basis = vectors_[:, order].T.astype(np.float32)
    y = (x - mean) @ basis.T
    bits, levels = _fit_table(y, variances[order], bytes_per_vector, mean, basis)
    if not salient:
        return check_codec(mean, basis, bits, levels)
    region_bits, region_levels = _fit_table(y, variances[order], region_bytes, mean, basis)
    words = np.asarray(words, np.float32)
    reference = words[rng.choice(len(words), min(reference_words, len(words)), replace=False)]
    return check_codec(mean, basis, bits, levels, salient=(salient, region_bits, region_levels, reference))


# --------------------------------------------------------------------------- command line


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m search_service.concept_codes",
        description="Train a concept codec on concept vectors (the training photos' regions and captions' word pieces).",
        epilog="Exit codes: 0 written, 2 bad arguments or input, 1 other failures (e.g. encoder unreachable).",
    )
    parser.add_argument("--npz", type=Path, help="an .npz (or .npy) of concept vectors, [M, D] or [N, R, D] (zero rows are padding)")
    parser.add_argument("--key", default="", help="arrays of the .npz to use (comma separated; default: all)")
    parser.add_argument("--images", type=Path, help="a folder of training images to encode (needs --encoder-address)")
    parser.add_argument("--captions", type=Path, help="a text file of training captions, one per line, to encode (needs --encoder-address)")
    parser.add_argument("--encoder-address", default="", help="teran.v1.EncoderService host:port (with --images / --captions)")
    parser.add_argument("--encoder-token", default="", help="bearer token for the encoder")
    parser.add_argument("--batch", type=int, default=16, help="images (x4: captions) per encoder request (default 16)")
    parser.add_argument("--word-key", default="", help="arrays of the .npz that hold caption word pieces (comma separated; with --salient)")
    parser.add_argument("--bytes", type=int, default=80, help="bytes per caption word piece, and per region without --salient (default 80)")
    parser.add_argument(
        "--salient",
        type=int,
        default=4,
        help="regions per image kept as fp16, picked by reference words (default 4; 0: every region coded alike)",
    )
    parser.add_argument("--image-bytes", type=int, default=4096, help="bytes per image with --salient (default 4096)")
    parser.add_argument("--regions", type=int, default=49, help="regions per image with --salient (default 49)")
    parser.add_argument("--reference-words", type=int, default=4096, help="word pieces kept to pick salient regions (default 4096)")
    parser.add_argument("--sample", type=int, default=200000, help="at most this many vectors are fitted (default 200000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    return parser


def caption_vectors(path: Path, address: str, token: str, batch: int) -> np.ndarray:
    from teran_api.encoder_client import EncoderClient

    if not address:
        raise TeranInputError("--captions needs --encoder-address (a running teran.v1.EncoderService)")
    try:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise TeranInputError(f"--captions {path}: cannot read ({exc.strerror})") from None
    parts = []
    with EncoderClient(address, token=token or None, timeout=120) as client:
        for start in range(0, len(captions), 4 * batch):
            parts += [np.asarray(r.concepts, np.float32) for r in client.encode_captions(captions[start : start + 4 * batch])]
    if not parts:
        raise TeranInputError(f"--captions {path}: no captions")
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    from search_service.codebook import vectors_from_images, vectors_from_npz

    args = build_parser().parse_args(argv)

    def work() -> None:
        if args.npz is None and args.images is None and args.captions is None:
            raise TeranInputError("give the training vectors: --npz, or --images and/or --captions with --encoder-address")
        parts, words = [], []
        if args.npz is not None:
            parts.append(vectors_from_npz(args.npz, [k.strip() for k in args.key.split(",") if k.strip()]))
            if args.word_key:
                words.append(vectors_from_npz(args.npz, [k.strip() for k in args.word_key.split(",") if k.strip()]))
        if args.images is not None:
            parts.append(vectors_from_images(args.images, args.encoder_address, args.encoder_token, args.batch))
        if args.captions is not None:
            parts.append(caption_vectors(args.captions, args.encoder_address, args.encoder_token, args.batch))
            words.append(parts[-1])
        if len({p.shape[1] for p in parts}) > 1:
            raise TeranInputError(f"training vectors of different dimensions {sorted({p.shape[1] for p in parts})}")
        vectors = np.concatenate(parts)
        if args.salient and not words:
            raise TeranInputError("--salient needs caption word pieces: --captions, or --npz with --word-key (or --salient 0)")
        codec = train_codec(
            vectors,
            args.bytes,
            sample=args.sample,
            seed=args.seed,
            words=np.concatenate(words) if words else None,
            salient=args.salient,
            image_bytes=args.image_bytes,
            regions=args.regions,
            reference_words=args.reference_words,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        codec.save(args.out)
        print(f"wrote {args.out}: {codec.describe()}, fitted on {min(len(vectors), args.sample)} of {len(vectors)} concept vectors")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
