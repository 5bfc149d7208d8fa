import numpy as np
import pytest
from rouge_score import rouge_scorer

from teran.metrics import RougeL, caption_relevance, ndcg_at_k, recall_at_k

CAPTIONS = [
    "A dog runs on the grass .",
    "The brown dog is running on green grass",
    "Two children play football in a park",
    "kids playing soccer , outside",
    "A man rides a bike down a mountain trail .",
    "a",
]


def test_rouge_l_matches_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = RougeL(CAPTIONS)
    got = rouge.pairwise(np.arange(len(CAPTIONS)), np.arange(len(CAPTIONS)))
    for i, a in enumerate(CAPTIONS):
        for j, b in enumerate(CAPTIONS):
            assert got[i, j] == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-6), (a, b)


def test_rouge_l_handles_long_captions_and_chunking():
    long = " ".join(f"w{i}" for i in range(70))
    caps = [long, long[: len(long) // 2], "w1 w3 w5 unrelated"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    got = RougeL(caps).pairwise(np.arange(3), np.arange(3), chunk=2)
    for i in range(3):
        for j in range(3):
            # Captions are cut to 63 tokens for the bit-parallel LCS; these stay within that when short.
            if i != 0 and j != 0:
                assert got[i, j] == pytest.approx(scorer.score(caps[i], caps[j])["rougeL"].fmeasure, abs=1e-6)
    assert got[0, 0] == pytest.approx(1.0)


def test_recall_counts_ranks_in_both_directions():
    owners = np.array([0, 0, 1, 1])
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.2],  # image 0: own caption 0 ranks first
            [0.7, 0.6, 0.5, 0.4],  # image 1: own captions 2, 3 rank 3rd and 4th
        ]
    )
    out = recall_at_k(scores, owners)
    assert out["i2t"]["r1"] == 50.0 and out["i2t"]["r5"] == 100.0
    # t2i: caption0 -> img0 first (hit); caption1: img1 0.6 > img0 0.1 (miss);
    # caption2: img0 0.8 > img1 0.5 (miss); caption3: img1 0.4 > img0 0.2 (hit)
    assert out["t2i"]["r1"] == 50.0
    assert out["rsum"] == pytest.approx(50 + 100 + 100 + 50 + 100 + 100)


def test_ndcg_is_one_for_ideal_ranking_and_lower_otherwise():
    relevance = np.array([[0.9, 0.5, 0.1, 0.0]])
    assert ndcg_at_k(np.array([[4.0, 3.0, 2.0, 1.0]]), relevance, k=3) == pytest.approx(1.0)
    worse = ndcg_at_k(np.array([[1.0, 2.0, 3.0, 4.0]]), relevance, k=3)
    assert 0.0 < worse < 1.0


def test_caption_relevance_averages_over_an_images_captions():
    owners = np.array([0, 0, 1, 1, 2, 2])
    relevance = caption_relevance(CAPTIONS, owners)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = np.mean([scorer.score(CAPTIONS[0], CAPTIONS[k])["rougeL"].fmeasure for k in (2, 3)])
    assert relevance.shape == (6, 3)
    assert relevance[0, 1] == pytest.approx(expected, abs=1e-6)
    assert relevance[0, 0] > relevance[0, 1]
