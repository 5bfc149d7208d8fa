"""Copy the collections of one prefix into new collections that store their concept vectors as the codes
of a concept codec (collections keep the concept encoding they were created with):

    python -m search_service.convert_concepts --milvus-uri http://milvus:19530 --from-prefix teran \\
        --to-prefix teran_codes --concept-codec models/concept-codec-teran-flickr8k-80.npz
    # then serve the new collections: python -m search_service --collection-prefix teran_codes ...

Everything else of each item is copied as it is (global vector, metadata, word pieces, boxes, hub
statistic); the new collections get the same model, limits, sparse first stages and BoC codebook.
Upserts: an interrupted run is resumed by running it again. Stop writers to the old prefix first.

Exit codes: 0 copied, 2 bad arguments (e.g. no collections under --from-prefix, a bad codec), 1 other
failures (e.g. Milvus unreachable).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from search_service.concept_codes import load_codec
from search_service.layout import MODALITIES
from search_service.store import Item, MilvusStore
from teran.errors import TeranInputError, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search_service.convert_concepts",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 copied, 2 bad arguments, 1 other failures (e.g. Milvus unreachable).",
    )
    parser.add_argument("--milvus-uri", required=True, help="milvus-lite file or Milvus server URI")
    parser.add_argument("--milvus-token", default=os.environ.get("TERAN_SEARCH_MILVUS_TOKEN", ""), help="[env TERAN_SEARCH_MILVUS_TOKEN]")
    parser.add_argument("--from-prefix", required=True, help="the collections to copy (their --collection-prefix)")
    parser.add_argument("--to-prefix", required=True, help="the new collections (must not exist yet, or be an earlier run's)")
    parser.add_argument("--concept-codec", required=True, help="the codec .npz (python -m search_service.concept_codes)")
    parser.add_argument("--batch", type=int, default=256, help="items per read and write (default 256)")
    return parser


def convert(source: MilvusStore, target: MilvusStore, batch: int, progress=print) -> dict[str, int]:
    """Copy every item of `source` into `target` (opened); returns the items copied per modality."""
    target.ensure(source.known_model)
    copied = {}
    for modality in MODALITIES:
        total = source.count(modality)
        done = 0
        for rows in source.scan(modality, concepts=False, batch_size=batch):
            found = source.get(modality, [row[0] for row in rows], True)
            items = [
                Item(s.id, np.asarray(s.global_vector), np.asarray(s.concepts, np.float32), s.metadata, s.labels, s.boxes, hub=s.hub)
                for s in found.values()
            ]
            target.upsert(modality, items)
            done += len(items)
            progress(f"{modality}: {done}/{total} copied")
        copied[modality] = done
    return copied


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        if args.from_prefix == args.to_prefix:
            raise TeranInputError("--to-prefix must differ from --from-prefix (collections keep their concept encoding)")
        if args.batch < 1:
            raise TeranInputError(f"--batch: must be >= 1, got {args.batch}")
        codec = load_codec(args.concept_codec)
        source = target = None
        try:
            source = MilvusStore(args.milvus_uri, args.milvus_token, prefix=args.from_prefix)
            source.open()
            if source.model is None:
                raise TeranInputError(f"no collections under --from-prefix {args.from_prefix} at {source.safe_uri}")
            layout = source.layout
            target = MilvusStore(
                args.milvus_uri,
                args.milvus_token,
                prefix=args.to_prefix,
                index_type=source.index_type,
                index_params=source.index_params,
                max_concepts=layout.max_concepts,
                max_id_length=layout.max_id_length,
                sparse_surrogates=layout.surrogates,
                sparse_params=layout.sparse_params,
                boc_codebook=layout.codebook,
                concept_codec=codec,
            )
            target.open()
            started = time.monotonic()
            copied = convert(source, target, args.batch, progress=lambda line: print(line, file=sys.stderr, flush=True))
        finally:
            for store in (source, target):
                if store is not None:
                    store.close()
        print(
            f"copied {copied['images']} images and {copied['captions']} captions from {args.from_prefix} to {args.to_prefix} "
            f"({codec.describe()}) in {time.monotonic() - started:.1f} s"
        )

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
