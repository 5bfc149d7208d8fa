"""Test doubles that need torch (imported only by tests that export or train)."""

from __future__ import annotations

import torch
from torch import nn

from teran.config import IMAGE_STRIDE, image_grid_cells
from teran.preprocess import grid_boxes


class TinyGridBackbone(nn.Module):
    """Stand-in for GridImageBackbone: pixels [B, 3, size, size] -> its grid's regions (one per
    IMAGE_STRIDE x IMAGE_STRIDE patch) of `channels` features, and their boxes."""

    def __init__(self, size: int = 224, channels: int = 12):
        super().__init__()
        self.grid = image_grid_cells(size)
        self.conv = nn.Conv2d(3, channels, kernel_size=IMAGE_STRIDE, stride=IMAGE_STRIDE)
        self.register_buffer("boxes", torch.from_numpy(grid_boxes(self.grid)), persistent=False)

    def forward(self, pixels):
        regions = torch.relu(self.conv(pixels)).flatten(2).transpose(1, 2)
        return regions, self.boxes.unsqueeze(0).expand(pixels.shape[0], -1, -1)
