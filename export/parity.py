"""Parity of an exported model directory with PyTorch on real Flickr8k inputs.

    python -m export.parity --model-dir models/teran-flickr8k --checkpoint models/teran-flickr8k.pt \
        --output reports/export-parity.json

ONNX Runtime (CPUExecutionProvider) runs the fp32 and fp16 graphs on the split's captions
(tokenized with the directory's tokenizer.json) and cached image region features; PyTorch runs
the same checkpoint. Reported per precision: max abs diff of global and concept vectors
(concepts where the mask is True), the masks' agreement, and Recall@K / rsum for the alignment
and global scores against torch. The image_backbone graph is checked against
GridImageBackbone on a few real images. Exit codes: 0 targets met, 1 targets missed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from teran.errors import TeranInputError
from teran.exported import ExportedModel, caption_batches, ort_session, region_batches, run_batches
from teran.hubness import HubReference
from teran.manifest import file_sha256, load_manifest

TARGETS = {
    "fp32": {"text_max_abs_diff": 1e-4, "image_max_abs_diff": 1e-4, "rsum_delta": 0.1},
    "fp16": {"rsum_delta": 1.0},
}


class ParityError(TeranInputError):
    """The model directory and the checkpoint do not belong together, or the data is missing."""


def _torch_runner(module):
    def run(inputs):
        with torch.no_grad():
            out = module(*(torch.from_numpy(x) for x in inputs))
        return tuple(t.numpy() for t in out)

    return run


def _diffs(ref, other) -> dict:
    g = float(np.abs(ref[0] - other[0]).max())
    mask = ref[2]
    c = float(np.abs(ref[1] - other[1])[mask].max(initial=0.0))
    return {
        "global_max_abs_diff": g,
        "concepts_max_abs_diff": c,
        "max_abs_diff": max(g, c),
        "masks_equal": bool(np.array_equal(ref[2], other[2])),
    }


def _scores(images, texts, mode: str) -> dict[str, np.ndarray]:
    """teran.evaluate.score_both; for MrSw / MrAVGw the captions are scored in chunks of similar
    length, each trimmed to its longest caption (padded words add exactly 0 in these modes)."""
    from teran.alignment import chunked_alignment_scores, global_scores
    from teran.evaluate import score_both
    from teran.model import Encoded

    enc = lambda t: Encoded(*(torch.from_numpy(np.ascontiguousarray(x)) for x in t))  # noqa: E731
    if mode not in ("MrSw", "MrAVGw"):
        return score_both(enc(images), enc(texts), mode)
    image_enc = enc(images)
    mask = texts[2]
    widths = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 1)
    order = np.argsort(widths, kind="stable")
    alignment = np.empty((images[0].shape[0], texts[0].shape[0]), dtype=np.float32)
    for start in range(0, len(order), 500):
        idx = order[start : start + 500]
        width = int(widths[idx].max())
        block = chunked_alignment_scores(
            image_enc.concepts, image_enc.concept_mask, torch.from_numpy(texts[1][idx, :width]), torch.from_numpy(mask[idx, :width]), mode
        )
        alignment[:, idx] = block.numpy()
    return {"alignment": alignment, "global": global_scores(image_enc.global_vec, torch.from_numpy(texts[0])).numpy()}


def _retrieval(images, texts, owners: np.ndarray, mode: str, blend_weight: float | None = None, hub=None) -> dict:
    """Recall of each score; with a blend weight (MrSw models) also of the blend, and with a hub reference
    (teran.hubness.HubReference) of the served ranking (the blend less the hub penalty)."""
    from teran.alignment_numpy import blend_scores
    from teran.metrics import recall_at_k

    scores = _scores(images, texts, mode)
    if blend_weight is not None and mode == "MrSw":
        scores["blend"] = blend_scores(scores["global"], scores["alignment"], blend_weight)
        if hub is not None:
            scores["served"] = hub.penalise(scores["blend"], images[0], texts[0])
    return {name: recall_at_k(values, owners) for name, values in scores.items()}


def run_parity(
    model_dir: str | Path,
    checkpoint: str | Path,
    *,
    split: str = "dev",
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 128,
    backbone_images: int = 8,
    mode: str | None = None,
    threads: int = 0,
    say=lambda message: print(message, file=sys.stderr, flush=True),
) -> dict:
    from export.sources import load_source
    from teran.data.flickr8k import load_split
    from teran.features import image_features
    from teran.preprocess import read_image_file, to_pixels
    from teran.tokenization import CaptionTokenizer

    started = time.monotonic()
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, verify=True)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ParityError(f"{checkpoint}: checkpoint file does not exist")
    sha = file_sha256(checkpoint)
    if sha != manifest.source.sha256:
        raise ParityError(
            f"{checkpoint}: sha256 {sha[:12]}... differs from the checkpoint {model_dir} was exported from "
            f"({manifest.source.sha256[:12]}..., {manifest.source.path})"
        )
    if manifest.source.kind != "project":
        raise ParityError(
            f"{model_dir}: parity on Flickr8k needs our grid region features; a {manifest.source.kind} checkpoint expects "
            "bottom-up features, which this data set does not have"
        )
    mode = mode or manifest.alignment_mode
    say(f"loading {checkpoint} and its backbones ...")
    source = load_source(checkpoint, "project", max_tokens=manifest.limits.max_tokens, max_regions=manifest.limits.max_regions)

    data = load_split(split, data_dir, limit=limit)
    captions, owners = data.flat_captions()
    owners = np.asarray(owners)
    say(f"{split}: {len(data.names)} images, {len(captions)} captions")
    tokenizer = CaptionTokenizer(model_dir / manifest.tokenizer_file, max_tokens=manifest.limits.max_tokens)
    text_batches = caption_batches(tokenizer, captions, batch_size)
    feats = image_features(data, tuned_blocks=manifest.preprocessing.image_tuned_blocks)
    image_batches = region_batches(feats.regions, feats.boxes, batch_size)

    encoded = {}
    timings = {}
    t0 = time.monotonic()
    say("torch: encoding captions and images ...")
    encoded["torch"] = (
        run_batches(text_batches, _torch_runner(source.graphs["text_encoder"].module)),
        run_batches(image_batches, _torch_runner(source.graphs["image_encoder"].module)),
    )
    timings["torch"] = round(time.monotonic() - t0, 1)
    image_inputs = [t.name for t in manifest.graph("image_encoder").inputs]
    for precision in ("fp32", "fp16"):
        t0 = time.monotonic()
        say(f"onnxruntime {precision}: encoding captions and images ...")
        exported = ExportedModel(model_dir, precision, threads, manifest)
        encoded[precision] = (exported.encode_token_batches(text_batches), exported.encode_region_batches(image_batches))
        timings[f"ort_{precision}"] = round(time.monotonic() - t0, 1)

    hub = HubReference.load(model_dir, manifest.hub_penalty) if manifest.hub_penalty else None
    retrieval = {}
    for variant, (texts, images) in encoded.items():
        say(f"scoring {variant} ({mode} alignment and global) ...")
        retrieval[variant] = _retrieval(images, texts, owners, mode, manifest.blend_weight, hub)

    report: dict = {}
    for precision in ("fp32", "fp16"):
        ref_text, ref_image = encoded["torch"]
        texts, images = encoded[precision]
        text = _diffs(ref_text, texts)
        image = _diffs(ref_image, images)
        rsum = {
            name: {
                "torch": retrieval["torch"][name]["rsum"],
                "ort": retrieval[precision][name]["rsum"],
                "delta": retrieval[precision][name]["rsum"] - retrieval["torch"][name]["rsum"],
            }
            for name in retrieval["torch"]
        }
        report[precision] = {
            "text_max_abs_diff": text["max_abs_diff"],
            "image_max_abs_diff": image["max_abs_diff"],
            "rsum_delta": max(abs(r["delta"]) for r in rsum.values()),
            "text": text,
            "image": image,
            "rsum": rsum,
            "recall": retrieval[precision],
        }

    if "image_backbone" in manifest.graphs and "image_backbone" in source.graphs and backbone_images > 0:
        say(f"image_backbone: {backbone_images} real images vs GridImageBackbone ...")
        spec = manifest.pixel_spec()
        count = min(backbone_images, len(data.names))
        pixels = np.stack([to_pixels(read_image_file(data.image_path(i)), spec) for i in range(count)])
        with torch.no_grad():
            ref_regions, ref_boxes, _ = (t.numpy() for t in source.graphs["image_backbone"].module(torch.from_numpy(pixels)))
            ref_pipeline = source.graphs["image_encoder"].module(
                torch.from_numpy(ref_regions), torch.from_numpy(ref_boxes), torch.ones(ref_regions.shape[:2], dtype=torch.bool)
            )
        for precision in ("fp32", "fp16"):
            regions, boxes, mask = ort_session(manifest.graph_path(model_dir, "image_backbone", precision), threads).run(
                None, {"pixels": pixels}
            )
            encoder = ort_session(manifest.graph_path(model_dir, "image_encoder", precision), threads)
            pipeline = encoder.run(["global", "concepts", "concept_mask"], dict(zip(image_inputs, (regions, boxes, mask), strict=True)))
            diff = float(np.abs(ref_regions - regions).max())
            report[precision]["backbone"] = {
                "images": count,
                "regions_max_abs_diff": diff,
                "regions_max_abs": float(np.abs(ref_regions).max()),
                "regions_max_rel_diff": diff / max(1e-12, float(np.abs(ref_regions).max())),
                "boxes_max_abs_diff": float(np.abs(ref_boxes - boxes).max()),
                "pipeline": _diffs(tuple(t.numpy() for t in ref_pipeline), pipeline),
            }

    for precision, targets in TARGETS.items():
        checks = {key: report[precision][key] <= limit_ for key, limit_ in targets.items()}
        checks["masks_equal"] = report[precision]["text"]["masks_equal"] and report[precision]["image"]["masks_equal"]
        report[precision]["targets"] = targets
        report[precision]["pass"] = all(checks.values())

    return {
        "model_dir": str(model_dir),
        "model": {"name": manifest.model_name, "version": manifest.model_version},
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "split": split,
        "n_images": len(data.names),
        "n_captions": len(captions),
        "alignment_mode": mode,
        "blend_weight": manifest.blend_weight,
        "hub_penalty": hub.describe() if hub else None,
        "torch_rsum": {name: retrieval["torch"][name]["rsum"] for name in ("alignment", "global")},
        "torch_recall": retrieval["torch"],
        **report,
        "pass": report["fp32"]["pass"] and report["fp16"]["pass"],
        "providers": ["CPUExecutionProvider"],
        "seconds_encoding": timings,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="model directory written by python -m export")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from (sha256 must match)")
    parser.add_argument("--output", default=None, help="write the JSON report here (e.g. reports/export-parity.json)")
    parser.add_argument("--split", default="dev", help="Flickr8k split (default dev)")
    parser.add_argument("--data-dir", default=None, help="Flickr8k-style folder (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--batch-size", type=int, default=128, help="items per ORT / torch call (default 128)")
    parser.add_argument("--backbone-images", type=int, default=8, help="real images for the image_backbone check (default 8)")
    parser.add_argument(
        "--mode", default=None, choices=["MrSw", "MwSr", "symm", "MrAVGw"], help="alignment score (default: the manifest's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's choice)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be >= 1")
    command = "python -m export.parity " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = run_parity(
            args.model_dir,
            args.checkpoint,
            split=args.split,
            data_dir=args.data_dir,
            limit=args.limit,
            batch_size=args.batch_size,
            backbone_images=args.backbone_images,
            mode=args.mode,
            threads=args.threads,
        )
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"command": command, **result}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for precision in ("fp32", "fp16"):
        r = result[precision]
        line = (
            f"{precision}: text max|diff| {r['text_max_abs_diff']:.2e}, image {r['image_max_abs_diff']:.2e}, "
            f"rsum alignment {r['rsum']['alignment']['ort']:.2f} ({r['rsum']['alignment']['delta']:+.2f}), "
            f"global {r['rsum']['global']['ort']:.2f} ({r['rsum']['global']['delta']:+.2f})"
        )
        if "backbone" in r:
            line += f", backbone regions {r['backbone']['regions_max_abs_diff']:.2e}"
        print(line + ("  PASS" if r["pass"] else "  MISSED TARGETS"))
    print(
        f"torch rsum: alignment {result['torch_rsum']['alignment']:.2f}, global {result['torch_rsum']['global']:.2f} "
        f"({result['n_images']} images, {result['n_captions']} captions, {result['seconds']:.0f}s)"
    )
    if args.output:
        print(f"report: {args.output}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
