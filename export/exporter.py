"""ExportSource -> a model directory: ONNX graphs (fp32 + fp16 + int8), tokenizer, Triton repository, manifest.

Everything is written into a temporary sibling folder (`.NAME.partial-XXXX`) that is renamed
onto the target only once the manifest is written and verified, so a failure (or a full
disk) never leaves a half-written directory that looks like a model.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.sources import ExportSource, GraphModule
from teran.errors import TeranInputError
from teran.manifest import (
    MANIFEST_FILE,
    GraphEntry,
    Limits,
    Manifest,
    ManifestError,
    SourceCheckpoint,
    TensorSpec,
    load_manifest,
    read_manifest_file,
    write_manifest,
)

ORT_LEVELS = {
    "none": None,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}
# int8 recipes of the image_encoder graph (export/quantize.py); the first is the default
INT8_IMAGE_ENCODER_RECIPES = ("mixed", "dynamic", "static")
# Ops kept in fp32 in the fp16 graphs (numerically sensitive reductions), on top of
# onnxruntime's own list of ops without fp16 kernels.
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Erf"]
FP32_CHECK_TOLERANCE = 1e-4  # max |torch - ORT| / max(1, max |torch|) on the check inputs
FP16_CHECK_TOLERANCE = 2e-2
ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


class ExportError(TeranInputError):
    """The export cannot proceed (target directory, disk, a graph that does not reproduce torch)."""


Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- target directory


def check_target(out: Path, source: ExportSource, name: str, version: int, force: bool) -> str:
    """Decide whether `out` may be (re)written: 'new', 'replace-same', 'replace-forced'; else raise ExportError."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    try:
        existing = read_manifest_file(out)
    except ManifestError as exc:
        if force:
            return "replace-forced"
        raise ExportError(
            f"{out}: directory is not empty and holds no valid model ({exc}); choose another --output or pass --force to replace it"
        ) from None
    same = existing.source.sha256 == source.checkpoint_sha256 and existing.model_name == name and existing.model_version == version
    if same:
        return "replace-same"
    if force:
        return "replace-forced"
    raise ExportError(
        f"{out}: already holds a different model ({existing.model_name} version {existing.model_version} from checkpoint "
        f"sha256 {existing.source.sha256[:12]}...); this export is {name} version {version} from sha256 "
        f"{source.checkpoint_sha256[:12]}.... Choose another --output or pass --force to replace it"
    )


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- graphs

# torch.onnx builds its op registry once per export and logs a warning for each torchvision op it
# cannot register without torchvision (nms, roi_align, roi_pool, deform_conv2d): 12 lines for the
# three graphs. These models use no torchvision op, so exactly that message is dropped.
TORCH_ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
TORCHVISION_SKIP_MESSAGE = "torchvision is not installed. Skipping %s"


class _DropTorchvisionSkip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != TORCHVISION_SKIP_MESSAGE


_DROP_TORCHVISION_SKIP = _DropTorchvisionSkip()


@contextlib.contextmanager
def quiet_torchvision_skip():
    """Drop torch.onnx's "torchvision is not installed. Skipping torchvision::..." warnings meanwhile."""
    logger = logging.getLogger(TORCH_ONNX_REGISTRY_LOGGER)
    logger.addFilter(_DROP_TORCHVISION_SKIP)
    try:
        yield
    finally:
        logger.removeFilter(_DROP_TORCHVISION_SKIP)


