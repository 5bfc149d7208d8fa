"""Triton Inference Server model repository for a model directory (torch-free).

    <model_dir>/triton/
        text_encoder/config.pbtxt, 1/model.onnx, warmup/...
        image_encoder/config.pbtxt, 1/model.onnx, warmup/...
        image_backbone/config.pbtxt, 1/model.onnx
        image_pipeline/config.pbtxt, 1/            (ensemble: image_backbone -> image_encoder)

Each ONNX model: platform onnxruntime_onnx, max_batch_size, dynamic batching, instance group,
variable dims (-1), warm-up requests, and (GPU) the TensorRT execution accelerator with FP16,
workspace size, engine cache and shape profiles. `model.onnx` is a hard link to the fp32 graph
of the model directory (a copy where links are impossible); TensorRT builds the FP16 engine.

Check a generated repository against Triton's own ModelConfig protobuf (from `tritonclient`,
part of the `serve` extra):

    python -m export.triton validate <model_dir>/triton
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from teran.manifest import Manifest, TensorSpec

REPOSITORY = "triton"
ENGINE_CACHE_ROOT = "/tmp/triton-trt-cache"  # inside the Triton container; mount a volume here to keep engines
WORKSPACE_BYTES = 2 << 30
QUEUE_DELAY_US = 2000
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4", "bool": "|b1"}
OPT_REGIONS = 49  # TensorRT's optimum region count for a model without a backbone grid: as for the usual 7 x 7 one


def _preferred_batches(max_batch: int) -> list[int]:
    sizes = [b for b in (4, 8, 16, 32, 64, 128) if b <= max_batch]
    return sizes or [max_batch]


def _dims(spec: TensorSpec) -> list[int]:
    """Triton dims without the batch axis; symbolic axes become -1."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in spec.shape[1:]]


def _fmt_dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _io_block(kind: str, specs: list[TensorSpec]) -> str:
    items = [f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_DTYPES[s.dtype]}\n    dims: {_fmt_dims(_dims(s))}\n  }}' for s in specs]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _concrete(spec: TensorSpec, sizes: dict[str, int]) -> list[int]:
    """Per-sample shape (no batch) with symbolic axes resolved from `sizes` (e.g. tokens -> 16)."""
    dims = []
    for d in spec.shape[1:]:
        if isinstance(d, int) and d > 0:
            dims.append(d)
        else:
            dims.append(_symbol_size(str(d), sizes))
    return dims


def _symbol_size(symbol: str, sizes: dict[str, int]) -> int:
    """Resolve 'tokens', 'regions' or the offsets the exporter emits such as 'tokens - 1'."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:([+-])\s*(\d+))?\s*", symbol)
    if not match or match.group(1) not in sizes:
        return sizes.get("default", 1)
    value = sizes[match.group(1)]
    if match.group(2):
        value = value + int(match.group(3)) if match.group(2) == "+" else value - int(match.group(3))
    return max(1, value)


def _profile(specs: list[TensorSpec], batch: int, sizes: dict[str, int]) -> str:
    return ",".join(f"{s.name}:" + "x".join(str(d) for d in [batch, *_concrete(s, sizes)]) for s in specs)


def typical_regions(manifest: Manifest) -> int:
    """Regions per image to optimise for: the exact count the model takes or its backbone grid's cells,
    else OPT_REGIONS; at most limits.max_regions."""
    pre = manifest.preprocessing
    return min(pre.region_count or pre.grid_regions or OPT_REGIONS, manifest.limits.max_regions)


def trt_profiles(graph: str, manifest: Manifest) -> dict[str, str]:
    """TensorRT optimisation profile (min / opt / max shapes) for the graph's inputs."""
    inputs = manifest.graph(graph).inputs
    limits = manifest.limits
    opt_batch = min(32, limits.max_batch)
    low = {"tokens": 3, "regions": 1, "default": 1}
    opt = {"tokens": min(32, limits.max_tokens), "regions": typical_regions(manifest), "default": 1}
    high = {"tokens": limits.max_tokens, "regions": limits.max_regions, "default": 1}
    return {
        "trt_profile_min_shapes": _profile(inputs, 1, low),
        "trt_profile_opt_shapes": _profile(inputs, opt_batch, opt),
        "trt_profile_max_shapes": _profile(inputs, limits.max_batch, high),
    }


