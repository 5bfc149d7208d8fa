"""Checkpoints -> the torch modules to export, one per graph, with example inputs and axes.

Two checkpoint kinds:
- `project`: our training checkpoints (teran.checkpoint): heads plus any tuned top text layers;
  the frozen backbones (all-MiniLM-L6-v2 without those layers, EfficientNet-Lite0) are loaded
  from their packages or injected (tests).
- `original`: the authors' TERAN `.pth.tar` (teran.original). Text and image branches only
  (bottom-up features are computed elsewhere, so there is no image backbone graph).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teran import backbones
from teran.checkpoint import FORMAT as PROJECT_FORMAT
from teran.config import image_grid_cells
from teran.errors import CheckpointError
from teran.hubness import HubReference
from teran.manifest import BOXES_NORMALISED, BOXES_PIXELS, Preprocessing, file_sha256
from teran.preprocess import PixelSpec

KINDS = ("auto", "project", "original")
ORIGINAL_PREFIX = "img_txt_enc."


@dataclass
class GraphModule:
    """One graph to export: a module returning a tuple of tensors, and how to call it."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple[torch.Tensor, ...]  # traced inputs: batch >= 2, every dynamic length >= 2
    dynamic_shapes: tuple[dict[int, Any], ...]
    checks: list[tuple[torch.Tensor, ...]]  # inputs of other shapes, run after export (dynamic axes really dynamic)
    mask_output: str | None = None  # output whose True entries select the concept rows compared in checks


@dataclass
class ExportSource:
    kind: str  # project | original
    checkpoint: Path
    checkpoint_sha256: str
    graphs: dict[str, GraphModule]
    joint_dim: int
    max_tokens: int
    max_regions: int
    tokenizer_file: Path
    preprocessing: Preprocessing
    alignment_mode: str
    concept_mode: str
    default_name: str
    blend_weight: float | None = None  # the served ranking's MrSw weight (teran.alignment.blend_scores)
    hub_reference: Any = None  # teran.hubness.HubReference of the served ranking's hub penalty (None: no penalty)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- graph wrappers


class TextGraph(nn.Module):
    """input_ids [B, L] int64, attention_mask [B, L] int64 -> global [B, D], concepts [B, L-1, D], concept_mask [B, L-1] bool."""

    def __init__(self, encode):
        super().__init__()
        self.encode = encode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.encode(input_ids, attention_mask)
        return out.global_vec, out.concepts, out.concept_mask


class ImageGraph(nn.Module):
    """regions [B, R, C] fp32, boxes [B, R, 4] fp32 normalised, region_mask [B, R] bool -> global, concepts, concept_mask."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, regions: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor):
        out = self.encoder(regions, boxes, region_mask)
        return out.global_vec, out.concepts, out.concept_mask


class OriginalImageGraph(nn.Module):
    """regions [B, R, C], boxes [B, R, 4] in pixels, image_sizes [B, 2] (w, h), region_mask [B, R] bool."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, regions, boxes, image_sizes, region_mask):
        out = self.model.encode_image(regions, boxes, image_sizes, region_mask)
        return out.global_vec, out.concepts, out.concept_mask


class OriginalTextGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model.encode_text(input_ids, attention_mask)  # compat concept mask (the checkpoints' quirk)
        return out.global_vec, out.concepts, out.concept_mask


