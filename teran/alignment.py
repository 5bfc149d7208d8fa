"""TERAN scores in torch (training, evaluation). teran.alignment_numpy is the serving twin.

Alignment matrix A[r, w] = <region_r, word_w>, entries touching padding set to 0 (as in
TERAN). Modes:
  MrSw   sum over words of the max over regions (the main TERAN score; ColBERT MaxSim)
  MwSr   sum over regions of the max over words
  symm   MrSw + MwSr
  MrAVGw MrSw / number of words
"""

from __future__ import annotations

import torch

MODES = ("MrSw", "MwSr", "symm", "MrAVGw")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown alignment mode {mode!r}; choose one of {MODES}")


def alignment_scores(
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    mode: str = "MrSw",
) -> torch.Tensor:
    """Every image against every caption: [Ni, R, D] x [Nt, W, D] -> scores [Ni, Nt]."""
    check_mode(mode)
    sims = torch.einsum("ird,twd->itrw", regions, words)
    valid = region_mask[:, None, :, None] & word_mask[None, :, None, :]
    sims = sims.masked_fill(~valid, 0.0)
    scores = torch.zeros(sims.shape[:2], dtype=sims.dtype, device=sims.device)
    if mode in ("MrSw", "symm", "MrAVGw"):
        scores = scores + sims.max(dim=2).values.sum(dim=-1)
    if mode in ("MwSr", "symm"):
        scores = scores + sims.max(dim=3).values.sum(dim=-1)
    if mode == "MrAVGw":
        scores = scores / word_mask.sum(dim=1).clamp(min=1).to(scores.dtype)[None, :]
    return scores


def global_scores(image_global: torch.Tensor, text_global: torch.Tensor) -> torch.Tensor:
    """Cosine of normalised global vectors: [Ni, D] x [Nt, D] -> [Ni, Nt]."""
    return image_global @ text_global.T


def blend_scores(global_: torch.Tensor, alignment: torch.Tensor, weight: float) -> torch.Tensor:
    """The served ranking score: global cosine + weight x MrSw (the alignment score, a sum over the
    caption's word pieces)."""
    return global_ + weight * alignment


@torch.no_grad()
def chunked_alignment_scores(
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    mode: str = "MrSw",
    image_chunk: int = 100,
    text_chunk: int = 500,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """alignment_scores over a whole gallery in memory-bounded blocks (computed on `device`)."""
    out = torch.empty(regions.shape[0], words.shape[0])
    words, word_mask = words.to(device), word_mask.to(device)
    for i in range(0, regions.shape[0], image_chunk):
        block, block_mask = regions[i : i + image_chunk].to(device), region_mask[i : i + image_chunk].to(device)
        for t in range(0, words.shape[0], text_chunk):
            out[i : i + image_chunk, t : t + text_chunk] = alignment_scores(
                block, block_mask, words[t : t + text_chunk], word_mask[t : t + text_chunk], mode
            ).cpu()
    return out
