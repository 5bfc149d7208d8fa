"""Our TERAN variant: image regions and caption words reasoned over by transformer encoders
and matched in one joint space.

Every branch returns `Encoded`: one global vector per item (position 0: the image's global
slot, the caption's [CLS]) and the concept vectors (one per region / word piece), all
L2-normalised, with a mask marking real concepts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from teran.backbones import TunedImageStage, bert_layer_stack
from teran.config import ModelConfig


class Encoded(NamedTuple):
    global_vec: torch.Tensor  # [B, D]
    concepts: torch.Tensor  # [B, N, D]
    concept_mask: torch.Tensor  # [B, N] bool, True for real regions / words


def _encoder_stack(width: int, layers: int, cfg: ModelConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=width,
        nhead=cfg.heads,
        dim_feedforward=width * cfg.feedforward_mult,
        dropout=cfg.dropout,
        batch_first=True,
    )
    # Nested tensors change numerics between eval and export; keep the dense path everywhere.
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1, eps=1e-12)


def spatial_inputs(regions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """TERAN's spatial encoding input: feature ++ (x1, y1, x2, y2, area) on normalised boxes."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([regions, boxes, area.unsqueeze(-1)], dim=-1)


class PooledShortcut(nn.Module):
    """Masked mean of backbone features [B, N, C] -> [B, D]: normalised, then one linear map."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(features.dtype)
        pooled = (features * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.projection(self.dropout(self.norm(pooled)))


def _add_shortcut(x: torch.Tensor, shortcut: torch.Tensor, mode: str) -> torch.Tensor:
    """x [B, 1 + N, D] (position 0 is the global slot) + shortcut [B, D] per `mode`."""
    if mode == "all":
        return x + shortcut.unsqueeze(1)
    return torch.cat([x[:, :1] + shortcut.unsqueeze(1), x[:, 1:]], dim=1)


def _make_shortcut(in_dim: int, cfg: ModelConfig) -> PooledShortcut | None:
    return None if cfg.pooled_shortcut == "none" else PooledShortcut(in_dim, cfg.joint_dim, cfg.dropout)


class ImageEncoder(nn.Module):
    """Region features [B, R, C] + normalised boxes [B, R, 4] + mask [B, R] -> Encoded (N = R).

    With `image_tuned_blocks` > 0 the regions are the backbone's grid below those blocks
    (C = cfg.image_input_dim, R = image_grid**2 cells, row-major, all real), and the encoder runs
    its own trained copies of the blocks and head conv first (`tuned`) to get the region features.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = cfg.image_grid
        self.tuned = TunedImageStage(cfg.image_tuned_blocks) if cfg.image_tuned_blocks else None
        self.spatial = nn.Sequential(nn.Linear(cfg.region_dim + 5, cfg.visual_dim), nn.ReLU(), nn.Linear(cfg.visual_dim, cfg.visual_dim))
        self.global_slot = nn.Parameter(torch.zeros(1, 1, cfg.visual_dim))
        nn.init.normal_(self.global_slot, std=0.02)
        self.reasoning = _encoder_stack(cfg.visual_dim, cfg.visual_layers, cfg)
        self.projection = nn.Linear(cfg.visual_dim, cfg.joint_dim)
        self.joint = _encoder_stack(cfg.joint_dim, cfg.joint_layers, cfg)
        self.shortcut_mode = cfg.pooled_shortcut
        self.shortcut = _make_shortcut(cfg.region_dim, cfg)

    def forward(self, regions: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor) -> Encoded:
        if self.tuned is not None:
            if regions.shape[1] != self.grid * self.grid:
                raise ValueError(
                    f"the tuned image stage takes the backbone's {self.grid}x{self.grid} grid ({self.grid**2} regions), "
                    f"got {regions.shape[1]} regions"
                )
            grid = regions.transpose(1, 2).reshape(regions.shape[0], regions.shape[2], self.grid, self.grid)
            regions = self.tuned(grid).flatten(2).transpose(1, 2)
        x = self.spatial(spatial_inputs(regions, boxes))
        x = torch.cat([self.global_slot.expand(x.shape[0], -1, -1), x], dim=1)
        valid = torch.cat([torch.ones_like(region_mask[:, :1]), region_mask], dim=1)
        padding = ~valid
        x = self.reasoning(x, src_key_padding_mask=padding)
        x = self.joint(self.projection(x), src_key_padding_mask=padding)
        if self.shortcut is not None:
            x = _add_shortcut(x, self.shortcut(regions, region_mask), self.shortcut_mode)
        x = _normalise(x)
        return Encoded(x[:, 0], x[:, 1:], region_mask)


def word_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask of word pieces: real tokens minus [CLS] (position 0) and [SEP] (last real token).

    Returned for positions 1.. so it lines up with `Encoded.concepts` of the text branch.
    """
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1)
    positions = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    words = valid & (positions != 0) & (positions != (lengths - 1).unsqueeze(1))
    return words[:, 1:]


class TextHead(nn.Module):
    """Backbone hidden states [B, L, H] + attention mask [B, L] -> Encoded (N = L - 1).

    With `text_tuned_layers` > 0 the hidden states come from the backbone without its top layers,
    and the head runs its own trained copies of them first (`tuned`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tuned = cfg.text_tuned_layers
        self.tuned = bert_layer_stack(tuned, cfg.text_hidden_dim, cfg.text_tuned_heads, cfg.dropout) if tuned else None
        self.projection = nn.Linear(cfg.text_hidden_dim, cfg.joint_dim)
        self.joint = _encoder_stack(cfg.joint_dim, cfg.joint_layers, cfg)
        self.shortcut_mode = cfg.pooled_shortcut
        self.shortcut = _make_shortcut(cfg.text_hidden_dim, cfg)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        if self.tuned is not None:
            hidden = self.tuned(hidden, src_key_padding_mask=~attention_mask.bool())
        x = self.joint(self.projection(hidden), src_key_padding_mask=~attention_mask.bool())
        if self.shortcut is not None:
            # Mean over every real token, [CLS] and [SEP] included: the backbone's own sentence pooling.
            x = _add_shortcut(x, self.shortcut(hidden, attention_mask.bool()), self.shortcut_mode)
        x = _normalise(x)
        return Encoded(x[:, 0], x[:, 1:], word_mask(attention_mask))


class TextEncoder(nn.Module):
    """Token ids + attention mask -> Encoded: the (frozen) text backbone followed by the head.

    A head with tuned layers needs the backbone loaded without them:
    `teran.backbones.load_text_backbone(drop_top_layers=config.text_tuned_layers)`.
    """

    def __init__(self, backbone: nn.Module, head: TextHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden, attention_mask)


class TeranModel(nn.Module):
    """The trainable part of our model: image encoder and text head (plus any tuned backbone parts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.image = ImageEncoder(cfg)
        self.text = TextHead(cfg)
