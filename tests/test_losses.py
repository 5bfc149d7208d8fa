import torch

from teran.losses import hinge_triplet_loss


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
