"""Matching losses on the alignment score (TERAN) and the global cosine (TERN): the VSE++ hinge
triplet loss of the papers, or a symmetric InfoNCE with learned temperatures; and the grounding
loss that teaches each phrase's words the regions inside its boxes."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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


def contrastive_loss(scores: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch: scores[i, j] = s(image i, caption j), pairs on the diagonal.

    Each image must pick its caption among the batch's captions and vice versa. The logits are
    scores * exp(log_scale), the inverse temperature, capped at 100 as in CLIP. Mean over anchors.
    """
    logits = scores * log_scale.exp().clamp(max=100.0)
    targets = torch.arange(scores.shape[0], device=scores.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def grounding_loss(
    image_concepts: torch.Tensor,
    text_concepts: torch.Tensor,
    owner: torch.Tensor,
    pieces: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Phrase-to-region cross-entropy, summed over the batch's phrases (as the matching losses sum over its pairs).

    Phrase p of batch pair owner[p] is the mean of its word-piece concepts (pieces [P, L] marks
    them among the caption's concept positions); its similarity to each region of the pair's own
    image, over `temperature`, is a softmax over the regions, and the loss is minus the log of the
    probability mass on its target regions (those inside its boxes, targets [P, R]).
    """
    width = text_concepts.shape[1]
    if pieces.shape[1] < width:
        pieces = torch.nn.functional.pad(pieces, (0, width - pieces.shape[1]))
    weights = pieces[:, :width].to(text_concepts.dtype)
    phrase = torch.einsum("pl,pld->pd", weights / weights.sum(dim=1, keepdim=True), text_concepts[owner])
    logits = torch.einsum("pd,prd->pr", phrase, image_concepts[owner]) / temperature
    on_target = logits.masked_fill(~targets, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - on_target).sum()


class PhraseBatch(NamedTuple):
    """A training batch's phrases: owner [P] (batch row), pieces [P, L] bool, targets [P, R] bool."""

    owner: torch.Tensor
    pieces: torch.Tensor
    targets: torch.Tensor


LOSS_KINDS = ("hinge", "contrastive")


class TeranLoss(nn.Module):
    """Weighted sum of one matching loss on the alignment scores and one on the global scores.

    A module because the contrastive kind learns its temperatures: optimise it with the model.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        if cfg.kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {cfg.kind!r}; choose one of {LOSS_KINDS}")
        self.cfg = cfg
        if cfg.kind == "contrastive":
            self.global_log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.global_temperature)))
            self.alignment_log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.alignment_temperature)))

    def _loss(self, scores: torch.Tensor, which: str, hardest: bool) -> torch.Tensor:
        if self.cfg.kind == "contrastive":
            return contrastive_loss(scores, getattr(self, f"{which}_log_scale"))
        return hinge_triplet_loss(scores, self.cfg.margin, hardest)

    def forward(self, image: Encoded, text: Encoded, hardest: bool, phrases: PhraseBatch | None = None) -> dict[str, torch.Tensor]:
        cfg, parts = self.cfg, {}
        if cfg.alignment_weight:
            alignment = alignment_scores(image.concepts, image.concept_mask, text.concepts, text.concept_mask, cfg.alignment_mode)
            parts["alignment"] = cfg.alignment_weight * self._loss(alignment, "alignment", hardest)
        if cfg.global_weight:
            parts["global"] = cfg.global_weight * self._loss(global_scores(image.global_vec, text.global_vec), "global", hardest)
        if cfg.grounding_weight and phrases is not None and len(phrases.owner):
            parts["grounding"] = cfg.grounding_weight * grounding_loss(
                image.concepts, text.concepts, phrases.owner, phrases.pieces, phrases.targets, cfg.grounding_temperature
            )
        parts["total"] = sum(parts.values())
        return parts
