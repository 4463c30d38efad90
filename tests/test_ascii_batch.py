"""The batch tokenizers against the reference: the compiled one (server/native_tokenizer.pyx)
and the numpy one (server/ascii_batch.py, server/token_hash.py), each test on both.

``Tokenizer.encode_batch`` must give exactly ``pad(encode_many(texts))``, the per-text Python
path the toolchain trains with: on all of WordNet's glosses with the real GloVe vocabulary
(400k words: the numpy path's hot and cold tables), on random text built to hit every rule of
the token pattern, on batches mixing ASCII and non-ASCII texts, and on batches larger than one
encoding window.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.artifact import OOV_ID, TokenizerSpec
from server.ascii_batch import WINDOW_BYTES, encode_ascii, token_spans
from server.native_tokenizer import SLOT_BYTES
from server.text import BATCH_MIN_TEXTS, HOT_TOKENS, Tokenizer, Vocabulary, tokenize
from server.token_hash import NATIVE, TokenTable, span_hashes, string_hashes
from tests.test_text_hypothesis import specs

WORDS = ["the", "cat", "sat", "don't", "u.s.", "a-b", "x_y", "9.5", "-", "."]
SMALL = {native: Vocabulary.from_words(WORDS, native=native) for native in (True, False)}
IMPLS = pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])


@functools.cache
def glove_vocabulary(native: bool) -> Vocabulary:
    from models.embeddings import load_glove

    return Vocabulary.from_words(load_glove().words, native=native)


def test_the_native_tokenizer_is_built_and_is_the_default() -> None:
    # The install compiles it (pyproject.toml); without a C compiler it would be missing and
    # the server would silently tokenize in numpy.
    assert NATIVE
    assert SMALL[True].table.slots is not None
    assert Vocabulary.from_words(WORDS).table.slots is not None
    assert SMALL[False].table.slots is None


@functools.cache
def glosses() -> list[str]:
    from models.data import load_wordnet

    data = load_wordnet("pos")
    return [*data.train.texts, *data.validation.texts, *data.test.texts]


def reference(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    return tokenizer.pad(tokenizer.encode_many(texts))


@pytest.mark.parametrize(
    "spec",
    [
        TokenizerSpec(),
        TokenizerSpec(max_len=12),
        TokenizerSpec(max_len=40, fixed_len=25),
        TokenizerSpec(lowercase=False, min_len=5),
    ],
    ids=["default", "max_len-12", "fixed-25", "cased"],
)
@IMPLS
def test_every_wordnet_gloss_encodes_as_the_reference_does(
    spec: TokenizerSpec, native: bool
) -> None:
    tokenizer = Tokenizer(glove_vocabulary(native), spec)
    texts = glosses()
    assert len(texts) > 100_000
    for start in range(0, len(texts), 1024):
        batch = texts[start : start + 1024]
        np.testing.assert_array_equal(tokenizer.encode_batch(batch), reference(tokenizer, batch))


@IMPLS
def test_glosses_use_both_tables_and_unknown_words(native: bool) -> None:
    tokenizer = Tokenizer(glove_vocabulary(native), TokenizerSpec())
    ids = tokenizer.encode_batch(glosses()[:5000])
    assert (ids >= HOT_TOKENS).any()
    assert ((ids > OOV_ID) & (ids < HOT_TOKENS)).any()
    assert (ids == OOV_ID).any()


# Characters that decide the token pattern: word bytes, the three joiners, whitespace that
# re.ASCII does and does not count (\x1c-\x1f), punctuation, control bytes, and upper case.
edge_chars = st.sampled_from(list("aZ9_'-.  \t\n\r\x0b\x0c\x1c\x1f!,;()\x00\x7f\"#"))
ascii_texts = st.lists(edge_chars | st.sampled_from(["the", "u.s.", "don't", "a-b"])).map(
    "".join
) | st.text(st.characters(max_codepoint=127), max_size=80)


@given(text=ascii_texts)
@settings(max_examples=400)
def test_token_spans_are_the_reference_tokens(text: str) -> None:
    buf = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    starts, ends = token_spans(buf)
    assert [text[s:e] for s, e in zip(starts, ends, strict=True)] == tokenize(text, False)


any_texts = ascii_texts | st.text(max_size=40)


@IMPLS
@given(batch=st.lists(any_texts, min_size=BATCH_MIN_TEXTS, max_size=24), spec=specs)
@settings(max_examples=200)
def test_mixed_batches_encode_as_the_reference_does(
    batch: list[str], spec: TokenizerSpec, native: bool
) -> None:
    tokenizer = Tokenizer(SMALL[native], spec)
    np.testing.assert_array_equal(tokenizer.encode_batch(batch), reference(tokenizer, batch))


@given(batch=st.lists(ascii_texts, max_size=12) | st.lists(any_texts, max_size=12), spec=specs)
@settings(max_examples=400)
def test_native_batches_of_any_size_encode_as_the_reference_does(
    batch: list[str], spec: TokenizerSpec
) -> None:
    # The compiled tokenizer takes every batch, from 0 texts on; with non-ASCII texts in it,
    # those go through tokenize() and the rest through one native call.
    tokenizer = Tokenizer(SMALL[True], spec)
    ids = tokenizer.encode_batch(batch)
    assert ids.dtype == np.int32
    assert ids.flags.c_contiguous
    np.testing.assert_array_equal(ids, reference(tokenizer, batch))


@IMPLS
def test_batches_larger_than_one_window_and_texts_longer_than_the_cached_powers(
    native: bool,
) -> None:
    tokenizer = Tokenizer(SMALL[native], TokenizerSpec(max_len=10_000))
    word = "the cat sat-on u.s. don't!"
    batch = [word * (500 + i) for i in range(BATCH_MIN_TEXTS * 2)]
    assert sum(map(len, batch)) > 4 * WINDOW_BYTES
    batch[3] = "a-b " * 9_000  # one text longer than a window (36,000 bytes)
    np.testing.assert_array_equal(tokenizer.encode_batch(batch), reference(tokenizer, batch))
    ids, counts = encode_ascii(batch, lowercase=True, limit=10_000, table=SMALL[native].table)
    assert counts.tolist() == [len(tokenizer.encode(t)) for t in batch]
    assert len(ids) == counts.sum()
    ids, counts = encode_ascii([], lowercase=True, limit=10, table=SMALL[native].table)
    assert (ids.shape, counts.shape) == ((0,), (0,))


def test_a_spans_hash_does_not_depend_on_where_it_lies() -> None:
    buf = np.frombuffer(b"cat the cat xcat", dtype=np.uint8)
    h = span_hashes(buf, np.array([0, 8, 13]), np.array([3, 11, 16]))
    assert h[0] == h[1] == h[2] == string_hashes(["cat"])[0]
    assert len(set(string_hashes(["cat", "act", "cat ", "ca", "\ud800"]).tolist())) == 5


def test_token_table_probes_past_collisions_and_keeps_the_lower_id() -> None:
    # Hashes that all land in hot slot 5, a duplicate of a hot and of a cold hash, misses.
    hashes = np.array([5, 5 + 64, 5 + 128, 7, 5 + 64, 1000, 1001, 1000, 7], dtype=np.uint64)
    table = TokenTable(hashes, hot=5, missing=-9, native=False)
    queries = np.array([5, 5 + 64, 5 + 128, 7, 1000, 1001, 6, 5 + 192, 2**63], dtype=np.uint64)
    assert table.lookup(queries).tolist() == [0, 1, 2, 3, 5, 6, -9, -9, -9]
    assert table.lookup_cold(queries).tolist() == [-9, -9, -9, 8, 5, 6, -9, -9, -9]


def test_the_native_table_probes_past_collisions_and_keeps_the_lower_id() -> None:
    # 9 hashes: 16 slots (at most 70 % full); a hash's home slot is its top 4 bits here.
    home = [h << 60 for h in range(16)]
    chain = [home[5], home[5] + 1, home[5] + 2, home[6], home[5] + 1]  # over slots 5-8
    wrapping = [home[15] + 7, home[15] + 8, home[15] + 7, home[6]]  # slot 15, then 0
    hashes = np.array([*chain, *wrapping], dtype=np.uint64)
    table = TokenTable(hashes, hot=5, missing=-9, native=True)
    assert table.slots is not None
    assert table.slot_count == 16
    assert table.nbytes == 16 * SLOT_BYTES
    found = [home[5], home[5] + 1, home[5] + 2, home[6], home[15] + 7, home[15] + 8]
    absent = [home[6] + 1, home[5] + 3, home[15] + 9, home[0], 2**63 + 5]
    queries = np.array([*found, *absent], dtype=np.uint64)
    expected = [0, 1, 2, 3, 5, 6, -9, -9, -9, -9, -9]
    assert table.lookup(queries).tolist() == expected
    assert table.lookup_cold(queries).tolist() == expected
    assert table.lookup(np.zeros(0, dtype=np.uint64)).tolist() == []