def export_onnx(graph: GraphModule, path: Path) -> None:
    """torch.onnx.export(dynamo=True) with dynamic batch and length axes, as one self-contained file."""
    with warnings.catch_warnings(), quiet_torchvision_skip(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph.module.eval(),
            graph.example,
            dynamo=True,
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_shapes=graph.dynamic_shapes,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def ort_optimise(src: Path, dst: Path, level: str) -> None:
    """ONNX Runtime offline graph optimisation (CPU session, saved optimised model)."""
    if ORT_LEVELS[level] is None:
        shutil.copyfile(src, dst)
        return
    options = ort.SessionOptions()
    options.graph_optimization_level = ORT_LEVELS[level]
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
        first = (str(exc).splitlines() or [""])[0]
        raise ExportError(f"{dst}: onnxruntime could not optimise or save the graph ({type(exc).__name__}: {first})") from exc
    if not dst.is_file():
        raise ExportError(f"{dst}: onnxruntime did not write the optimised model")


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 graph inputs/outputs; FP32_OPS stay in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP32_OPS)
    topological_sort(half.graph)  # the converter appends its Cast nodes out of order
    onnx.save(half, str(dst))


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs (Kahn)."""
    available = {""} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    available |= {i.name for i in graph.sparse_initializer}
    pending = list(graph.node)
    ordered = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.input if n not in available})[:5]
            raise ExportError(f"fp16 graph has a cycle or undefined inputs {missing}")
        pending = remaining
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        t = value.type.tensor_type
        if t.elem_type not in ONNX_DTYPES:
            raise ExportError(f"graph value {value.name} has an unsupported element type {t.elem_type}")
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
        specs.append(TensorSpec(value.name, ONNX_DTYPES[t.elem_type], shape))
    return specs


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(graph: GraphModule, reference: tuple[torch.Tensor, ...], outputs: list[np.ndarray], scaled: bool = False) -> float:
    """Largest |torch - ORT| over float outputs; concept rows compared where the (torch) mask is True.

    With `scaled`, each output's diff is divided by max(1, max |torch output|) (backbone features
    are not normalised: EfficientNet activations reach ~6).
    """
    names = graph.output_names
    mask = None
    if graph.mask_output:
        mask = reference[names.index(graph.mask_output)].numpy().astype(bool)
    worst = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        ref = ref.numpy()
        if ref.dtype == np.bool_ or not np.issubdtype(ref.dtype, np.floating):
            if not np.array_equal(ref.astype(np.int64), np.asarray(out).astype(np.int64)):
                return float("inf")
            continue
        diff = np.abs(ref.astype(np.float32) - np.asarray(out, dtype=np.float32))
        if mask is not None and diff.ndim == 3 and diff.shape[:2] == mask.shape:
            diff = diff[mask]
        if diff.size:
            scale = max(1.0, float(np.abs(ref).max())) if scaled else 1.0
            worst = max(worst, float(np.nanmax(diff)) / scale if not np.isnan(diff).all() else float("inf"))
    return worst


def check_graph(graph: GraphModule, path: Path) -> tuple[float, float]:
    """Run ORT on the graph's check inputs (other batch sizes and lengths than the export example).

    Returns (max abs diff, max diff scaled by the output magnitude) against torch.
    """
    session = _session(path)
    worst, worst_scaled = 0.0, 0.0
    for inputs in graph.checks:
        with torch.no_grad():
            reference = graph.module(*inputs)
        feeds = {name: tensor.numpy() for name, tensor in zip(graph.input_names, inputs, strict=True)}
        outputs = session.run(graph.output_names, feeds)
        worst = max(worst, max_abs_diff(graph, reference, outputs))
        worst_scaled = max(worst_scaled, max_abs_diff(graph, reference, outputs, scaled=True))
    return worst, worst_scaled


def _quantize_all(
    source: ExportSource,
    tmp: Path,
    entries: dict[str, GraphEntry],
    checks: dict[str, dict],
    pixels: np.ndarray | None,
    note: str | None,
    say: Progress,
    image_encoder: str = "mixed",
) -> dict:
    """Write `<graph>.int8.onnx` beside each fp32 graph (export.quantize recipes); fills entries / checks."""
    from export import quantize

    backbone = source.graphs.get("image_backbone")
    if pixels is None and backbone is not None:
        pixels = np.concatenate([t[0].numpy() for t in [backbone.example, *backbone.checks]])
        note = "synthetic: the backbone graph's example and check inputs (no calibration photos given)"
    recipes = {}
    for graph_name, entry in entries.items():
        t0 = time.monotonic()
        src, dst = tmp / entry.fp32, tmp / f"{graph_name}.int8.onnx"
        if graph_name == "text_encoder":
            quantize.quantize_dynamic_graph(src, dst, exclude=quantize.text_fp32_matmuls(src))
            recipe = quantize.RECIPES["text_encoder"]
        elif graph_name == "image_backbone" and pixels is not None:
            exclude = quantize.backbone_fp32_convs(src)
            quantize.quantize_static_graph(src, dst, quantize.backbone_feeds(pixels), exclude=exclude, percentile=True)
            recipe = quantize.RECIPES["image_backbone"]
        elif graph_name == "image_encoder" and image_encoder != "dynamic" and pixels is not None and "image_backbone" in entries:
            names = [t.name for t in entry.inputs]
            feeds = quantize.encoder_feeds_from_backbone(tmp / entries["image_backbone"].fp32, pixels, names)
            if image_encoder == "static":
                quantize.quantize_static_graph(src, dst, feeds)
                recipe = quantize.RECIPES["image_encoder (static)"]
            else:
                quantize.quantize_mixed_encoder(src, dst, feeds)
                recipe = quantize.RECIPES["image_encoder"]
        else:  # image_encoder: dynamic (also without a backbone to calibrate with)
            quantize.quantize_dynamic_graph(src, dst, op_types=["MatMul", "Gemm"])
            recipe = quantize.RECIPES["image_encoder (dynamic)"]
        onnx.checker.check_model(str(dst))
        diff, scaled = check_graph(source.graphs[graph_name], dst)
        if not np.isfinite(scaled):
            raise ExportError(f"{graph_name}: the int8 ONNX graph gives non-finite or wrong-typed outputs on the check inputs")
        checks[graph_name].update({"int8_max_abs_diff": diff, "int8_max_scaled_diff": scaled})
        entry.int8 = dst.name
        recipes[graph_name] = recipe
        say(
            f"      {dst.name} {dst.stat().st_size / 1e6:.1f} MB ({recipe['method']} {recipe['format']}), check vs torch {diff:.2e} "
            f"({time.monotonic() - t0:.0f}s)"
        )
    return {
        "method": "onnxruntime.quantization (export/quantize.py)",
        "recipes": recipes,
        "calibration": note if pixels is not None else None,
        "calibration_images": None if pixels is None else len(pixels),
    }


# --------------------------------------------------------------------------- the whole directory


def export_model_dir(
    source: ExportSource,
    out: str | Path,
    *,
    name: str | None = None,
    version: int = 1,
    max_batch: int = 64,
    ort_level: str = "basic",
    triton: bool = True,
    triton_device: str = "gpu",
    triton_instances: int = 1,
    triton_precision: str = "fp32",
    force: bool = False,
    command: str | None = None,
    progress: Progress | None = _stderr,
    int8: bool = True,
    calibration_pixels: np.ndarray | None = None,
    calibration_note: str | None = None,
    int8_image_encoder: str = "mixed",
) -> Manifest:
    """Write a complete model directory at `out` (atomically) and return its manifest.

    With `int8`, each graph also gets an ONNX Runtime int8 variant (export.quantize): static
    graphs are calibrated on `calibration_pixels` (backbone input pixels, e.g. training photos);
    without them, on the graphs' own example and check inputs (random: fine for tests, not for
    a served model).
    """
    from export import triton as triton_repo

    say = progress or (lambda _message: None)
    out = Path(out).absolute()
    name = name or source.default_name
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ExportError(f"invalid model name {name!r}")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"model version must be an integer >= 1 (Triton version folder), got {version!r}")
    if max_batch < 1:
        raise ExportError(f"max batch must be >= 1, got {max_batch}")
    if int8_image_encoder not in INT8_IMAGE_ENCODER_RECIPES:
        raise ExportError(f"int8 image encoder recipe must be one of {', '.join(INT8_IMAGE_ENCODER_RECIPES)}, got {int8_image_encoder!r}")
    if ort_level not in ORT_LEVELS:
        raise ExportError(f"unknown ORT optimisation level {ort_level!r}; choose one of {sorted(ORT_LEVELS)}")
    if not source.tokenizer_file.is_file():
        raise ExportError(f"{source.tokenizer_file}: tokenizer file does not exist")
    decision = check_target(out, source, name, version, force)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    started = time.monotonic()
    steps = len(source.graphs) + 2
    try:
        entries: dict[str, GraphEntry] = {}
        checks: dict[str, dict[str, float]] = {}
        raw_dir = tmp / ".raw"
        raw_dir.mkdir()
        for index, (graph_name, graph) in enumerate(source.graphs.items(), start=1):
            t0 = time.monotonic()
            say(f"[{index}/{steps}] {graph_name}: torch.onnx.export(dynamo=True) ...")
            raw = raw_dir / f"{graph_name}.onnx"
            export_onnx(graph, raw)
            fp32 = f"{graph_name}.fp32.onnx"
            fp16 = f"{graph_name}.fp16.onnx"
            ort_optimise(raw, tmp / fp32, ort_level)
            raw.unlink()
            convert_fp16(tmp / fp32, tmp / fp16)
            model = onnx.load(str(tmp / fp32), load_external_data=False)
            onnx.checker.check_model(str(tmp / fp32))
            onnx.checker.check_model(str(tmp / fp16))
            diff32, scaled32 = check_graph(graph, tmp / fp32)
            diff16, scaled16 = check_graph(graph, tmp / fp16)
            if not scaled32 <= FP32_CHECK_TOLERANCE:
                raise ExportError(
                    f"{graph_name}: the fp32 ONNX graph does not reproduce torch (max scaled diff {scaled32:.3g} > {FP32_CHECK_TOLERANCE})"
                )
            if not scaled16 <= FP16_CHECK_TOLERANCE:
                raise ExportError(
                    f"{graph_name}: the fp16 ONNX graph does not reproduce torch (max scaled diff {scaled16:.3g} > {FP16_CHECK_TOLERANCE})"
                )
            checks[graph_name] = {
                "fp32_max_abs_diff": diff32,
                "fp16_max_abs_diff": diff16,
                "fp32_max_scaled_diff": scaled32,
                "fp16_max_scaled_diff": scaled16,
                "inputs": [[list(t.shape) for t in inputs] for inputs in graph.checks],
            }
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
            entries[graph_name] = GraphEntry(
                fp32=fp32,
                fp16=fp16,
                inputs=tensor_specs(model.graph.input),
                outputs=tensor_specs(model.graph.output),
                ort_optimization=ort_level,
                opset=opset,
            )
            say(
                f"      {fp32} {(tmp / fp32).stat().st_size / 1e6:.1f} MB, {fp16} {(tmp / fp16).stat().st_size / 1e6:.1f} MB, "
                f"ORT '{ort_level}', check vs torch: fp32 {diff32:.2e}, fp16 {diff16:.2e} ({time.monotonic() - t0:.0f}s)"
            )
        raw_dir.rmdir()
        int8_info = None
        if int8:
            say(f"      int8: ONNX Runtime quantization of {len(entries)} graphs ...")
            int8_info = _quantize_all(source, tmp, entries, checks, calibration_pixels, calibration_note, say, int8_image_encoder)
        tokenizer_name = "tokenizer.json"
        shutil.copyfile(source.tokenizer_file, tmp / tokenizer_name)
        hub_penalty = source.hub_reference.save(tmp) if source.hub_reference is not None else None
        manifest = Manifest(
            model_name=name,
            model_version=version,
            source=SourceCheckpoint(
                path=str(source.checkpoint.absolute()),
                sha256=source.checkpoint_sha256,
                kind=source.kind,
                size=source.checkpoint.stat().st_size,
            ),
            joint_dim=source.joint_dim,
            limits=Limits(max_tokens=source.max_tokens, max_regions=source.max_regions, max_batch=max_batch),
            tokenizer_file=tokenizer_name,
            preprocessing=source.preprocessing,
            alignment_mode=source.alignment_mode,
            concept_mode=source.concept_mode,
            blend_weight=source.blend_weight,
            hub_penalty=hub_penalty,
            graphs=entries,
            extra={
                **source.extra,
                "export_checks": checks,
                "fp16": {"method": "onnxruntime.transformers.float16, keep_io_types=True", "fp32_ops": FP32_OPS},
                **({"int8": int8_info} if int8_info else {}),
                "ort_optimization_note": (
                    "offline optimisation on the CPU EP; 'basic' rewrites keep standard ONNX ops (portable to CUDA/TensorRT/Triton)"
                ),
                "exporter": {
                    "command": command,
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                    "python": sys.version.split()[0],
                },
            },
        )
        if triton:
            say(f"[{steps - 1}/{steps}] Triton model repository ({triton_device}) ...")
            manifest.extra["triton"] = triton_repo.write_repository(
                tmp, manifest, device=triton_device, instances=triton_instances, precision=triton_precision
            )
        say(f"[{steps}/{steps}] manifest + checksums ...")
        write_manifest(tmp, manifest)
        load_manifest(tmp, verify=True)
        _swap_into_place(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, TeranInputError):
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise ExportError(f"{out}: export failed while writing files ({reason}); nothing was written to {out}") from exc
        raise
    manifest = load_manifest(out, verify=False)
    say(f"done in {time.monotonic() - started:.0f}s ({decision})")
    return manifest


def summary(manifest: Manifest, out: Path) -> str:
    lines = [
        f"model directory: {out}",
        f"  model {manifest.model_name} version {manifest.model_version} ({manifest.source.kind} checkpoint "
        f"{manifest.source.sha256[:12]}...), joint_dim {manifest.joint_dim}, alignment {manifest.alignment_mode}, "
        f"concepts {manifest.concept_mode}",
        f"  limits: max_tokens {manifest.limits.max_tokens}, max_regions {manifest.limits.max_regions}, "
        f"max_batch {manifest.limits.max_batch}",
    ]
    checks = manifest.extra.get("export_checks", {})
    for graph_name, entry in manifest.graphs.items():
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in entry.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in entry.outputs)
        c = checks.get(graph_name, {})
        int8 = f" / {entry.int8} ({manifest.files[entry.int8].size / 1e6:.1f} MB)" if entry.int8 else ""
        int8_diff = f", int8 {c['int8_max_abs_diff']:.1e}" if "int8_max_abs_diff" in c else ""
        lines.append(
            f"  {graph_name}: {entry.fp32} ({manifest.files[entry.fp32].size / 1e6:.1f} MB) / {entry.fp16} "
            f"({manifest.files[entry.fp16].size / 1e6:.1f} MB){int8}, opset {entry.opset}, ORT {entry.ort_optimization}; "
            f"max |ORT - torch| fp32 {c.get('fp32_max_abs_diff', float('nan')):.1e}, fp16 {c.get('fp16_max_abs_diff', float('nan')):.1e}"
            f"{int8_diff}"
        )
        lines.append(f"      in: {ins}")
        lines.append(f"      out: {outs}")
    triton = manifest.extra.get("triton")
    if triton:
        lines.append(f"  triton repository: {out / triton['repository']} (models: {', '.join(triton['models'])})")
    lines.append(f"  {len(manifest.files)} files checksummed in {MANIFEST_FILE}")
    return "\n".join(lines)