class BackboneGraph(nn.Module):
    """pixels [B, 3, S, S] fp32 -> regions [B, G*G, C], boxes [B, G*G, 4], region_mask [B, G*G] bool (all True).

    The mask output lets a Triton ensemble feed the image encoder directly.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor):
        regions, boxes = self.backbone(pixels)
        mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return regions, boxes, mask


# --------------------------------------------------------------------------- example inputs


def _dims(max_tokens: int, max_regions: int):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    tokens = Dim("tokens", min=2, max=max(3, max_tokens))
    regions = Dim("regions", min=1, max=max(2, max_regions))
    return batch, tokens, regions


def _text_inputs(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:  # a shorter second caption: padding inside the batch
        keep = max(2, length // 2)
        mask[1, keep:] = 0
        ids[1, keep:] = 0
    return ids, mask


def _region_inputs(batch: int, regions: int, dim: int, seed: int, pixels: bool = False, padded: bool = True):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(batch, regions, dim, generator=g) * 2
    xy = torch.rand(batch, regions, 2, generator=g) * 0.6
    wh = torch.rand(batch, regions, 2, generator=g) * 0.4 + 0.01
    boxes = torch.cat([xy, xy + wh], dim=-1)
    mask = torch.ones(batch, regions, dtype=torch.bool)
    if padded and batch > 1 and regions > 1:
        mask[1, regions // 2 + 1 :] = False
    if pixels:
        sizes = torch.tensor([[500.0, 375.0], [333.0, 500.0], [640.0, 480.0], [800.0, 600.0]]).repeat(batch, 1)[:batch]
        boxes = boxes * sizes.repeat(1, 2).unsqueeze(1)
        return feats, boxes, sizes, mask
    return feats, boxes, mask


def _text_graph(module: nn.Module, vocab: int, max_tokens: int, max_regions: int) -> GraphModule:
    batch, tokens, _ = _dims(max_tokens, max_regions)
    example_len = min(7, max_tokens)
    checks_len = [min(11, max_tokens), min(4, max_tokens)]
    return GraphModule(
        name="text_encoder",
        module=module,
        input_names=["input_ids", "attention_mask"],
        output_names=["global", "concepts", "concept_mask"],
        example=_text_inputs(2, example_len, vocab, 0),
        dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens}),
        checks=[_text_inputs(3, checks_len[0], vocab, 1), _text_inputs(1, checks_len[1], vocab, 2)],
        mask_output="concept_mask",
    )


def _vocab_size(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    return int(getattr(config, "vocab_size", 100) or 100)


def _max_positions(backbone: nn.Module) -> int | None:
    config = getattr(backbone, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


# --------------------------------------------------------------------------- checkpoint kinds


def detect_kind(path: Path) -> str:
    """'project' or 'original' from the file's layout (never unpickles arbitrary objects)."""
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "checkpoint file does not exist"
        raise CheckpointError(f"{path}: {problem}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Namespace" in str(exc):
            raise CheckpointError(
                f"{path}: looks like an original TERAN checkpoint (it pickles an argparse.Namespace). Loading it runs "
                "code stored in the file: if it comes from a trusted source, pass --checkpoint-kind original"
            ) from None
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint of a known layout ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({(str(exc).splitlines() or [''])[0]})") from None
    if isinstance(payload, dict) and payload.get("format") == PROJECT_FORMAT:
        return "project"
    if (
        isinstance(payload, dict)
        and isinstance(payload.get("model"), Mapping)
        and any(str(k).startswith(ORIGINAL_PREFIX) for k in payload["model"])
    ):
        return "original"
    found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (found {found}); expected a {PROJECT_FORMAT} file from `python -m teran.train` "
        "or an original TERAN .pth.tar (a dict whose 'model' holds img_txt_enc.* weights)"
    )


def load_source(
    checkpoint: str | Path,
    kind: str = "auto",
    *,
    text_backbone: nn.Module | None = None,
    image_backbone: nn.Module | None = None,
    tokenizer_file: str | Path | None = None,
    max_tokens: int | None = None,
    max_regions: int | None = None,
    alignment_mode: str | None = None,
    with_backbone: bool = True,
) -> ExportSource:
    """Load a checkpoint and wrap its branches as exportable graphs.

    `text_backbone` / `image_backbone` replace the packaged MiniLM / EfficientNet-Lite0 (tests
    inject tiny random ones); `tokenizer_file` replaces MiniLM's tokenizer.json.
    """
    path = Path(checkpoint)
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS}")
    if kind == "auto":
        kind = detect_kind(path)
    if kind == "project":
        return _project_source(path, text_backbone, image_backbone, tokenizer_file, max_tokens, max_regions, alignment_mode, with_backbone)
    return _original_source(path, text_backbone, tokenizer_file, max_tokens, max_regions, alignment_mode)


