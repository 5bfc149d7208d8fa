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

Numpy only, training included. A codec is identified by the sha256 of its arrays (`digest`), recorded
with the collections that store its codes.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teran.errors import TeranInputError, run_tool

MAX_BITS = 10  # per component (the strongest components need more than a byte)
# the spacing of each component's levels (companded_levels), chosen on the training split: top-10 agreement with the
# exhaustive full-precision ranking of 1,000 training photos at 80 bytes per vector: Lloyd-Max levels 0.933,
# power 1/3 0.939, 1/2 0.946, 2/3 0.945, 0.8 0.938
COMPANDING_POWER = 0.5


@dataclass(frozen=True, eq=False)
class ConceptCodec:
    mean: np.ndarray  # float32 [D]
    basis: np.ndarray  # float32 [D, D], orthonormal rows (principal directions, by falling variance)
    bits: np.ndarray  # int [D]: bits of each component, 0..MAX_BITS
    levels: np.ndarray  # float32 [D, 2^MAX_BITS]: component i's 2^bits[i] levels, ascending, first ones used

    @property
    def dimension(self) -> int:
        return self.mean.shape[0]

    @functools.cached_property
    def bytes_per_vector(self) -> int:
        return sum(-(-int((self.bits == b).sum()) * b // 8) for b in range(1, MAX_BITS + 1))

    def digest(self) -> str:
        h = hashlib.sha256()
        for array, dtype in ((self.mean, "<f4"), (self.basis, "<f4"), (self.bits, "<i4"), (self.levels, "<f4")):
            h.update(np.ascontiguousarray(array, dtype).tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        return (
            f"transform codec, {self.bytes_per_vector} bytes per vector ({int(self.bits.sum())} bits over "
            f"{int((self.bits > 0).sum())} of {self.dimension} principal components, sha256 {self.digest()[:12]})"
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
        np.savez(buffer, mean=self.mean, basis=self.basis, bits=self.bits, levels=self.levels)
        return buffer.getvalue()

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())


def check_codec(mean, basis, bits, levels, where: str = "concept codec") -> ConceptCodec:
    """A codec from its arrays, refused (TeranInputError naming `where`) unless they make one."""
    mean, basis, levels = (np.asarray(a) for a in (mean, basis, levels))
    bits = np.asarray(bits)
    dim = mean.shape[0] if mean.ndim == 1 else 0
    if dim < 1 or basis.shape != (dim, dim) or bits.shape != (dim,) or levels.shape != (dim, 1 << MAX_BITS):
        raise TeranInputError(
            f"{where}: arrays of shapes mean {list(mean.shape)}, basis {list(basis.shape)}, bits {list(bits.shape)}, levels "
            f"{list(levels.shape)}; expected [D], [D, D], [D], [D, {1 << MAX_BITS}]"
        )
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in (mean, basis, levels)):
        raise TeranInputError(f"{where}: mean, basis and levels must be finite floating-point numbers")
    if not np.issubdtype(bits.dtype, np.integer) or bits.min() < 0 or bits.max() > MAX_BITS or bits.sum() == 0:
        raise TeranInputError(f"{where}: bits must be integers 0..{MAX_BITS}, not all 0")
    basis = basis.astype(np.float32)
    if not np.allclose(basis @ basis.T, np.eye(dim), atol=1e-3):
        raise TeranInputError(f"{where}: the basis must be orthonormal")
    return ConceptCodec(mean.astype(np.float32), basis, bits.astype(np.int32), levels.astype(np.float32))


def codec_from_bytes(data: bytes, where: str) -> ConceptCodec:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return check_codec(arrays["mean"], arrays["basis"], arrays["bits"], arrays["levels"], where)
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


def train_codec(vectors: np.ndarray, bytes_per_vector: int, *, sample: int = 200000, seed: int = 0) -> ConceptCodec:
    """Fit on concept vectors [N, D] (the training photos' regions and captions' word pieces)."""
    x = np.asarray(vectors, np.float32)
    if x.ndim != 2 or len(x) < 1024:
        raise TeranInputError(f"{list(x.shape)} training vectors; give at least 1024 concept vectors [N, D]")
    dim = x.shape[1]
    if not 1 <= bytes_per_vector <= dim * MAX_BITS // 8:
        raise TeranInputError(f"--bytes {bytes_per_vector}: give 1..{dim * MAX_BITS // 8} bytes per vector for dimension {dim}")
    if len(x) > sample:
        x = x[np.random.default_rng(seed).choice(len(x), sample, replace=False)]
    mean = x.mean(axis=0)
    variances, vectors_ = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(-variances)
    basis = vectors_[:, order].T.astype(np.float32)
    y = (x - mean) @ basis.T
    bits = allocate_bits(variances[order], 8 * bytes_per_vector)
    while ConceptCodec(mean, basis, bits, np.zeros((dim, 1 << MAX_BITS), np.float32)).bytes_per_vector > bytes_per_vector:
        bits[np.flatnonzero(bits)[-1]] -= 1  # field padding to whole bytes: take a bit from the weakest component kept
    levels = np.zeros((dim, 1 << MAX_BITS), np.float32)
    for i in np.flatnonzero(bits):
        count = 1 << int(bits[i])
        levels[i, :count] = companded_levels(y[:, i], count)
        levels[i, count:] = levels[i, count - 1]
    return check_codec(mean, basis, bits, levels)


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
    parser.add_argument("--bytes", type=int, default=80, help="bytes per concept vector (default 80: 3,920 bytes for 49 regions)")
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
        parts = []
        if args.npz is not None:
            parts.append(vectors_from_npz(args.npz, [k.strip() for k in args.key.split(",") if k.strip()]))
        if args.images is not None:
            parts.append(vectors_from_images(args.images, args.encoder_address, args.encoder_token, args.batch))
        if args.captions is not None:
            parts.append(caption_vectors(args.captions, args.encoder_address, args.encoder_token, args.batch))
        if len({p.shape[1] for p in parts}) > 1:
            raise TeranInputError(f"training vectors of different dimensions {sorted({p.shape[1] for p in parts})}")
        vectors = np.concatenate(parts)
        codec = train_codec(vectors, args.bytes, sample=args.sample, seed=args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        codec.save(args.out)
        print(f"wrote {args.out}: {codec.describe()}, fitted on {min(len(vectors), args.sample)} of {len(vectors)} concept vectors")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
