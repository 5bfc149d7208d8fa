"""VSE++ hinge triplet loss, applied to the alignment score (TERAN) and the global cosine (TERN)."""

from __future__ import annotations

import torch

from teran.alignment import alignment_scores, global_scores
from teran.config import LossConfig
from teran.model import Encoded


def hinge_triplet_loss(scores: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """scores[i, j] = s(image i, caption j), matching pairs on the diagonal; summed over the batch.

    hardest=True keeps only the hardest in-batch negative per anchor (VSE++ max violation);
    otherwise every violating negative counts.
    """
    positives = scores.diag()
    cost_caption = (margin + scores - positives[:, None]).clamp(min=0)  # image anchor, negative captions
    cost_image = (margin + scores - positives[None, :]).clamp(min=0)  # caption anchor, negative images
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


class TeranLoss:
    """Weighted sum of the hinge loss on the alignment scores and on the global scores."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(self, image: Encoded, text: Encoded, hardest: bool) -> dict[str, torch.Tensor]:
        parts = {}
        if self.cfg.alignment_weight:
            scores = alignment_scores(image.concepts, image.concept_mask, text.concepts, text.concept_mask, self.cfg.alignment_mode)
            parts["alignment"] = self.cfg.alignment_weight * hinge_triplet_loss(scores, self.cfg.margin, hardest)
        if self.cfg.global_weight:
            scores = global_scores(image.global_vec, text.global_vec)
            parts["global"] = self.cfg.global_weight * hinge_triplet_loss(scores, self.cfg.margin, hardest)
        parts["total"] = sum(parts.values())
        return parts
