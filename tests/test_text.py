"""Tokenizer and vocabulary (server/text.py): the same code at training and serving time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.artifact import OOV_ID, PAD_ID, TokenizerSpec
from server.errors import ArtifactError
from server.text import Tokenizer, Vocabulary, tokenize

VOCAB = Vocabulary.from_words(["the", "cat", "sat", "on", "mat", ".", "don't", "café", "u.s."])


def tok(**spec: int) -> Tokenizer:
    return Tokenizer(VOCAB, TokenizerSpec(**spec))


def test_tokenize_glove_style() -> None:
    assert tokenize("The cat sat on the mat.") == ["the", "cat", "sat", "on", "the", "mat", "."]
    assert tokenize("Don't stop-gap U.S. 3.14!") == ["don't", "stop-gap", "u.s", ".", "3.14", "!"]
    assert tokenize("Keep Case", lowercase=False) == ["Keep", "Case"]
    assert tokenize("") == []
    assert tokenize("   \n\t ") == []


def test_oov_and_ids_are_int32() -> None:
    t = tok()
    assert t.encode("the zebra sat") == [VOCAB.id("the"), OOV_ID, VOCAB.id("sat")]
    batch = t.encode_batch(["the cat", "completely unknown words here"])
    assert batch.dtype == np.int32
    assert batch.shape == (2, 4)
    assert batch[1].tolist() == [OOV_ID] * 4
    assert batch[0].tolist() == [VOCAB.id("the"), VOCAB.id("cat"), PAD_ID, PAD_ID]


def test_empty_text_pads_to_min_len() -> None:
    t = tok(min_len=3)
    assert t.encode("") == []
    batch = t.encode_batch(["", ""])
    assert batch.shape == (2, 3)
    assert not batch.any()
    assert t.encode_batch([]).shape == (0, 3)


def test_unicode() -> None:
    t = tok()
    # NFC normalisation: "e" + combining acute is the same token as the precomposed "é".
    assert t.encode("cafe\u0301") == t.encode("caf\u00e9") == [VOCAB.id("café")]
    assert t.encode("猫が座った 🐈") != []
    assert all(i == OOV_ID for i in t.encode("猫が座った 🐈"))
    assert t.encode("\x00\ud800 cat")[-1] == VOCAB.id("cat")  # lone surrogate, NUL: no error


def test_very_long_text_is_truncated() -> None:
    t = tok(max_len=50)
    text = "the cat sat on the mat . " * 100_000  # 700k tokens
    ids = t.encode(text)
    assert len(ids) == 50
    batch = t.encode_batch([text, "cat"])
    assert batch.shape == (2, 50)
    fixed = tok(fixed_len=7)
    assert fixed.encode_batch(["cat", text]).shape == (2, 7)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=8))
def test_any_text_never_crashes(texts: list[str]) -> None:
    t = tok(max_len=20, min_len=3)
    batch = t.encode_batch(texts)
    assert batch.dtype == np.int32
    assert batch.shape[0] == len(texts)
    assert 3 <= batch.shape[1] <= 20
    assert ((batch >= 0) & (batch < len(VOCAB))).all()


def test_vocabulary_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    VOCAB.save(path)
    again = Vocabulary.load(path)
    assert again.tokens == VOCAB.tokens
    (tmp_path / "bad.txt").write_text("cat\ndog\n")
    with pytest.raises(ArtifactError):
        Vocabulary.load(tmp_path / "bad.txt")
    with pytest.raises(ArtifactError, match="not found"):
        Vocabulary.load(tmp_path / "missing.txt")
