"""Tokenizer and vocabulary: the same code at training and at serving time.

The tokenizer lower-cases and splits text the way GloVe's vocabulary was built (words, numbers,
words with inner apostrophes/hyphens/dots, and single punctuation marks). Ids are ``int32``
(the seed's int64 ids doubled the RAM of every batch for nothing). Id 0 is padding, id 1 is
out-of-vocabulary; real words start at 2.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.artifact import OOV_ID, OOV_TOKEN, PAD_ID, PAD_TOKEN, TokenizerSpec
from server.errors import ArtifactError

# Words (with inner ' - . joining word characters) or one non-space, non-word character.
_TOKEN_RE = re.compile(r"\w+(?:['\-.]\w+)*|[^\w\s]")

IdArray = npt.NDArray[np.int32]


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split ``text`` into GloVe-style tokens. Never raises on any ``str``."""
    if lowercase:
        text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return _TOKEN_RE.findall(text)


class Vocabulary:
    """Token ↔ id mapping. Line ``i`` of ``vocab.txt`` is the token with id ``i``."""

    __slots__ = ("_ids", "tokens")

    def __init__(self, tokens: Sequence[str]) -> None:
        if len(tokens) < 2 or tokens[PAD_ID] != PAD_TOKEN or tokens[OOV_ID] != OOV_TOKEN:
            raise ArtifactError(
                f"vocabulary must start with {PAD_TOKEN!r} and {OOV_TOKEN!r} (ids 0 and 1)"
            )
        self.tokens: list[str] = list(tokens)
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            self._ids.setdefault(tok, i)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> Vocabulary:
        """PAD and OOV followed by ``words`` (duplicates keep their first id)."""
        return cls([PAD_TOKEN, OOV_TOKEN, *words])

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: vocabulary file not found") from exc
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{path}: vocabulary is not UTF-8") from exc
        tokens = text.split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls(tokens)

    def save(self, path: Path) -> None:
        if any("\n" in t for t in self.tokens):
            raise ArtifactError("vocabulary tokens must not contain newlines")
        Path(path).write_text("\n".join(self.tokens) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        return self._ids.get(token, OOV_ID)

    def ids(self, tokens: Iterable[str]) -> list[int]:
        get = self._ids.get
        return [get(t, OOV_ID) for t in tokens]


class Tokenizer:
    """Text → int32 ids for one model (its vocabulary + its :class:`TokenizerSpec`)."""

    __slots__ = ("spec", "vocab")

    def __init__(self, vocab: Vocabulary, spec: TokenizerSpec) -> None:
        self.vocab = vocab
        self.spec = spec

    def encode(self, text: str) -> list[int]:
        """Ids of one text, truncated to ``max_len`` (or ``fixed_len``). May be empty."""
        limit = self.spec.fixed_len or self.spec.max_len
        tokens = tokenize(text, self.spec.lowercase)
        return self.vocab.ids(tokens[:limit])

    def pad(self, encoded: Sequence[Sequence[int]]) -> IdArray:
        """Pad a batch of encoded texts to one ``[batch, length]`` int32 array.

        Length is the longest text, at least ``min_len`` and at most ``max_len``; or exactly
        ``fixed_len`` when the model needs it.
        """
        spec = self.spec
        if spec.fixed_len is not None:
            length = spec.fixed_len
        else:
            longest = max((len(e) for e in encoded), default=0)
            length = min(max(longest, spec.min_len), max(spec.max_len, spec.min_len))
        out = np.full((len(encoded), length), PAD_ID, dtype=np.int32)
        for row, ids in enumerate(encoded):
            n = min(len(ids), length)
            if n:
                out[row, :n] = ids[:n]
        return out

    def encode_batch(self, texts: Sequence[str]) -> IdArray:
        return self.pad([self.encode(t) for t in texts])
