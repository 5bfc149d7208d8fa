"""Grounding: phrase-to-word-piece mapping, the pointing game and its baselines, the grounding loss,
and the words an explanation shows."""

import numpy as np
import pytest
import torch

from teran.backbones import tokenizer_file
from teran.grounding import (
    Phrase,
    PhraseCaption,
    build_phrase_set,
    phrase_region_scores,
    pointing_game,
    points_in_boxes,
    token_of_pieces,
    training_targets,
)
from teran.losses import grounding_loss
from teran.preprocess import grid_boxes
from teran.tokenization import CaptionTokenizer
from teran.words import content_words, join_pieces


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(tokenizer_file(), max_tokens=16)


def phrase(first: int, words: int, boxes, types=("other",)) -> Phrase:
    return Phrase("", tuple(types), first, words, np.asarray(boxes, np.float32))


def test_word_pieces_map_to_caption_tokens(tokenizer):
    caption = "A dog catches a frisbee ."
    batch = tokenizer.encode([caption])
    assert batch.tokens[0] == ["[CLS]", "a", "dog", "catches", "a", "fr", "##is", "##bee", ".", "[SEP]"]
    assert token_of_pieces(caption, batch.offsets[0]) == [-1, 0, 1, 2, 3, 4, 4, 4, 5, -1]


def test_hits_need_a_centre_strictly_inside_a_box_and_training_targets_cover_tiny_boxes():
    grid = grid_boxes(2)  # cell centres at 0.25 and 0.75
    centres = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]], np.float32)
    assert points_in_boxes(centres, np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)).tolist() == [True, False, False, False]
    assert points_in_boxes(centres, np.array([[0.25, 0.0, 1.0, 1.0]], np.float32)).tolist() == [False, True, False, True]  # edge: out
    tiny = np.array([[0.55, 0.6, 0.6, 0.65]], np.float32)  # holds no centre: its centre's cell is the target
    assert not points_in_boxes(centres, tiny).any()
    assert training_targets(grid, tiny).tolist() == [False, False, False, True]


def test_pointing_game_on_known_concepts(tokenizer):
    # 2x2 grid; image 0's regions are the unit axes e0..e3. "dog" (pieces of tokens 1) points where its vector is.
    captions = [
        PhraseCaption("p0.jpg", "a dog on grass", 0, [phrase(0, 2, [[0.5, 0.5, 1.0, 1.0]], ["animals"]), phrase(3, 1, [[0, 0, 1, 0.5]])]),
        PhraseCaption("p1.jpg", "a dog", 1, [phrase(1, 1, [[0.0, 0.0, 0.5, 0.5]], ["animals"])]),
    ]
    phrases = build_phrase_set(captions, {"p0.jpg": 0, "p1.jpg": 1}, grid_boxes(2), tokenizer)
    assert phrases.pieces.tolist()[0][:4] == [True, True, False, False]  # "a dog"
    assert phrases.pieces.tolist()[1][:4] == [False, False, False, True]  # "grass"
    eye = np.eye(4, dtype=np.float32)
    images = np.stack([eye, eye])  # region r = e_r
    words = np.zeros((2, 5, 4), np.float32)
    words[0, 1] = eye[3]  # "dog" of caption 0 -> region 3 (bottom right: inside its box)
    words[0, 3] = eye[2]  # "grass" -> region 2 (bottom left: its box is the top half: a miss)
    words[1, 1] = eye[0]  # "dog" of caption 1 -> region 0 (top left: a hit)
    scores = phrase_region_scores(images, words, phrases)
    result = pointing_game(scores, phrases)
    assert result["hits"].tolist() == [True, False, True]
    assert result["pointing"] == pytest.approx(2 / 3)
    # Baselines: the photo's centre (0.5, 0.5) lies on an edge of every box here, so in none of them.
    assert result["baselines"]["center"] == pytest.approx(0.0)
    assert result["baselines"]["random"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    assert result["by_type"]["animals"] == {"phrases": 2, "pointing": 1.0, "center": 0.0, "random": 0.25}
    rows, owner = phrases.rows_of(np.array([1, 0]))
    assert phrases.caption[rows].tolist() == [1, 0, 0] and owner.tolist() == [0, 1, 1]


def test_grounding_loss_is_the_cross_entropy_of_the_target_regions():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    owner = torch.tensor([0, 1])
    pieces = torch.tensor([[True, True, False], [False, False, True]])
    targets = torch.tensor([[False, True, True, False], [True, False, False, False]])
    loss = grounding_loss(image, text, owner, pieces, targets, 0.1)
    want = []
    for p in range(2):
        phrase_vector = text[owner[p]][pieces[p]].mean(dim=0)
        logits = image[owner[p]] @ phrase_vector / 0.1
        want.append(-(logits.softmax(dim=0)[targets[p]].sum().log()))
    assert loss.item() == pytest.approx(torch.stack(want).sum().item(), rel=1e-5)  # summed over phrases
    # Pointing every phrase at its target makes the loss small.
    aligned = image.clone()
    aligned[0, 1] = text[0, :2].mean(dim=0) / text[0, :2].mean(dim=0).norm()
    aligned[1, 0] = text[1, 2]
    assert grounding_loss(aligned, text, owner, pieces, targets, 0.05).item() < loss.item()


def test_explanations_show_whole_content_words():
    labels = ["a", "black", "dog", "jumps", "to", "catch", "a", "fr", "##is", "##bee", ",", "it", "'", "s", "2"]
    assert [w.text for w in join_pieces(labels)][6:8] == ["a", "frisbee"]
    shown = content_words(labels)
    assert [(w.text, w.pieces) for w in shown] == [
        ("black", (1,)),
        ("dog", (2,)),
        ("jumps", (3,)),
        ("catch", (5,)),
        ("frisbee", (7, 8, 9)),
        ("2", (14,)),
    ]