def _warmup(graph: str, specs: list[TensorSpec], manifest: Manifest, model_dir: Path) -> str:
    """One warm-up request at a typical shape. Masks are ones (a fully padded row is NaN in the
    transformer), token ids zeros ([PAD], always in the vocabulary), floats random."""
    regions = manifest.preprocessing.warmup_regions(manifest.limits.max_regions)
    sizes = {"tokens": min(16, manifest.limits.max_tokens), "regions": regions, "default": 1}
    batch = min(8, manifest.limits.max_batch)
    blocks = []
    for spec in specs:
        dims = _concrete(spec, sizes)
        if spec.name in ("attention_mask", "region_mask"):
            count = 1
            for d in dims:
                count *= d
            data_file = f"{spec.name}_ones"
            warm = model_dir / "warmup"
            warm.mkdir(parents=True, exist_ok=True)
            one = {"int64": (1).to_bytes(8, "little"), "int32": (1).to_bytes(4, "little"), "bool": b"\x01"}[spec.dtype]
            (warm / data_file).write_bytes(one * count)
            source = f'input_data_file: "{data_file}"'
        elif spec.dtype in ("int64", "int32"):
            source = "zero_data: true"
        elif spec.name == "image_sizes":
            source = "random_data: true"
        else:
            source = "random_data: true"
        blocks.append(
            f'    inputs {{\n      key: "{spec.name}"\n      value {{\n        data_type: {TRITON_DTYPES[spec.dtype]}\n'
            f"        dims: {_fmt_dims(dims)}\n        {source}\n      }}\n    }}"
        )
    return f'model_warmup [\n  {{\n    name: "{graph}_warmup"\n    batch_size: {batch}\n' + "\n".join(blocks) + "\n  }\n]\n"


