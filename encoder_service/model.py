"""The served model: request validation, tokenization, image decoding and the batched graphs.

gRPC-agnostic (the server maps its exceptions to status codes): `InvalidInput` (bad request,
INVALID_ARGUMENT), `batching.Overloaded` (RESOURCE_EXHAUSTED), `batching.DeadlineExpired`,
`backends.BackendError`. All numpy results are float32; fp16 conversion happens on the wire.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from encoder_service.backends import Backend, make_backend
from encoder_service.batching import DynamicBatcher
from encoder_service.config import ConfigError, EncoderConfig
from encoder_service.logs import get_logger
from encoder_service.metrics import Metrics
from teran.errors import CaptionError, TeranInputError
from teran.hubness import HubReference
from teran.manifest import Manifest, load_manifest
from teran.preprocess import ImageLimits, PixelSpec, decode_image, to_pixels
from teran.tokenization import CaptionTokenizer

log = get_logger("model")
BOX_TOLERANCE = 0.01  # normalised boxes may overshoot 0..1 by this much (then they are clipped)
_CAPTION_PREFIX = re.compile(r"^caption (\d+):")
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
# Pillow's reason for data of no allowed format names only its buffer and repeats what the message says.
_UNIDENTIFIED = re.compile(r" \(cannot identify image file <_io\.BytesIO object at 0x[0-9a-fA-F]+>\)")


class InvalidInput(TeranInputError):
    """A request is malformed: the message names the field and the limit."""


@dataclass
class CaptionResult:
    global_vec: np.ndarray  # [D] float32
    concepts: np.ndarray  # [W, D] float32, one row per word piece
    word_pieces: list[str]
    token_positions: list[int]
    num_tokens: int


@dataclass
class RegionInput:
    features: np.ndarray  # [R, C] float32
    boxes: np.ndarray  # [R, 4] float32, pixels if width/height else normalised
    width: int = 0
    height: int = 0


@dataclass
class ImageResult:
    global_vec: np.ndarray  # [D]
    concepts: np.ndarray  # [R, D]
    boxes: np.ndarray  # [R, 4] normalised
    width: int
    height: int


def default_buckets(max_len: int, start: int = 8) -> list[int]:
    edges, edge = [], start
    while edge < max_len:
        edges.append(edge)
        edge *= 2
    return edges + [max_len]


def bucket_of(length: int, edges: list[int]) -> int:
    for edge in edges:
        if length <= edge:
            return edge
    return edges[-1]


class EncoderModel:
    """Loads a model directory and serves encode_captions / encode_images (asyncio)."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        backend: Backend | None = None,
        metrics: Metrics | None = None,
        active_calls: Callable[[], int] | None = None,
    ):
        self.config = config
        self.active_calls = active_calls
        if config.model_dir is None:
            raise ConfigError("--model-dir is required")
        self.model_dir = Path(config.model_dir)
        self.metrics = metrics or Metrics()
        started = time.monotonic()
        self.manifest: Manifest = load_manifest(self.model_dir, verify=config.verify_model)
        m = self.manifest
        limits = m.limits
        self.max_tokens = config.max_tokens or limits.max_tokens
        self.max_regions = config.max_regions or limits.max_regions
        if self.max_tokens > limits.max_tokens:
            raise ConfigError(f"--max-tokens {self.max_tokens} exceeds the model's limit of {limits.max_tokens} (manifest.json)")
        if self.max_regions > limits.max_regions:
            raise ConfigError(f"--max-regions {self.max_regions} exceeds the model's limit of {limits.max_regions} (manifest.json)")
        self.max_batch = config.max_batch or limits.max_batch
        if config.backend == "triton" and self.max_batch > limits.max_batch:
            raise ConfigError(f"--max-batch {self.max_batch} exceeds the Triton repository's max_batch_size {limits.max_batch}")
        self.tokenizer = CaptionTokenizer(self.model_dir / m.tokenizer_file, max_tokens=self.max_tokens, max_chars=config.max_caption_chars)
        self.cls_id = self.tokenizer._tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer._tokenizer.token_to_id("[SEP]")
        self.length_buckets = (
            sorted({min(b, self.max_tokens) for b in config.length_buckets} | {self.max_tokens})
            if config.length_buckets
            else default_buckets(self.max_tokens)
        )
        self.region_buckets = default_buckets(self.max_regions)
        self.image_limits = ImageLimits(config.max_image_bytes, config.max_image_pixels, config.max_image_side, tuple(config.image_formats))
        self.has_backbone = "image_backbone" in m.graphs
        self.pixel_spec = m.pixel_spec() if self.has_backbone else None
        self.preprocessing = m.preprocessing
        self.region_dim = m.preprocessing.region_dim
        # A model tuning the image trunk's top blocks takes exactly the backbone's grid (manifest region_count).
        self.region_count = m.preprocessing.region_count
        if self.region_count is not None and self.region_count > self.max_regions:
            raise ConfigError(f"--max-regions {self.max_regions} is below the {self.region_count} grid regions this model takes")
        self.joint_dim = m.joint_dim
        self.hub_reference = self._hub_reference()
        self._text_inputs = {s.name: s for s in m.graph("text_encoder").inputs}
        self._image_inputs = {s.name: s for s in m.graph("image_encoder").inputs}
        self.image_sizes_input = "image_sizes" in self._image_inputs
        self.backend = backend or make_backend(config, m, self.model_dir)
        self.ready = False
        self.batchers: dict[str, DynamicBatcher] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self.load_seconds = time.monotonic() - started

    def _hub_reference(self) -> HubReference | None:
        """The reference of the model's hub penalty (manifest `hub_penalty`), served by GetHubReference."""
        entry = self.manifest.hub_penalty
        if entry is None:
            return None
        try:
            reference = HubReference.load(self.model_dir, entry)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{self.model_dir}: cannot read the hub penalty's reference ({exc})") from None
        if reference.dimension != self.manifest.joint_dim:
            raise ConfigError(
                f"{self.model_dir}: the hub reference has dimension {reference.dimension}, the model {self.manifest.joint_dim}"
            )
        return reference

    # ------------------------------------------------------------------ lifecycle

    async def start(self, warmup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        await loop.run_in_executor(None, self.backend.load)
        graphs = sorted(self.manifest.graphs)
        self._executor = ThreadPoolExecutor(max_workers=len(graphs) * self.config.batch_workers, thread_name_prefix="encoder-run")
        self._decoder = ThreadPoolExecutor(max_workers=self.config.decode_workers, thread_name_prefix="encoder-decode")
        runners: dict[str, Callable[[list], Sequence]] = {
            "text_encoder": self._run_text,
            "image_encoder": self._run_image_encoder,
            "image_backbone": self._run_backbone,
        }
        for graph in graphs:
            batcher = DynamicBatcher(
                graph,
                runners[graph],
                executor=self._executor,
                max_batch=self.max_batch,
                max_delay_s=self.config.max_queue_delay_ms / 1000.0,
                max_queue=self.config.max_queue,
                workers=self.config.batch_workers,
                metrics=self.metrics,
                active_calls=self.active_calls,
                # In-process text runs take a few ms; a Triton call would hold the loop for a network round trip.
                inline_idle=graph == "text_encoder" and self.config.inline_lone_captions and self.config.backend == "onnxruntime",
            )
            batcher.start()
            self.batchers[graph] = batcher
        if warmup:
            await loop.run_in_executor(self._executor, self._warmup)
        self.ready = True
        log.info(
            "model ready",
            extra={
                "model": self.manifest.model_name,
                "version": self.manifest.model_version,
                "backend": self.backend.describe(),
                "warmup_s": round(time.monotonic() - started, 3),
            },
        )

    async def close(self) -> None:
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.close()
        for pool in (self._executor, self._decoder):
            if pool is not None:
                pool.shutdown(wait=True)
        self.backend.close()

    @property
    def _pixels(self) -> PixelSpec:
        """The pixel spec of the image backbone (callers check has_backbone first)."""
        if self.pixel_spec is None:
            raise InvalidInput("this model takes region features, not image files (it has no image_backbone graph)")
        return self.pixel_spec

    def _warmup(self) -> None:
        """Run every graph once per shape bucket (caption lengths, one region count, one image)."""
        word = self.tokenizer._tokenizer.token_to_id("a")
        word = word if word is not None else self.cls_id
        for length in self.length_buckets:
            ids = np.array([self.cls_id] + [word] * max(1, length - 2) + [self.sep_id], dtype=np.int64)
            self._run_text([ids])
        if self.has_backbone:
            size = self._pixels.size
            regions = self._run_backbone([np.zeros((3, size, size), np.float32)])
            self._run_image_encoder([(regions[0][0], regions[0][1], None)])
        else:
            count = self.preprocessing.warmup_regions(self.max_regions)
            boxes = np.tile(np.array([[0.1, 0.1, 0.6, 0.6]], np.float32), (count, 1))
            self._run_image_encoder([(np.zeros((count, self.region_dim), np.float32), boxes, None)])

    # ------------------------------------------------------------------ graph runners (worker threads)

    @staticmethod
    def _cast(array: np.ndarray, spec) -> np.ndarray:
        return np.ascontiguousarray(array.astype(np.dtype(spec.dtype) if spec.dtype != "bool" else np.bool_, copy=False))

    def _run_text(self, payloads: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        length = max(len(ids) for ids in payloads)
        input_ids = np.zeros((len(payloads), length), np.int64)
        mask = np.zeros((len(payloads), length), np.int64)
        for row, ids in enumerate(payloads):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        spec = self._text_inputs
        out = self.backend.run(
            "text_encoder",
            {"input_ids": self._cast(input_ids, spec["input_ids"]), "attention_mask": self._cast(mask, spec["attention_mask"])},
        )
        glob, concepts, cmask = out["global"], out["concepts"], out["concept_mask"].astype(bool)
        return [(glob[row], concepts[row, : len(ids) - 1], cmask[row, : len(ids) - 1]) for row, ids in enumerate(payloads)]

    def _run_backbone(self, payloads: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = self.backend.run("image_backbone", {"pixels": np.ascontiguousarray(np.stack(payloads), dtype=np.float32)})
        return [(out["regions"][row], out["boxes"][row]) for row in range(len(payloads))]

    def _run_image_encoder(
        self, payloads: list[tuple[np.ndarray, np.ndarray, tuple[int, int] | None]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        count = max(len(regions) for regions, _b, _s in payloads)
        batch = len(payloads)
        regions = np.zeros((batch, count, self.region_dim), np.float32)
        boxes = np.zeros((batch, count, 4), np.float32)
        mask = np.zeros((batch, count), bool)
        sizes = np.ones((batch, 2), np.float32)
        for row, (feats, norm_boxes, size) in enumerate(payloads):
            n = len(feats)
            regions[row, :n] = feats
            mask[row, :n] = True
            if self.image_sizes_input and size is not None:
                sizes[row] = size
                boxes[row, :n] = norm_boxes * np.array([size[0], size[1], size[0], size[1]], np.float32)
            else:
                boxes[row, :n] = norm_boxes
        spec = self._image_inputs
        feeds = {"regions": regions, "boxes": boxes, "region_mask": mask}
        if self.image_sizes_input:
            feeds["image_sizes"] = sizes
        feeds = {name: self._cast(value, spec[name]) for name, value in feeds.items()}
        out = self.backend.run("image_encoder", feeds)
        return [(out["global"][row], out["concepts"][row, : len(p[0])]) for row, p in enumerate(payloads)]

    # ------------------------------------------------------------------ captions

    def tokenize(self, captions: list[str], field: str = "captions") -> tuple[list[np.ndarray], list[list[str]]]:
        if not captions:
            raise InvalidInput(f"{field}: no captions; send 1 to {self.config.max_items}")
        if len(captions) > self.config.max_items:
            raise InvalidInput(f"{field}: {len(captions)} captions exceeds the limit of {self.config.max_items} per request (--max-items)")
        try:
            batch = self.tokenizer.encode(list(captions))
        except CaptionError as exc:
            raise InvalidInput(
                _CAPTION_PREFIX.sub(lambda m: f"{field}[{m.group(1)}]:", str(exc)) + " (--max-tokens / --max-caption-chars)"
            ) from None
        lengths = batch.attention_mask.sum(axis=1)
        ids = [batch.input_ids[row, : lengths[row]] for row in range(len(captions))]
        return ids, batch.tokens

    async def encode_captions(self, captions: list[str], deadline: float | None = None, field: str = "captions") -> list[CaptionResult]:
        ids, tokens = self.tokenize(captions, field)
        buckets = [bucket_of(len(row), self.length_buckets) for row in ids]
        outputs = await self.batchers["text_encoder"].submit(ids, buckets, deadline)
        self.metrics.items.labels("caption").inc(len(captions))
        results = []
        for (glob, concepts, cmask), pieces in zip(outputs, tokens, strict=True):
            positions = np.flatnonzero(cmask)
            results.append(
                CaptionResult(
                    global_vec=glob,
                    concepts=concepts[positions],
                    word_pieces=[pieces[p + 1] for p in positions],
                    token_positions=[int(p) + 1 for p in positions],
                    num_tokens=len(pieces),
                )
            )
        return results

    # ------------------------------------------------------------------ images

    def check_regions(self, item: RegionInput, field: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
        feats, boxes = item.features, item.boxes
        if feats.ndim != 2 or feats.shape[1] != self.region_dim:
            raise InvalidInput(f"{field}.features.shape: expected [regions, {self.region_dim}], got {list(feats.shape)}")
        count = feats.shape[0]
        if count < 1:
            allowed = f"exactly {self.region_count}" if self.region_count is not None else f"1 to {self.max_regions}"
            raise InvalidInput(f"{field}.features: no regions; send {allowed}")
        if count > self.max_regions:
            raise InvalidInput(f"{field}.features: {count} regions exceeds the limit of {self.max_regions} (--max-regions)")
        if self.region_count is not None and count != self.region_count:
            grid = self.preprocessing.grid
            raise InvalidInput(
                f"{field}.features: this model takes exactly {self.region_count} regions (the backbone's {grid}x{grid} grid, "
                f"row-major), got {count}"
            )
        if boxes.shape != (count, 4):
            raise InvalidInput(f"{field}.boxes.shape: expected [{count}, 4] (one x1, y1, x2, y2 per region), got {list(boxes.shape)}")
        size = None
        if item.width or item.height:
            side = self.image_limits.max_side
            if not (1 <= item.width <= side and 1 <= item.height <= side):
                raise InvalidInput(
                    f"{field}.image_width/image_height: {item.width}x{item.height} must both be set, 1..{side} (--max-image-side)"
                )
            size = (item.width, item.height)
            norm = boxes / np.array([item.width, item.height, item.width, item.height], np.float32)
        else:
            norm = boxes
        bad = (norm < -BOX_TOLERANCE) | (norm > 1 + BOX_TOLERANCE)
        bad = bad.any(axis=1) | (norm[:, 2] < norm[:, 0]) | (norm[:, 3] < norm[:, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            unit = "pixels of the image_width x image_height image" if size else "normalised 0..1 (set image_width/image_height for pixels)"
            raise InvalidInput(f"{field}.boxes: row {row} {boxes[row].tolist()} is not a box x1<=x2, y1<=y2 within the image ({unit})")
        return feats.astype(np.float32, copy=False), np.clip(norm, 0.0, 1.0).astype(np.float32), size

    def _decode(self, data: bytes, field: str) -> tuple[np.ndarray, int, int]:
        limits = self.image_limits
        try:
            image = decode_image(data, source=field, limits=limits)
        except TeranInputError as exc:
            text = _BUFFER_REPR.sub("the data", _UNIDENTIFIED.sub("", str(exc)))
            if "decompression bomb" in text:  # Pillow's own guard fired before ours could read the size
                text = f"{field}: image exceeds the limit of {limits.max_pixels} pixels / {limits.max_side} per side (decompression bomb)"
            if "limit" in text:
                text += " (--max-image-bytes / --max-image-pixels / --max-image-side)"
            raise InvalidInput(text) from None
        width, height = image.size
        return to_pixels(image, self._pixels), width, height

    async def encode_images(
        self, images: list[bytes | RegionInput], deadline: float | None = None, field: str = "images"
    ) -> list[ImageResult]:
        if not images:
            raise InvalidInput(f"{field}: no images; send 1 to {self.config.max_items}")
        if len(images) > self.config.max_items:
            raise InvalidInput(f"{field}: {len(images)} images exceeds the limit of {self.config.max_items} per request (--max-items)")
        checked: dict[int, tuple] = {}
        encoded: list[int] = []
        for index, item in enumerate(images):
            if isinstance(item, RegionInput):
                checked[index] = self.check_regions(item, f"{field}[{index}].regions")
            elif isinstance(item, bytes | bytearray | memoryview):
                if not self.has_backbone:
                    raise InvalidInput(
                        f"{field}[{index}].encoded: this model ({self.manifest.source.kind} checkpoint) has no image backbone; "
                        "send precomputed region features instead"
                    )
                encoded.append(index)
            else:
                raise InvalidInput(f"{field}[{index}]: set either encoded (image file bytes) or regions (features + boxes)")
        loop = asyncio.get_running_loop()
        sizes: dict[int, tuple[int, int]] = {}
        if encoded:
            decoded = await asyncio.gather(
                *(
                    loop.run_in_executor(self._decoder, self._decode, bytes(cast(bytes, images[i])), f"{field}[{i}].encoded")
                    for i in encoded
                )
            )
            pixels = [d[0] for d in decoded]
            grids = await self.batchers["image_backbone"].submit(pixels, None, deadline)
            for index, (regions, boxes), (_p, width, height) in zip(encoded, grids, decoded, strict=True):
                checked[index] = (regions, boxes, None)
                sizes[index] = (width, height)
        payloads = [checked[i] for i in range(len(images))]
        buckets = [bucket_of(len(p[0]), self.region_buckets) for p in payloads]
        outputs = await self.batchers["image_encoder"].submit(payloads, buckets, deadline)
        self.metrics.items.labels("image").inc(len(images))
        results = []
        for index, ((glob, concepts), payload) in enumerate(zip(outputs, payloads, strict=True)):
            width, height = sizes.get(index) or payload[2] or (0, 0)
            results.append(ImageResult(glob, concepts, payload[1], int(width), int(height)))
        return results

    # ------------------------------------------------------------------ info

    def _precision_label(self) -> str:
        if self.backend.kind != "onnxruntime":
            return "triton"
        label = getattr(self.backend, "precision_label", None)
        return label() if callable(label) else self.config.precision

    def info(self) -> dict:
        m = self.manifest
        return {
            "name": m.model_name,
            "version": m.model_version,
            "dimension": m.joint_dim,
            "backend": self.backend.kind,
            "backend_detail": self.backend.describe(),
            "precision": self._precision_label(),
            "alignment_mode": m.alignment_mode,
            "concept_mode": m.concept_mode,
            "checkpoint_kind": m.source.kind,
            "checkpoint_sha256": m.source.sha256,
            "region_dim": self.region_dim,
            "accepts_encoded_images": self.has_backbone,
            "max_items": self.config.max_items,
            "max_tokens": self.max_tokens,
            "max_caption_chars": self.config.max_caption_chars,
            "max_regions": self.max_regions,
            "max_image_bytes": self.image_limits.max_bytes,
            "max_image_pixels": self.image_limits.max_pixels,
            "max_image_side": self.image_limits.max_side,
            "max_message_bytes": self.config.max_message_bytes,
            "max_batch": self.max_batch,
            "image_size": self.pixel_spec.size if self.pixel_spec else 0,
            "region_count": self.region_count or 0,
            **({} if m.blend_weight is None else {"blend_weight": m.blend_weight}),
            **({} if self.hub_reference is None else {"hub_penalty_weight": self.hub_reference.weight}),
        }
