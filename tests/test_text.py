"""Tokenizer and vocabulary (server/text.py): the same code at training and serving time."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.artifact import OOV_ID, PAD_ID, TokenizerSpec
from server.errors import ArtifactError
from server.text import HOT_TOKENS, Tokenizer, Vocabulary, shared_vocabulary, tokenize

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


def _words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def test_vocabulary_hot_and_cold_entries_match_a_plain_dict() -> None:
    # More words than HOT_TOKENS, with duplicates on both sides of the boundary: ids must be
    # exactly what a dict keeping each token's first id gives.
    words = _words(HOT_TOKENS + 5_000)
    words[HOT_TOKENS + 10] = "w3"  # duplicate of a hot token
    words[HOT_TOKENS + 20] = words[HOT_TOKENS + 30]  # duplicate within the cold part
    vocab = Vocabulary.from_words(words)
    reference: dict[str, int] = {}
    for i, tok in enumerate(vocab.tokens):
        reference.setdefault(tok, i)
    queries = [*words[::37], "not-a-word", "", "<unk>", "<pad>", words[-1]]
    assert vocab.ids(queries) == [reference.get(q, OOV_ID) for q in queries]
    assert len(vocab) == len(words) + 2
    assert words[-1] in vocab
    assert "not-a-word" not in vocab


def test_vocabulary_without_tokens_is_compact_and_says_so(tmp_path: Path) -> None:
    Vocabulary.from_words(_words(HOT_TOKENS * 3)).save(tmp_path / "vocab.txt")
    full = Vocabulary.load(tmp_path / "vocab.txt")
    lean = Vocabulary.load(tmp_path / "vocab.txt", keep_tokens=False)
    probe = [*_words(HOT_TOKENS * 3)[::101], "missing"]
    assert lean.ids(probe) == full.ids(probe)
    assert len(lean) == len(full)
    with pytest.raises(ArtifactError, match="without its token strings"):
        _ = lean.tokens


def test_shared_vocabulary_is_one_object_per_file_and_is_freed(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    Vocabulary.from_words(["a", "b"]).save(path)
    first = shared_vocabulary(path)
    assert shared_vocabulary(tmp_path / "." / "vocab.txt") is first
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None  # the last user let go: nothing keeps it alive
    Vocabulary.from_words(["a", "b", "c"]).save(path)
    assert len(shared_vocabulary(path)) == 5  # a rewritten file is read again


def test_vocabulary_must_start_with_pad_and_unk(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(ArtifactError, match="must start with"):
        Vocabulary([])
    (tmp_path / "bad.txt").write_bytes(b"<pad>\n<unk>\n\xff\n")
    with pytest.raises(ArtifactError, match="not UTF-8"):
        Vocabulary.load(tmp_path / "bad.txt")


@pytest.mark.parametrize("fixed_len", [0, -3])
def test_tokenizer_spec_rejects_a_non_positive_fixed_length(fixed_len: int) -> None:
    with pytest.raises(ValidationError, match="fixed_len"):
        TokenizerSpec(fixed_len=fixed_len)
