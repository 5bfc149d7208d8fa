"""The model directory's `manifest.json`: what the exported graphs are and how to feed them.

Torch-free (stdlib only): the encoder service reads a model directory only through this module.

A model directory (written by `python -m export`) holds one ONNX file per graph and precision,
the tokenizer, an optional Triton model repository under `triton/`, and `manifest.json`:

    format / format_version      "teran-model-dir", 1
    model                        name and (integer) version
    created                      UTC time of the export
    source_checkpoint            path, sha256, size and kind ("project" | "original")
    joint_dim, limits            vector size; max_tokens, max_regions, max_batch
    tokenizer_file               the tokenizer.json to use (relative to the directory)
    preprocessing                how to feed the image encoder (`Preprocessing`): PixelSpec fields
                                 and grid of the image backbone, region_dim; region_count and
                                 image_tuned_blocks when the image encoder takes exactly the grid
                                 (a model tuning the trunk's top blocks); the boxes convention
    alignment_mode, concept_mode how to score ("MrSw", ...) and which concepts are words
    blend_weight                 the served ranking: global cosine + w x MrSw
                                 (teran.alignment.blend_scores), w selected on dev in training;
                                 absent: rank by the alignment_mode score alone
    hub_penalty                  the served ranking's hub penalty (teran.hubness): k, weight and
                                 the two reference files (fp16 .npy global vectors of training
                                 photos and captions); absent: no penalty
    graphs                       per graph: fp32 / fp16 / int8 file (int8: ONNX Runtime quantized,
                                 for CPU serving; null or absent when not exported), inputs / outputs (name, dtype,
                                 shape with symbolic dims as strings), ORT optimisation level
    files                        sha256 + size of every file in the directory
    extra                        free-form provenance (backbones, exporter versions, checks)

`load_manifest(dir, verify=True)` refuses a missing or corrupt manifest, an unknown format
version, or any file whose size or sha256 differs, with a `ManifestError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teran.errors import TeranInputError

if TYPE_CHECKING:
    from teran.preprocess import PixelSpec

FORMAT = "teran-model-dir"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRAPHS = ("text_encoder", "image_encoder", "image_backbone")
PRECISIONS = ("fp32", "fp16", "int8")
CHECKPOINT_KINDS = ("project", "original")
CONCEPT_MODES = ("words", "compat")  # words: word pieces minus [CLS]/[SEP]; compat: original TERAN quirk
ALIGNMENT_MODES = ("MrSw", "MwSr", "symm", "MrAVGw")
ORT_LEVELS = ("none", "basic", "extended")
DTYPES = ("float32", "float16", "int64", "int32", "bool")
RESAMPLE_MODES = ("bilinear",)  # what teran.preprocess.to_pixels does
BOXES_NORMALISED = "normalised x1,y1,x2,y2"
BOXES_PIXELS = "pixels x1,y1,x2,y2 (divided by image_sizes inside the graph)"
WARMUP_REGIONS = 36  # a warm-up image's regions where the model takes any count (a bottom-up detector gives 36)


class ManifestError(TeranInputError):
    """A model directory's manifest is missing, corrupt, of another version, or its files changed."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: shape entries are ints or symbolic names such as "batch"."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphEntry:
    fp32: str
    fp16: str | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ort_optimization: str = "basic"
    opset: int | None = None
    int8: str | None = None  # ONNX Runtime quantized graph (CPU serving); absent in older model directories

    def file(self, precision: str = "fp32") -> str:
        if precision not in PRECISIONS:
            raise ManifestError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        name = {"fp32": self.fp32, "fp16": self.fp16, "int8": self.int8}[precision]
        if name is None:
            raise ManifestError(f"no {precision} variant of this graph was exported")
        return name

    def to_dict(self) -> dict:
        return {
            "fp32": self.fp32,
            "fp16": self.fp16,
            "int8": self.int8,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "ort_optimization": self.ort_optimization,
            "opset": self.opset,
        }


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class SourceCheckpoint:
    path: str
    sha256: str
    kind: str = "project"
    size: int | None = None


@dataclass
class Limits:
    max_tokens: int
    max_regions: int
    max_batch: int