def _project_source(
    path, text_backbone, image_backbone, tokenizer_file, max_tokens, max_regions, alignment_mode, with_backbone
) -> ExportSource:
    from teran.checkpoint import load_model
    from teran.model import TextEncoder

    if path.is_file():
        kind = detect_kind(path)
        if kind != "project":
            raise CheckpointError(f"{path}: this is an original TERAN checkpoint; export it with --checkpoint-kind original")
    model, payload = load_model(path)
    cfg = model.config
    max_tokens = max_tokens or cfg.max_tokens
    max_regions = max_regions or cfg.max_regions
    injected = {}
    if text_backbone is None:
        text_backbone = backbones.load_text_backbone(drop_top_layers=cfg.text_tuned_layers)
        text_name = backbones.TEXT_BACKBONE
    else:
        text_name = f"injected:{type(text_backbone).__name__}"
        injected["text"] = True
    hidden = getattr(getattr(text_backbone, "config", None), "hidden_size", cfg.text_hidden_dim)
    if hidden != cfg.text_hidden_dim:
        raise CheckpointError(f"{path}: the text head expects hidden size {cfg.text_hidden_dim} but the text backbone gives {hidden}")
    positions = _max_positions(text_backbone)
    if positions and max_tokens > positions:
        raise CheckpointError(f"max_tokens {max_tokens} exceeds the text backbone's {positions} positions")
    text_backbone.eval()
    graphs = {
        "text_encoder": _text_graph(
            TextGraph(TextEncoder(text_backbone, model.text)).eval(), _vocab_size(text_backbone), max_tokens, max_regions
        )
    }

    batch, _, regions = _dims(max_tokens, max_regions)
    fixed_regions = cfg.image_input_regions  # a tuned trunk stage takes the whole grid, no padding
    if fixed_regions:
        if fixed_regions > max_regions:
            raise CheckpointError(f"{path}: the model takes {fixed_regions} grid regions, over max_regions {max_regions}")
        dynamic, counts = ({0: batch}, {0: batch}, {0: batch}), (fixed_regions,) * 3
    else:
        dynamic, counts = (
            ({0: batch, 1: regions}, {0: batch, 1: regions}, {0: batch, 1: regions}),
            (min(5, max_regions), min(9, max_regions), min(3, max_regions)),
        )
    graphs["image_encoder"] = GraphModule(
        name="image_encoder",
        module=ImageGraph(model.image).eval(),
        input_names=["regions", "boxes", "region_mask"],
        output_names=["global", "concepts", "concept_mask"],
        example=_region_inputs(2, counts[0], cfg.image_input_dim, 3, padded=not fixed_regions),
        dynamic_shapes=dynamic,
        checks=[
            _region_inputs(3, counts[1], cfg.image_input_dim, 4, padded=not fixed_regions),
            _region_inputs(1, counts[2], cfg.image_input_dim, 5, padded=not fixed_regions),
        ],
        mask_output="concept_mask",
    )
    spec = PixelSpec()
    grid = cfg.image_grid if fixed_regions else image_grid_cells(spec.size)
    image_name = None
    if with_backbone:
        if image_backbone is None:
            image_backbone = backbones.GridImageBackbone(spec.size, drop_top_blocks=cfg.image_tuned_blocks)
            image_name = backbones.IMAGE_BACKBONE
        else:
            image_name = f"injected:{type(image_backbone).__name__}"
            injected["image"] = True
        grid = int(getattr(image_backbone, "grid", grid))
        if fixed_regions and grid * grid != fixed_regions:
            raise CheckpointError(
                f"{path}: the model's tuned image stage takes a {cfg.image_grid}x{cfg.image_grid} grid; the backbone gives {grid}x{grid}"
            )
        image_backbone.eval()
        g = torch.Generator().manual_seed(6)
        graphs["image_backbone"] = GraphModule(
            name="image_backbone",
            module=BackboneGraph(image_backbone).eval(),
            input_names=["pixels"],
            output_names=["regions", "boxes", "region_mask"],
            example=(torch.randn(2, 3, spec.size, spec.size, generator=g),),
            dynamic_shapes=({0: batch},),
            checks=[(torch.randn(3, 3, spec.size, spec.size, generator=g),), (torch.randn(1, 3, spec.size, spec.size, generator=g),)],
        )
    train_cfg = payload.get("train_config") or {}
    mode = alignment_mode or (train_cfg.get("loss") or {}).get("alignment_mode") or "MrSw"
    return ExportSource(
        kind="project",
        checkpoint=path,
        checkpoint_sha256=file_sha256(path),
        graphs=graphs,
        joint_dim=cfg.joint_dim,
        max_tokens=max_tokens,
        max_regions=max_regions,
        tokenizer_file=Path(tokenizer_file) if tokenizer_file else backbones.tokenizer_file(),
        preprocessing=Preprocessing(
            size=spec.size,
            mean=spec.mean,
            std=spec.std,
            resample=spec.resample,
            grid=grid,
            region_dim=cfg.image_input_dim,
            # Set for a model that tunes the trunk's top blocks: its regions are the grid below them,
            # exactly this many cells (row-major), not the trunk's output.
            region_count=fixed_regions,
            image_tuned_blocks=cfg.image_tuned_blocks,
            boxes=BOXES_NORMALISED,
            layout="NCHW float32, (pixel/255 - mean) / std, squashed to size x size (no crop)",
        ),
        alignment_mode=mode,
        concept_mode="words",
        default_name=path.stem,
        blend_weight=payload.get("blend_weight") if mode == "MrSw" else None,
        hub_reference=HubReference.from_checkpoint(payload) if mode == "MrSw" and payload.get("blend_weight") is not None else None,
        extra={
            "backbones": {"text": text_name, "image": image_name, **({"injected": injected} if injected else {})},
            "model_config": payload.get("model_config"),
            "checkpoint_epoch": payload.get("epoch"),
        },
    )


