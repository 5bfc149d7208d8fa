"""Build the Bag-of-Concepts codebook: a spherical k-means codebook of concept vectors, written as .npy.

    # from concept vectors already computed: an .npz of [M, D] (or [N, R, D]) arrays
    python -m search_service.codebook --npz regions.npz --key concepts --size 1024 --out data/boc-1024.npy
    # from images, encoded by a running encoder service (its region vectors)
    python -m search_service.codebook --encoder-address encoder:50051 --images photos/ --size 1024 --out data/boc-1024.npy
    python -m search_service --boc-codebook data/boc-1024.npy ...   # serve the BAG_OF_CONCEPTS first stage

Fit it on the image side's region vectors of the model the collections will hold (its dimension must match).
The file holds unit float32 [size, D]; the service stores it with the collections it creates (PREFIX_meta).

Exit codes: 0 written, 2 bad arguments or input (no vectors, wrong shape, too few vectors for --size),
1 any other failure (e.g. the encoder cannot be reached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from search_service.sparse import check_codebook, kmeans_codebook, load_arrays
from teran.errors import TeranInputError, run_tool

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search_service.codebook",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 written, 2 bad arguments or input, 1 other failures (e.g. encoder unreachable).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--npz", type=Path, help="an .npz (or .npy) of concept vectors, [M, D] or [N, R, D] (zero rows are padding)")
    source.add_argument("--images", type=Path, help="a folder of images (*.jpg, *.jpeg, *.png, *.webp) to encode; needs --encoder-address")
    parser.add_argument("--key", default="", help="arrays of the .npz to use (comma separated; default: all)")
    parser.add_argument("--encoder-address", default="", help="teran.v1.EncoderService host:port (with --images)")
    parser.add_argument("--encoder-token", default="", help="bearer token for the encoder")
    parser.add_argument("--batch", type=int, default=16, help="images per encoder request (default 16)")
    parser.add_argument("--size", type=int, default=1024, help="codewords (default 1024): with --boc-top, the sparsity")
    parser.add_argument("--iterations", type=int, default=15, help="k-means iterations (default 15)")
    parser.add_argument("--sample", type=int, default=50000, help="at most this many vectors are clustered (default 50000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the codebook is deterministic for a seed)")
    parser.add_argument("--out", type=Path, required=True, help="the .npy to write")
    return parser


def vectors_from_npz(path: Path, keys: list[str]) -> np.ndarray:
    data = load_arrays(path, f"--npz {path}", ".npz/.npy")
    arrays = {"": data} if isinstance(data, np.ndarray) else {k: data[k] for k in data.files}
    if keys:
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise TeranInputError(f"--key: {', '.join(missing)} not in {path} (it has: {', '.join(arrays) or 'nothing'})")
        arrays = {k: arrays[k] for k in keys}
    parts = []
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu" or array.ndim not in (2, 3):
            where = f"{path}:{name}" if name else str(path)
            raise TeranInputError(f"--npz {where}: {array.dtype} {list(array.shape)}; expected float [M, D] or [N, R, D]")
        parts.append(array.reshape(-1, array.shape[-1]).astype(np.float32))
    if len({p.shape[1] for p in parts}) > 1:
        raise TeranInputError(f"--npz {path}: arrays of different dimensions {sorted({p.shape[1] for p in parts})}")
    if not parts:
        raise TeranInputError(f"--npz {path}: no arrays")
    vectors = np.concatenate(parts)
    return vectors[np.linalg.norm(vectors, axis=1) > 0]  # drop padding rows


def vectors_from_images(folder: Path, address: str, token: str, batch: int) -> np.ndarray:
    from teran_api.encoder_client import EncoderClient

    if not address:
        raise TeranInputError("--images needs --encoder-address (a running teran.v1.EncoderService)")
    if not folder.is_dir():
        raise TeranInputError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TeranInputError(f"--images {folder}: no *.jpg, *.jpeg, *.png or *.webp files")
    parts = []
    with EncoderClient(address, token=token or None, timeout=120) as client:
        for start in range(0, len(files), batch):
            for encoded in client.encode_images([p.read_bytes() for p in files[start : start + batch]]):
                parts.append(np.asarray(encoded.concepts, dtype=np.float32))
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        for name in ("size", "iterations", "sample", "batch"):
            if getattr(args, name) < 1:
                raise TeranInputError(f"--{name}: must be >= 1, got {getattr(args, name)}")
        if args.npz is not None:
            vectors = vectors_from_npz(args.npz, [k.strip() for k in args.key.split(",") if k.strip()])
        else:
            vectors = vectors_from_images(args.images, args.encoder_address, args.encoder_token, args.batch)
        if len(vectors) < args.size:
            raise TeranInputError(f"{len(vectors)} concept vectors for a codebook of --size {args.size}: give more, or a smaller --size")
        codebook = check_codebook(kmeans_codebook(vectors, args.size, iterations=args.iterations, seed=args.seed, sample=args.sample))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "wb") as handle:  # np.save(path) would append .npy to other names
            np.save(handle, codebook)
        print(f"wrote {args.out}: {codebook.shape[0]} codewords x {codebook.shape[1]} from {len(vectors)} concept vectors")

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
