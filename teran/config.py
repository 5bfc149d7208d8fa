"""Model and training configuration (dataclasses; read from YAML/JSON files)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from teran.errors import TeranInputError
from teran.preprocess import PixelSpec

SHORTCUT_MODES = ("none", "global", "all")
TEXT_LAYERS = 6  # transformer layers of all-MiniLM-L6-v2
# EfficientNet-Lite0's top 4 MBConv blocks (of 16) run on its final 7x7 grid (the one below
# them downsamples): a model may tune up to that many, and then takes that grid's 192 channels.
IMAGE_TUNABLE_BLOCKS = 4
IMAGE_GRID_CHANNELS = 192
IMAGE_HEAD_CHANNELS = 1280  # EfficientNet-Lite0's head conv output: the region size of the full trunk
IMAGE_STRIDE = 32  # the trunk's total downsampling: one grid cell per 32 x 32 input pixels


def image_grid_cells(input_size: int) -> int:
    """Cells per side of the image trunk's output grid for a square input of `input_size` pixels."""
    return input_size // IMAGE_STRIDE


@dataclass
class ModelConfig:
    """Our TERAN variant: frozen backbones (bar any tuned top layers / blocks), trained transformer heads, one joint space."""

    region_dim: int = IMAGE_HEAD_CHANNELS  # channels per region entering the reasoning stack
    text_hidden_dim: int = 384  # all-MiniLM-L6-v2 hidden size
    visual_dim: int = 256  # width of the visual reasoning stack
    visual_layers: int = 2
    joint_dim: int = 256  # dimension of global and concept vectors
    joint_layers: int = 1  # per-modality stacks in the joint space
    heads: int = 4
    feedforward_mult: int = 2
    dropout: float = 0.1
    max_regions: int = 100
    max_tokens: int = 64  # word pieces incl. [CLS] and [SEP]
    # Pooled shortcut: the masked mean of the backbone features, projected into the joint space and
    # added before normalisation to the global vector ("global") or to every vector ("all"). Frozen
    # generic features carry most of their signal in the pooled mean; the transformers refine it.
    pooled_shortcut: str = "none"
    # Top layers of the text backbone trained with the head (initialised from the pretrained ones,
    # stored in the checkpoint); the frozen backbone runs only the layers below them.
    text_tuned_layers: int = 0
    text_tuned_heads: int = 12  # attention heads of those layers (the backbone's)
    # Top MBConv blocks of the image trunk trained with the head, together with its 1x1 head conv
    # (initialised from the pretrained ones, stored in the checkpoint; batch norm statistics stay
    # frozen; blocks with a residual keep EfficientNet's stochastic depth in training, rate 0.2 x
    # block index / 16). The model then takes the backbone's grid below them (`image_input_dim` channels,
    # exactly image_grid x image_grid regions, row-major) and computes the region features itself.
    image_tuned_blocks: int = 0
    image_grid: int = image_grid_cells(PixelSpec().size)  # cells per side of that grid

    def __post_init__(self):
        if self.pooled_shortcut not in SHORTCUT_MODES:
            raise TeranInputError(f"model.pooled_shortcut {self.pooled_shortcut!r} is not one of {list(SHORTCUT_MODES)}")
        if not (isinstance(self.text_tuned_layers, int) and 0 <= self.text_tuned_layers <= TEXT_LAYERS):
            raise TeranInputError(f"model.text_tuned_layers must be an integer within 0..{TEXT_LAYERS}, got {self.text_tuned_layers!r}")
        if self.text_tuned_layers and self.text_hidden_dim % self.text_tuned_heads:
            raise TeranInputError(f"model.text_tuned_heads {self.text_tuned_heads} must divide text_hidden_dim {self.text_hidden_dim}")
        if not (isinstance(self.image_tuned_blocks, int) and 0 <= self.image_tuned_blocks <= IMAGE_TUNABLE_BLOCKS):
            raise TeranInputError(
                f"model.image_tuned_blocks must be an integer within 0..{IMAGE_TUNABLE_BLOCKS} (the trunk's blocks on its final grid), "
                f"got {self.image_tuned_blocks!r}"
            )
        if self.image_tuned_blocks and not (isinstance(self.image_grid, int) and 1 <= self.image_grid <= 32):
            raise TeranInputError(f"model.image_grid must be an integer within 1..32, got {self.image_grid!r}")
        if self.image_tuned_blocks and self.region_dim != IMAGE_HEAD_CHANNELS:
            raise TeranInputError(
                f"model.region_dim must be {IMAGE_HEAD_CHANNELS} (the image trunk's head output) when image_tuned_blocks is set, "
                f"got {self.region_dim}"
            )

    @property
    def image_input_dim(self) -> int:
        """Channels per region the image encoder takes: region_dim, or the trunk's below its tuned blocks."""
        return IMAGE_GRID_CHANNELS if self.image_tuned_blocks else self.region_dim

    @property
    def image_input_regions(self) -> int | None:
        """The exact region count the image encoder needs (a full grid), or None for any count."""
        return self.image_grid**2 if self.image_tuned_blocks else None


@dataclass
class LossConfig:
    # "hinge": VSE++ triplet loss (TERAN/TERN as published); "contrastive": symmetric InfoNCE
    # with a learned temperature per score, which overfits far less on small data sets.
    kind: str = "hinge"
    margin: float = 0.2  # hinge only
    alignment_weight: float = 1.0  # weight of the loss on the MrSw alignment score (TERAN)
    global_weight: float = 1.0  # weight of the loss on the global cosine (TERN)
    alignment_mode: str = "MrSw"
    # Hinge only: epochs summing all violating negatives before switching to the hardest negative (VSE++).
    sum_violations_epochs: int = 1
    # Contrastive only: initial temperatures (learned from there on).
    global_temperature: float = 0.07
    alignment_temperature: float = 1.0
    # Grounding: phrase-to-region cross-entropy on the Flickr30k Entities boxes of the training
    # captions (teran.losses.grounding_loss, summed over the batch's phrases), weighted beside the
    # matching losses; 0 = off.
    grounding_weight: float = 0.0
    grounding_temperature: float = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 30
    captions_per_image: int = 1  # rounds per epoch; each round pairs every image with a different caption
    batch_size: int = 128
    lr: float = 2e-4
    tuned_lr_scale: float = 0.1  # lr multiplier for tuned backbone parts (model.text_tuned_layers, model.image_tuned_blocks)
    lr_decay_epoch: int = 20  # lr x0.1 from this epoch on
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    seed: int = 13
    threads: int = 0  # torch intra-op threads; 0 = all cores
    device: str = "cpu"  # torch device for training, e.g. "cuda"
    eval_images: int = 1000  # dev images scored at the end of each epoch


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise TeranInputError(f"{where}: unknown setting(s) {sorted(unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        nested = {"model": ModelConfig, "loss": LossConfig}.get(name) if cls is TrainConfig else None
        kwargs[name] = _build(nested, value or {}, f"{where}.{name}") if nested else value
    return cls(**kwargs)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model")


def load_train_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise TeranInputError(f"{path}: config file does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TeranInputError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise TeranInputError(f"{path}: expected a mapping of settings")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(TrainConfig, values, str(path or "config"))


def to_dict(config) -> dict:
    return asdict(config)