def _original_source(path, text_backbone, tokenizer_file, max_tokens, max_regions, alignment_mode) -> ExportSource:
    try:
        from teran.original import load_original_checkpoint
    except ImportError as exc:  # pragma: no cover - teran.original ships with the project
        raise CheckpointError(f"{path}: original TERAN checkpoints need teran.original ({exc})") from None
    if text_backbone is not None:
        raise CheckpointError("an original TERAN checkpoint carries its own fine-tuned BERT; do not inject a text backbone")
    model, info = load_original_checkpoint(path, trusted=True)
    cfg = info["model_config"]
    max_tokens = max_tokens or 64
    max_regions = max_regions or 100
    if max_tokens > cfg.bert_max_positions:
        raise CheckpointError(f"max_tokens {max_tokens} exceeds BERT's {cfg.bert_max_positions} positions")
    graphs = {"text_encoder": _text_graph(OriginalTextGraph(model).eval(), cfg.vocab_size, max_tokens, max_regions)}
    batch, _, regions = _dims(max_tokens, max_regions)
    graphs["image_encoder"] = GraphModule(
        name="image_encoder",
        module=OriginalImageGraph(model).eval(),
        input_names=["regions", "boxes", "image_sizes", "region_mask"],
        output_names=["global", "concepts", "concept_mask"],
        example=_region_inputs(2, min(5, max_regions), cfg.feature_dim, 3, pixels=True),
        dynamic_shapes=({0: batch, 1: regions}, {0: batch, 1: regions}, {0: batch}, {0: batch, 1: regions}),
        checks=[
            _region_inputs(3, min(9, max_regions), cfg.feature_dim, 4, pixels=True),
            _region_inputs(1, min(3, max_regions), cfg.feature_dim, 5, pixels=True),
        ],
        mask_output="concept_mask",
    )
    from dataclasses import asdict

    return ExportSource(
        kind="original",
        checkpoint=path,
        checkpoint_sha256=file_sha256(path),
        graphs=graphs,
        joint_dim=cfg.joint_dim,
        max_tokens=max_tokens,
        max_regions=max_regions,
        # bert-base-uncased WordPiece: all-MiniLM-L6-v2 ships the same uncased 30522-token vocabulary.
        tokenizer_file=Path(tokenizer_file) if tokenizer_file else backbones.tokenizer_file(),
        preprocessing=Preprocessing(
            region_dim=cfg.feature_dim,
            boxes=BOXES_PIXELS,
            features="bottom-up Faster R-CNN (Visual Genome) region features, computed outside this model",
        ),
        alignment_mode=alignment_mode or "MrSw",
        concept_mode="compat",
        default_name=path.name.split(".")[0],
        extra={
            "backbones": {"text": "bert-base-uncased (6 layers, fine-tuned, inside the checkpoint)", "image": None},
            "model_config": asdict(cfg),
            "checkpoint_epoch": info.get("epoch"),
            "shared_transformer": info.get("shared_transformer"),
        },
    )