def _is_int(value: Any) -> bool:
    """An integer >= 1 (JSON true / false are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_triple(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """The manifest's `preprocessing`: how to feed the image encoder.

    The pixel spec (size, mean, std, resample) and grid describe the image backbone graph; a model
    fed external region features (an original checkpoint) has neither. Fields that are None (and
    image_tuned_blocks 0) are absent from the JSON, in field order, so a manifest is written back
    as it was read.
    """

    size: int | None = None  # the square input side in pixels
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resample: str | None = None  # None: bilinear
    grid: int | None = None  # cells per side of the backbone's output grid; None: regions come from outside
    region_dim: int  # channels per region the image encoder takes
    region_count: int | None = None  # exactly the grid's cells for a model tuning the trunk's top blocks; None: any count
    image_tuned_blocks: int = 0  # the trunk's top blocks the model tunes (it then takes the grid below them)
    boxes: str | None = None  # box convention: BOXES_NORMALISED or BOXES_PIXELS
    layout: str | None = None  # free text: the pixel tensor's layout and normalisation
    features: str | None = None  # free text: where external region features come from

    @property
    def grid_regions(self) -> int | None:
        """The backbone's regions per image (grid x grid), or None without a backbone grid."""
        return self.grid * self.grid if self.grid else None

    def warmup_regions(self, max_regions: int) -> int:
        """Regions of a warm-up image: the exact count the model takes, else WARMUP_REGIONS (at most `max_regions`)."""
        return self.region_count or min(WARMUP_REGIONS, max_regions)

    def pixel_spec(self) -> PixelSpec:
        """The image preprocessing as a teran.preprocess.PixelSpec (imports numpy / Pillow)."""
        from teran.preprocess import PixelSpec

        if self.size is None or self.mean is None or self.std is None:
            raise ManifestError("the model takes region features: its manifest has no pixel spec (preprocessing.size / mean / std)")
        return PixelSpec(size=self.size, mean=self.mean, std=self.std, resample=self.resample or "bilinear")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (f.name == "image_tuned_blocks" and value == 0):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Preprocessing:
        """Parse and validate the `preprocessing` object; errors name `where` and the field."""

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ManifestError(f"{where}: bad field preprocessing{what}")

        need(isinstance(data, dict), " (object)")
        known = [f.name for f in fields(cls)]
        for key in data:
            need(key in known, f".{key} (unknown; known: {known})")
        need(_is_int(data.get("region_dim")), ".region_dim (integer >= 1)")
        for key in ("size", "grid", "region_count", "image_tuned_blocks"):
            need(key not in data or _is_int(data[key]), f".{key} (integer >= 1, or absent)")
        for key in ("mean", "std"):
            need(key not in data or _is_triple(data[key]), f".{key} (3 finite numbers, or absent)")
        need(all(v > 0 for v in data.get("std", [])), ".std (positive numbers)")
        pixels = [key for key in ("size", "mean", "std") if key in data]
        for key in ("size", "mean", "std"):
            need(not pixels or key in data, f".{key} (size, mean and std come together)")
        need(
            "resample" not in data or (bool(pixels) and data["resample"] in RESAMPLE_MODES),
            f".resample (one of {RESAMPLE_MODES}, with size)",
        )
        for key in ("boxes", "layout", "features"):
            need(key not in data or isinstance(data[key], str), f".{key} (string, or absent)")
        if "region_count" in data:
            need("grid" in data and data["region_count"] == data["grid"] ** 2, ".region_count (the grid's cells, grid x grid)")
        need(
            "image_tuned_blocks" not in data or "region_count" in data, ".image_tuned_blocks (needs region_count: the model takes the grid)"
        )
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


