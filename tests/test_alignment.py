import numpy as np
import pytest
import torch

from teran import alignment, alignment_numpy


def _random_inputs(seed=0, n_images=4, n_texts=5, regions=6, words=7, dim=8):
    rng = np.random.default_rng(seed)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img = norm(rng.normal(size=(n_images, regions, dim))).astype(np.float32)
    txt = norm(rng.normal(size=(n_texts, words, dim))).astype(np.float32)
    img_mask = rng.random((n_images, regions)) > 0.3
    img_mask[:, 0] = True
    txt_mask = rng.random((n_texts, words)) > 0.3
    txt_mask[:, 0] = True
    return img, img_mask, txt, txt_mask


def _reference(img, img_mask, txt, txt_mask, mode):
    """Loop implementation straight from the TERAN definition."""
    out = np.zeros((len(img), len(txt)))
    for i in range(len(img)):
        for t in range(len(txt)):
            a = img[i] @ txt[t].T
            a[~img_mask[i], :] = 0
            a[:, ~txt_mask[t]] = 0
            mrsw = a.max(axis=0)[txt_mask[t]].sum()
            mwsr = a.max(axis=1)[img_mask[i]].sum()
            out[i, t] = {"MrSw": mrsw, "MwSr": mwsr, "symm": mrsw + mwsr, "MrAVGw": mrsw / txt_mask[t].sum()}[mode]
    return out


@pytest.mark.parametrize("mode", alignment.MODES)
def test_torch_and_numpy_scores_agree_with_the_definition(mode):
    img, img_mask, txt, txt_mask = _random_inputs()
    expected = _reference(img, img_mask, txt, txt_mask, mode)
    got_np = alignment_numpy.alignment_scores(img, img_mask, txt, txt_mask, mode)
    got_torch = alignment.alignment_scores(
        torch.from_numpy(img), torch.from_numpy(img_mask), torch.from_numpy(txt), torch.from_numpy(txt_mask), mode
    ).numpy()
    np.testing.assert_allclose(got_np, expected, atol=1e-5)
    np.testing.assert_allclose(got_torch, expected, atol=1e-5)


def test_chunked_scores_equal_unchunked():
    img, img_mask, txt, txt_mask = _random_inputs(n_images=7, n_texts=9)
    args = [torch.from_numpy(a) for a in (img, img_mask, txt, txt_mask)]
    full = alignment.alignment_scores(*args)
    chunked = alignment.chunked_alignment_scores(*args, image_chunk=3, text_chunk=4)
    torch.testing.assert_close(full, chunked)


def test_global_scores_are_cosines():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 5)).astype(np.float32)
    b = rng.normal(size=(4, 5)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(alignment_numpy.global_scores(a, b), a @ b.T, atol=1e-6)
    np.testing.assert_allclose(alignment.global_scores(torch.from_numpy(a), torch.from_numpy(b)).numpy(), a @ b.T, atol=1e-6)


def test_word_regions_of_single_pieces_are_the_mrsw_terms():
    img, img_mask, txt, txt_mask = _random_inputs(n_images=1, n_texts=1)
    regions, words = img[0][img_mask[0]], txt[0][txt_mask[0]]
    best, sims = alignment_numpy.word_regions(regions, words, [(w,) for w in range(len(words))])
    # One piece per group: each word's best region and cosine, which sum to MrSw.
    score = alignment_numpy.alignment_scores(regions[None], np.ones((1, len(regions)), bool), words[None], np.ones((1, len(words)), bool))
    assert sims.sum() == pytest.approx(float(score[0, 0]), abs=1e-5)
    np.testing.assert_array_equal(best, (words @ regions.T).argmax(axis=1))


def test_blend_scores_agree_between_torch_and_numpy():
    rng = np.random.default_rng(3)
    g, a = rng.uniform(-1, 1, (4, 6)).astype(np.float32), rng.uniform(-1, 1, (4, 6)).astype(np.float32)
    want = g + 0.3 * a
    np.testing.assert_allclose(alignment_numpy.blend_scores(g, a, 0.3), want, atol=1e-6)
    np.testing.assert_allclose(alignment.blend_scores(torch.from_numpy(g), torch.from_numpy(a), 0.3).numpy(), want, atol=1e-6)


def test_unknown_mode_is_rejected():
    img, img_mask, txt, txt_mask = _random_inputs()
    with pytest.raises(ValueError, match="unknown alignment mode 'foo'"):
        alignment_numpy.alignment_scores(img, img_mask, txt, txt_mask, "foo")
