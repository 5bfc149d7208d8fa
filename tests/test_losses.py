import math

import pytest
import torch

from teran.config import LossConfig
from teran.losses import TeranLoss, contrastive_loss, hinge_triplet_loss
from teran.model import Encoded


def test_hinge_loss_hardest_negative_values():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.1, 0.7]])
    # image anchors: row max negatives 0.8 (img0), 0.6 (img1), 0.1 (img2)
    # caption anchors: column max negatives 0.2 (cap0), 0.8 (cap1), 0.6 (cap2)
    margin = 0.2
    expected_rows = max(0, 0.2 + 0.8 - 0.9) + max(0, 0.2 + 0.6 - 0.5) + max(0, 0.2 + 0.1 - 0.7)
    expected_cols = max(0, 0.2 + 0.2 - 0.9) + max(0, 0.2 + 0.8 - 0.5) + max(0, 0.2 + 0.6 - 0.7)
    got = hinge_triplet_loss(scores, margin, hardest=True)
    assert torch.isclose(got, torch.tensor(expected_rows + expected_cols))


def test_hinge_loss_sum_of_violations_counts_every_negative():
    scores = torch.tensor([[0.5, 0.45, 0.4], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    got = hinge_triplet_loss(scores, 0.2, hardest=False)
    # Violations: image0 vs captions 1 (0.15) and 2 (0.1); caption1 vs image0 (0.15); caption2 vs image0 (0.1).
    assert torch.isclose(got, torch.tensor(0.5))


def test_perfectly_separated_batch_has_zero_loss():
    scores = torch.eye(4) * 1.0
    assert hinge_triplet_loss(scores, 0.2, hardest=True).item() == 0.0


def test_contrastive_loss_values():
    scores = torch.tensor([[0.9, 0.1], [0.3, 0.8]])
    log_scale = torch.tensor(math.log(10.0))
    logits = scores * 10.0
    rows = -torch.log_softmax(logits, dim=1).diag().mean()
    cols = -torch.log_softmax(logits, dim=0).diag().mean()
    assert torch.isclose(contrastive_loss(scores, log_scale), (rows + cols) / 2)


def test_contrastive_loss_falls_as_pairs_separate():
    mixed = torch.tensor([[0.5, 0.4], [0.4, 0.5]])
    separated = torch.tensor([[0.9, 0.0], [0.0, 0.9]])
    log_scale = torch.tensor(math.log(1 / 0.07))
    assert contrastive_loss(separated, log_scale) < contrastive_loss(mixed, log_scale)


def _encoded(batch: int, n: int, dim: int, seed: int) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    normalise = torch.nn.functional.normalize
    return Encoded(
        normalise(torch.randn(batch, dim, generator=generator), dim=-1),
        normalise(torch.randn(batch, n, dim, generator=generator), dim=-1),
        torch.ones(batch, n, dtype=torch.bool),
    )


def test_contrastive_teran_loss_learns_its_temperatures():
    loss = TeranLoss(LossConfig(kind="contrastive", global_temperature=0.05, alignment_temperature=0.5))
    assert {name for name, _ in loss.named_parameters()} == {"global_log_scale", "alignment_log_scale"}
    assert math.isclose(loss.global_log_scale.exp().item(), 20.0, rel_tol=1e-5)
    parts = loss(_encoded(4, 3, 8, 0), _encoded(4, 5, 8, 1), hardest=False)
    assert set(parts) == {"alignment", "global", "total"}
    parts["total"].backward()
    assert loss.global_log_scale.grad is not None and loss.alignment_log_scale.grad is not None


def test_hinge_teran_loss_has_no_parameters_and_unknown_kind_is_refused():
    assert list(TeranLoss(LossConfig()).parameters()) == []
    with pytest.raises(ValueError, match="unknown loss kind 'triplet'"):
        TeranLoss(LossConfig(kind="triplet"))