@dataclass
class Manifest:
    model_name: str
    model_version: int
    source: SourceCheckpoint
    joint_dim: int
    limits: Limits
    tokenizer_file: str
    preprocessing: Preprocessing
    alignment_mode: str
    concept_mode: str
    graphs: dict[str, GraphEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    extra: dict[str, Any] = field(default_factory=dict)
    blend_weight: float | None = None
    hub_penalty: dict[str, Any] | None = None  # {"k", "weight", "image_reference", "caption_reference"}

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise ManifestError(f"the model directory has no {name!r} graph (has {sorted(self.graphs)})")
        return self.graphs[name]

    def graph_path(self, directory: str | Path, name: str, precision: str = "fp32") -> Path:
        return Path(directory) / self.graph(name).file(precision)

    def pixel_spec(self) -> PixelSpec:
        """The image preprocessing as a teran.preprocess.PixelSpec (imports numpy / Pillow)."""
        return self.preprocessing.pixel_spec()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "version": self.model_version},
            "created": self.created,
            "source_checkpoint": asdict(self.source),
            "joint_dim": self.joint_dim,
            "limits": asdict(self.limits),
            "tokenizer_file": self.tokenizer_file,
            "preprocessing": self.preprocessing.to_dict(),
            "alignment_mode": self.alignment_mode,
            "concept_mode": self.concept_mode,
            "blend_weight": self.blend_weight,
            "hub_penalty": self.hub_penalty,
            "graphs": {name: entry.to_dict() for name, entry in self.graphs.items()},
            "files": {name: asdict(entry) for name, entry in sorted(self.files.items())},
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and validate a manifest dict; errors name `where` and the offending field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format version {version!r} is not supported (this code reads version {FORMAT_VERSION}); "
                "re-export the model with this version of `python -m export`"
            )
        try:
            return cls._parse(data, where)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _parse(cls, data: dict, where: str) -> Manifest:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ManifestError(f"{where}: bad field {what}")

        model = data["model"]
        need(isinstance(model.get("name"), str) and model["name"], "model.name (non-empty string)")
        need(isinstance(model.get("version"), int) and model["version"] >= 1, "model.version (integer >= 1)")
        source = SourceCheckpoint(**data["source_checkpoint"])
        need(source.kind in CHECKPOINT_KINDS, f"source_checkpoint.kind ({source.kind!r} not in {CHECKPOINT_KINDS})")
        limits = Limits(**data["limits"])
        for name in ("max_tokens", "max_regions", "max_batch"):
            need(isinstance(getattr(limits, name), int) and getattr(limits, name) >= 1, f"limits.{name} (integer >= 1)")
        need(isinstance(data["joint_dim"], int) and data["joint_dim"] >= 1, "joint_dim (integer >= 1)")
        need(data["alignment_mode"] in ALIGNMENT_MODES, f"alignment_mode ({data['alignment_mode']!r} not in {ALIGNMENT_MODES})")
        need(data["concept_mode"] in CONCEPT_MODES, f"concept_mode ({data['concept_mode']!r} not in {CONCEPT_MODES})")
        blend = data.get("blend_weight")
        need(blend is None or (isinstance(blend, int | float) and 0.0 <= blend < float("inf")), "blend_weight (null or a number >= 0)")
        hub = data.get("hub_penalty")
        if hub is not None:
            need(isinstance(hub, dict), "hub_penalty (null or an object)")
            need(isinstance(hub.get("k"), int) and hub["k"] >= 1, "hub_penalty.k (integer >= 1)")
            need(isinstance(hub.get("weight"), int | float) and 0.0 <= hub["weight"] < float("inf"), "hub_penalty.weight (number >= 0)")
            for key in ("image_reference", "caption_reference"):
                need(isinstance(hub.get(key), str) and hub[key], f"hub_penalty.{key} (file name)")
        need(isinstance(data["tokenizer_file"], str), "tokenizer_file (string)")
        preprocessing = Preprocessing.from_dict(data["preprocessing"], where)
        region_count = preprocessing.region_count
        need(
            region_count is None or region_count <= limits.max_regions, f"preprocessing.region_count ({region_count} > limits.max_regions)"
        )
        graphs = {}
        for name, entry in data["graphs"].items():
            need(name in GRAPHS, f"graphs.{name} (unknown graph; known: {GRAPHS})")
            need(entry.get("ort_optimization") in ORT_LEVELS, f"graphs.{name}.ort_optimization (not in {ORT_LEVELS})")
            specs = {}
            for side in ("inputs", "outputs"):
                specs[side] = []
                for spec in entry[side]:
                    need(spec["dtype"] in DTYPES, f"graphs.{name}.{side}.{spec.get('name')}.dtype ({spec['dtype']!r} not in {DTYPES})")
                    need(all(isinstance(d, int | str) for d in spec["shape"]), f"graphs.{name}.{side}.{spec['name']}.shape")
                    specs[side].append(TensorSpec(spec["name"], spec["dtype"], tuple(spec["shape"])))
            graphs[name] = GraphEntry(
                entry["fp32"],
                entry.get("fp16"),
                specs["inputs"],
                specs["outputs"],
                entry["ort_optimization"],
                entry.get("opset"),
                entry.get("int8"),
            )
            need(entry.get("int8") is None or isinstance(entry["int8"], str), f"graphs.{name}.int8 (file name or null)")
        # The preprocessing must describe the graphs it feeds.
        if "image_backbone" in graphs:
            need(
                preprocessing.grid is not None and preprocessing.size is not None,
                "preprocessing (the image_backbone graph needs its grid and size)",
            )
        regions = [s for s in graphs["image_encoder"].inputs if s.name == "regions"] if "image_encoder" in graphs else []
        for spec in regions:
            channels = spec.shape[-1]
            need(
                not isinstance(channels, int) or channels == preprocessing.region_dim,
                f"preprocessing.region_dim ({preprocessing.region_dim}; the image_encoder's regions have {channels} channels)",
            )
        files = {}
        for name, entry in data["files"].items():
            need(isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64, f"files.{name}.sha256")
            need(isinstance(entry.get("size"), int) and entry["size"] >= 0, f"files.{name}.size")
            files[name] = FileEntry(entry["sha256"], entry["size"])
        referenced = [data["tokenizer_file"]] + [f for g in graphs.values() for f in (g.fp32, g.fp16, g.int8) if f]
        referenced += [hub[key] for key in ("image_reference", "caption_reference")] if hub else []
        for name in referenced:
            need(name in files, f"files (no checksum recorded for {name!r})")
        return cls(
            model_name=model["name"],
            model_version=model["version"],
            source=source,
            joint_dim=data["joint_dim"],
            limits=limits,
            tokenizer_file=data["tokenizer_file"],
            preprocessing=preprocessing,
            alignment_mode=data["alignment_mode"],
            concept_mode=data["concept_mode"],
            graphs=graphs,
            files=files,
            created=str(data.get("created", "")),
            extra=data.get("extra") or {},
            blend_weight=None if blend is None else float(blend),
            hub_penalty=dict(hub) if hub else None,
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def directory_files(directory: str | Path) -> list[str]:
    """Every regular file under `directory` except the manifest, as sorted POSIX relative paths."""
    root = Path(directory)
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def checksum_files(directory: str | Path) -> dict[str, FileEntry]:
    root = Path(directory)
    return {rel: FileEntry(file_sha256(root / rel), (root / rel).stat().st_size) for rel in directory_files(root)}


def write_manifest(directory: str | Path, manifest: Manifest) -> Manifest:
    """Record the checksum of every file in `directory` and write manifest.json atomically."""
    root = Path(directory)
    manifest.files = checksum_files(root)
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    Manifest.from_dict(json.loads(text), str(root / MANIFEST_FILE))  # never write what we could not read back
    tmp = root / (MANIFEST_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / MANIFEST_FILE)
    return manifest


def read_manifest_file(directory: str | Path) -> Manifest:
    """Parse manifest.json without checking the files (see load_manifest)."""
    root = Path(directory)
    if not root.is_dir():
        raise ManifestError(f"{root}: model directory does not exist")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: missing; {root} is not a model directory (create one with `python -m export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest (not UTF-8 text: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest (not valid JSON: {exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc.strerror})") from None
    return Manifest.from_dict(data, str(path))


def verify_files(directory: str | Path, manifest: Manifest) -> None:
    """Raise ManifestError naming the first file that is missing or whose size / sha256 differs."""
    root = Path(directory)
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"{path}: listed in {MANIFEST_FILE} but missing from the model directory")
        size = path.stat().st_size
        if size != entry.size:
            raise ManifestError(
                f"{path}: size {size} bytes differs from the {entry.size} recorded in {MANIFEST_FILE}; the file was modified or truncated"
            )
    for rel, entry in sorted(manifest.files.items()):
        actual = file_sha256(root / rel)
        if actual != entry.sha256:
            raise ManifestError(
                f"{root / rel}: checksum mismatch (sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}...); "
                "the file was modified or corrupted"
            )


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read a model directory's manifest; with `verify`, check every listed file's size and sha256."""
    manifest = read_manifest_file(directory)
    if verify:
        verify_files(directory, manifest)
    return manifest
