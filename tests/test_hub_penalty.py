"""bench/hub_penalty.py: the CSLS-style hub statistic and penalty, on scores built so the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def probe():
    return load_bench("hub_penalty")


def test_hub_statistic_is_the_mean_of_the_k_best_bank_scores(probe):
    bank = np.array([[0.1, 0.9, 0.5, 0.7], [0.2, 0.2, 0.2, 0.2]])
    np.testing.assert_allclose(probe.hub_statistic(bank, 2), [0.8, 0.2])
    np.testing.assert_allclose(probe.hub_statistic(bank, 10), bank.mean(axis=1))  # k beyond the bank: all of it


def test_penalty_demotes_a_hub_photo_and_a_hub_caption(probe):
    # 3 photos, 3 captions (caption c belongs to photo c). Photo 0 scores 0.9+ with every caption (a hub)
    # and takes captions 1 and 2 from their photos; caption 2 (a hub caption) takes photo 1's first place.
    scores = np.array([[0.95, 0.9, 0.95], [0.1, 0.8, 0.85], [0.1, 0.1, 0.9]])
    owners = np.arange(3)
    before = probe.direction_recall(scores, scores, owners)
    assert before["t2i"]["r1"] == pytest.approx(100 / 3, abs=0.01) and before["i2t"]["r1"] == pytest.approx(200 / 3, abs=0.01)
    image_hub = np.array([0.9, 0.1, 0.1])  # photo 0 scores high against any bank caption
    caption_hub = np.array([0.1, 0.1, 0.9])  # caption 2 scores high against any bank photo
    t2i_scores, i2t_scores = probe.penalised(scores, image_hub, caption_hub, 0.5)
    np.testing.assert_allclose(t2i_scores[:, 1], scores[:, 1] - 0.5 * image_hub)
    np.testing.assert_allclose(i2t_scores[1], scores[1] - 0.5 * caption_hub)
    after = probe.direction_recall(t2i_scores, i2t_scores, owners)
    assert after["t2i"]["r1"] == 100.0 and after["i2t"]["r1"] == 100.0


def test_bad_flags_exit_2(probe):
    with pytest.raises(SystemExit) as info:
        probe.main(["--k", "0"])
    assert info.value.code == 2