def _accelerator(graph: str, manifest: Manifest) -> str:
    params = {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(WORKSPACE_BYTES),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{ENGINE_CACHE_ROOT}/{manifest.model_name}-v{manifest.model_version}/{graph}",
        "trt_timing_cache_enable": "1",
        "trt_layer_norm_fp32_fallback": "1",
        **trt_profiles(graph, manifest),
    }
    lines = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [\n      {\n"
        f'        name : "tensorrt"\n{lines}\n      }}\n    ]\n  }}\n}}\n'
    )


def model_config(graph: str, manifest: Manifest, model_dir: Path, device: str = "gpu", instances: int = 1) -> str:
    entry = manifest.graph(graph)
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    text = (
        f'name: "{graph}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {manifest.limits.max_batch}\n'
        + _io_block("input", entry.inputs)
        + _io_block("output", entry.outputs)
        + "dynamic_batching {\n"
        + f"  preferred_batch_size: {_fmt_dims(_preferred_batches(manifest.limits.max_batch))}\n"
        + f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
        + _warmup(graph, entry.inputs, manifest, model_dir)
    )
    if device == "gpu":
        text += _accelerator(graph, manifest)
    return text


def ensemble_config(manifest: Manifest) -> str:
    backbone = manifest.graph("image_backbone")
    encoder = manifest.graph("image_encoder")
    pixels = backbone.inputs[0]
    produced = {s.name for s in backbone.outputs}
    needed = [s.name for s in encoder.inputs]
    missing = [n for n in needed if n not in produced]
    if missing:
        raise ValueError(f"image_backbone does not produce {missing} needed by image_encoder")
    inner = "\n".join(f'      output_map {{ key: "{n}" value: "_{n}" }}' for n in sorted(produced))
    feed = "\n".join(f'      input_map {{ key: "{n}" value: "_{n}" }}' for n in needed)
    outs = "\n".join(f'      output_map {{ key: "{s.name}" value: "{s.name}" }}' for s in encoder.outputs)
    return (
        f'name: "image_pipeline"\nplatform: "ensemble"\nmax_batch_size: {manifest.limits.max_batch}\n'
        + _io_block("input", [pixels])
        + _io_block("output", encoder.outputs)
        + "ensemble_scheduling {\n  step [\n"
        + '    {\n      model_name: "image_backbone"\n      model_version: -1\n'
        + f'      input_map {{ key: "{pixels.name}" value: "{pixels.name}" }}\n{inner}\n    }},\n'
        + f'    {{\n      model_name: "image_encoder"\n      model_version: -1\n{feed}\n{outs}\n    }}\n'
        + "  ]\n}\n"
    )


def _link_or_copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def write_repository(
    model_dir: str | Path, manifest: Manifest, *, device: str = "gpu", instances: int = 1, precision: str = "fp32"
) -> dict:
    """Write `<model_dir>/triton/`; returns the description recorded in the manifest's extra."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"triton device must be 'gpu' or 'cpu', got {device!r}")
    root = Path(model_dir) / REPOSITORY
    root.mkdir(exist_ok=True)
    models, how = [], set()
    version = str(manifest.model_version)
    for graph in manifest.graphs:
        folder = root / graph
        how.add(_link_or_copy(Path(model_dir) / manifest.graph(graph).file(precision), folder / version / "model.onnx"))
        (folder / "config.pbtxt").write_text(model_config(graph, manifest, folder, device, instances))
        models.append(graph)
    if "image_backbone" in manifest.graphs and "image_encoder" in manifest.graphs:
        folder = root / "image_pipeline"
        (folder / version).mkdir(parents=True, exist_ok=True)
        (folder / version / ".keep").write_text("ensemble models need an (empty) version folder\n")
        (folder / "config.pbtxt").write_text(ensemble_config(manifest))
        models.append("image_pipeline")
    return {
        "repository": REPOSITORY,
        "models": models,
        "device": device,
        "instances": instances,
        "onnx_precision": precision,
        "onnx_files": sorted(how),
        "tensorrt": {"precision_mode": "FP16", "engine_cache": ENGINE_CACHE_ROOT} if device == "gpu" else None,
    }


# --------------------------------------------------------------------------- validation


def parse_config(path: str | Path):
    """Parse a config.pbtxt into tritonclient's ModelConfig protobuf (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def validate_repository(repository: str | Path) -> list[str]:
    """Parse every config.pbtxt and check the files it needs; returns problems (empty = valid)."""
    root = Path(repository)
    problems = []
    configs = sorted(root.glob("*/config.pbtxt"))
    if not configs:
        return [f"{root}: no */config.pbtxt found"]
    names = {p.parent.name for p in configs}
    for path in configs:
        try:
            config = parse_config(path)
        except Exception as exc:  # text_format.ParseError and friends
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        folder = path.parent
        if config.name != folder.name:
            problems.append(f"{path}: name {config.name!r} differs from its folder {folder.name!r}")
        versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            problems.append(f"{folder}: no numeric version folder")
        if config.platform == "ensemble":
            for step in config.ensemble_scheduling.step:
                if step.model_name not in names:
                    problems.append(f"{path}: ensemble step uses unknown model {step.model_name!r}")
            continue
        for version in versions:
            if not (version / "model.onnx").is_file():
                problems.append(f"{version}: model.onnx missing")
        for warm in config.model_warmup:
            for key, value in warm.inputs.items():
                if value.input_data_file and not (folder / "warmup" / value.input_data_file).is_file():
                    problems.append(f"{path}: warm-up input {key} needs warmup/{value.input_data_file}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description="Validate a generated Triton model repository.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="parse every config.pbtxt into Triton's ModelConfig protobuf")
    check.add_argument("repository", help="the triton/ folder of a model directory")
    args = parser.parse_args(argv)
    try:
        problems = validate_repository(args.repository)
    except ImportError as exc:
        print(f"error: needs tritonclient[grpc] (protobuf < 7; install it in its own venv): {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        count = len(list(Path(args.repository).glob("*/config.pbtxt")))
        print(f"ok: {count} model configs in {args.repository} parse as Triton ModelConfig")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
