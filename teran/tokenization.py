"""WordPiece tokenization for the text branch (torch-free; shared by training and serving)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from teran.errors import CaptionError


@dataclass
class TokenizedBatch:
    input_ids: np.ndarray  # int64 [B, L]
    attention_mask: np.ndarray  # int64 [B, L], 1 for real tokens
    tokens: list[list[str]]  # word pieces per caption, including [CLS] and [SEP]
    offsets: list[list[tuple[int, int]]]  # per piece: (start, end) characters in its caption; (0, 0) for [CLS] / [SEP]


class CaptionTokenizer:
    """Wraps a `tokenizer.json` (BERT uncased WordPiece) with explicit length limits."""

    def __init__(self, tokenizer_file: str | Path, max_tokens: int = 64, max_chars: int = 1000):
        if max_tokens < 3:
            raise ValueError("max_tokens must be at least 3 ([CLS], one word, [SEP])")
        self.tokenizer_file = Path(tokenizer_file)
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def encode(self, captions: list[str], truncate: bool = False) -> TokenizedBatch:
        """Tokenize and pad captions to the longest one.

        Over-long captions raise CaptionError unless `truncate` (used for training data).
        """
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise CaptionError(f"caption {index}: empty caption")
            if len(caption) > self.max_chars:
                raise CaptionError(f"caption {index}: {len(caption)} characters exceeds the limit of {self.max_chars}")
        encodings = self._tokenizer.encode_batch(captions)
        ids, tokens, offsets = [], [], []
        for index, encoding in enumerate(encodings):
            piece_ids, pieces, spans = list(encoding.ids), list(encoding.tokens), list(encoding.offsets)
            if len(piece_ids) > self.max_tokens:
                if not truncate:
                    raise CaptionError(
                        f"caption {index}: {len(piece_ids)} word pieces exceeds the limit of {self.max_tokens} (including [CLS] and [SEP])"
                    )
                piece_ids = piece_ids[: self.max_tokens - 1] + piece_ids[-1:]
                pieces = pieces[: self.max_tokens - 1] + pieces[-1:]
                spans = spans[: self.max_tokens - 1] + spans[-1:]
            if len(piece_ids) < 3:
                raise CaptionError(f"caption {index}: no word pieces after normalisation")
            ids.append(piece_ids)
            tokens.append(pieces)
            offsets.append([tuple(span) for span in spans])
        length = max(len(row) for row in ids)
        input_ids = np.zeros((len(ids), length), dtype=np.int64)
        attention_mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, piece_ids in enumerate(ids):
            input_ids[row, : len(piece_ids)] = piece_ids
            attention_mask[row, : len(piece_ids)] = 1
        return TokenizedBatch(input_ids, attention_mask, tokens, offsets)
