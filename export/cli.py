"""`python -m export`: a training checkpoint (ours or an original TERAN one) -> a model directory.

The directory holds one ONNX graph per branch (text_encoder, image_encoder and, for our
checkpoints, image_backbone) in fp32, fp16 and int8, the tokenizer, a Triton model repository under
triton/, and manifest.json (shapes, limits, preprocessing, checksums). It is written to a
temporary sibling folder and renamed into place at the end. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from teran.errors import TeranInputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=(
            "example: python -m export --checkpoint models/teran-flickr8k.pt --output artifacts/teran-flickr8k\n"
            "then:    python -m export.parity --model-dir artifacts/teran-flickr8k --checkpoint models/teran-flickr8k.pt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt of this project, or an original TERAN .pth.tar)")
    parser.add_argument("--output", required=True, help="model directory to create (refused if it holds a different model, unless --force)")
    parser.add_argument(
        "--checkpoint-kind",
        default="auto",
        choices=["auto", "project", "original"],
        help="auto (default) detects our checkpoints; 'original' loads an authors' TERAN checkpoint, which unpickles "
        "Python objects: use it only for trusted files",
    )
    parser.add_argument("--name", default=None, help="model name (default: the checkpoint file name without extension)")
    parser.add_argument("--version", type=int, default=1, help="model version, an integer >= 1 (Triton version folder; default 1)")
    parser.add_argument(
        "--max-batch", type=int, default=64, help="largest batch a server should send (manifest + Triton max_batch_size; default 64)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="word pieces per caption incl. [CLS]/[SEP] (default: the model config's)"
    )
    parser.add_argument("--max-regions", type=int, default=None, help="regions per image (default: the model config's)")
    parser.add_argument("--alignment-mode", default=None, choices=["MrSw", "MwSr", "symm", "MrAVGw"], help="default: the training config's")
    parser.add_argument(
        "--ort-opt-level",
        default="basic",
        choices=["none", "basic", "extended"],
        help="ONNX Runtime offline graph optimisation saved into the files (default basic: standard ONNX ops only, "
        "portable to CUDA/TensorRT/Triton; extended adds CPU/CUDA-specific fused ops)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json to ship (default: all-MiniLM-L6-v2's, the uncased BERT vocabulary)"
    )
    parser.add_argument("--no-backbone", action="store_true", help="do not export the image_backbone graph (pixels -> regions)")
    parser.add_argument("--no-int8", action="store_true", help="do not write the int8 (ONNX Runtime quantized, CPU serving) graphs")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=64,
        help="Flickr8k training photos calibrating the static int8 graphs (image_backbone, image_encoder; default 64); "
        "0: the graphs' random example inputs (tests only)",
    )
    parser.add_argument(
        "--int8-image-encoder",
        default="mixed",
        choices=["mixed", "dynamic", "static"],
        help="int8 recipe of the image_encoder graph: mixed (default: static QDQ convs except the depthwise ones, "
        "calibrated on the backbone's regions, + dynamic MatMul), dynamic (MatMul only; slower) or static QDQ of every op "
        "(fastest, least accurate); see export/quantize.py",
    )
    parser.add_argument(
        "--data-dir", default=None, help="Flickr8k-style folder for calibration (default: $TERAN_FLICKR8K_DIR or ../shared/data/flickr8k)"
    )
    parser.add_argument("--no-triton", action="store_true", help="do not write the Triton model repository")
    parser.add_argument(
        "--triton-precision",
        default="fp32",
        choices=["fp32", "int8"],
        help="graph files the Triton models link (default fp32; int8 with --triton-device cpu: Triton's ONNX Runtime "
        "backend runs the quantized graphs on the CPU)",
    )
    parser.add_argument(
        "--triton-device",
        default="gpu",
        choices=["gpu", "cpu"],
        help="Triton instance kind (gpu adds the TensorRT accelerator; default gpu)",
    )
    parser.add_argument("--triton-instances", type=int, default=1, help="Triton instances per model (default 1)")
    parser.add_argument("--force", action="store_true", help="replace an output directory that holds another model or other files")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the summary is still printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.calibration_images < 0:
        parser.error("--calibration-images must be >= 0")
    if args.triton_precision == "int8" and (args.triton_device != "cpu" or args.no_int8):
        parser.error("--triton-precision int8 needs --triton-device cpu and the int8 graphs (no --no-int8)")
    if args.max_batch < 1 or args.version < 1 or args.triton_instances < 1:
        parser.error("--max-batch, --version and --triton-instances must be >= 1")
    if (args.max_tokens is not None and args.max_tokens < 3) or (args.max_regions is not None and args.max_regions < 1):
        parser.error("--max-tokens must be >= 3 and --max-regions >= 1")
    command = "python -m export " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        from export.exporter import check_target, export_model_dir, summary
        from export.sources import load_source

        checkpoint = Path(args.checkpoint)
        say(f"loading {checkpoint} ({args.checkpoint_kind}) ...")
        source = load_source(
            checkpoint,
            args.checkpoint_kind,
            tokenizer_file=args.tokenizer,
            max_tokens=args.max_tokens,
            max_regions=args.max_regions,
            alignment_mode=args.alignment_mode,
            with_backbone=not args.no_backbone,
        )
        name = args.name or source.default_name
        check_target(Path(args.output).absolute(), source, name, args.version, args.force)  # fail before the slow part
        pixels, note = None, None
        if not args.no_int8 and args.calibration_images and "image_backbone" in source.graphs:
            from export.quantize import calibration_pixels

            say(f"int8 calibration: {args.calibration_images} Flickr8k training photos ...")
            pixels = calibration_pixels(args.calibration_images, "train", spec=source.preprocessing.pixel_spec(), data_dir=args.data_dir)
            note = f"{len(pixels)} Flickr8k training photos (fixed random draw, seed 0)"
        manifest = export_model_dir(
            source,
            args.output,
            name=name,
            version=args.version,
            max_batch=args.max_batch,
            ort_level=args.ort_opt_level,
            triton=not args.no_triton,
            triton_device=args.triton_device,
            triton_instances=args.triton_instances,
            triton_precision=args.triton_precision,
            force=args.force,
            int8=not args.no_int8,
            calibration_pixels=pixels,
            calibration_note=note,
            int8_image_encoder=args.int8_image_encoder,
            command=command,
            progress=say,
        )
    except TeranInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest, Path(args.output).absolute()))
    return 0
