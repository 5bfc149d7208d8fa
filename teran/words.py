"""Whole words from WordPiece labels, and which of them an explanation shows (torch-free).

A caption's concept vectors are its word pieces ("fr", "##is", "##bee"); a person reads words
("frisbee"). Explanations join the pieces of each word and leave out punctuation and function
words (articles, prepositions, pronouns, auxiliaries), which name nothing in a photo.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTINUATION = "##"  # WordPiece marks the pieces after a word's first with this prefix

STOP_WORDS = frozenset(
    """
    a an the this that these those there here some any each every another other such
    in on at of to for with without from by as into onto upon off out up down over under above below
    near next beside behind between through across along around about against toward towards among
    and or but nor so yet while than then
    is are was were be been being am has have had having do does did doing will would can could
    may might must shall should
    it its it's he him his she her hers they them their theirs we us our you your i me my one ones
    who whom whose which what where when how why
    not no very just too also only s t
    """.split()
)


@dataclass(frozen=True)
class Word:
    text: str  # the word, its pieces joined without the "##" marks
    pieces: tuple[int, ...]  # positions of its word pieces among the caption's concepts


def join_pieces(labels: list[str]) -> list[Word]:
    """Group WordPiece labels into words: a label starting with "##" continues the word before it."""
    words: list[tuple[str, list[int]]] = []
    for index, label in enumerate(labels):
        if label.startswith(CONTINUATION) and words:
            text, pieces = words[-1]
            words[-1] = (text + label[len(CONTINUATION) :], [*pieces, index])
        else:
            words.append((label.removeprefix(CONTINUATION), [index]))
    return [Word(text, tuple(pieces)) for text, pieces in words]


def is_content_word(text: str) -> bool:
    """True for a word an explanation shows: it has a letter or digit and is not a function word."""
    return any(ch.isalnum() for ch in text) and text.lower() not in STOP_WORDS


def content_words(labels: list[str]) -> list[Word]:
    """The words of a caption that an explanation shows, in caption order."""
    return [word for word in join_pieces(labels) if is_content_word(word.text)]
