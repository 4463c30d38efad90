"""Tokenizer and vocabulary: the same code at training and at serving time.

The tokenizer lower-cases and splits text the way GloVe's vocabulary was built (words, numbers,
words with inner apostrophes/hyphens/dots, and single punctuation marks). Ids are ``int32``
(the seed's int64 ids doubled the RAM of every batch for nothing). Id 0 is padding, id 1 is
out-of-vocabulary; real words start at 2.
"""

from __future__ import annotations

import itertools
import re
import threading
import unicodedata
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.artifact import OOV_ID, OOV_TOKEN, PAD_ID, PAD_TOKEN, TokenizerSpec
from server.ascii_batch import encode_ascii
from server.errors import ArtifactError
from server.token_hash import (
    NATIVE,
    HashArray,
    IntpArray,
    TokenTable,
    native_tokenizer,
    string_hashes,
)

# Words (with inner ' - . joining word characters) or one non-space, non-word character.
_TOKEN_RE = re.compile(r"\w++(?:['\-.]\w++)*+|[^\w\s]")
# The same on ASCII-only text, ~30 % faster: re.ASCII classes, and \x1c-\x1f (which Unicode
# \s counts as whitespace, re.ASCII's does not) excluded so both give identical tokens.
_ASCII_TOKEN_RE = re.compile(r"\w++(?:['\-.]\w++)*+|[^\w\s\x1c-\x1f]", re.ASCII)

IdArray = npt.NDArray[np.int32]


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Split ``text`` into GloVe-style tokens. Never raises on any ``str``."""
    if lowercase:
        text = text.lower()
    if text.isascii():
        return _ASCII_TOKEN_RE.findall(text)
    return _TOKEN_RE.findall(unicodedata.normalize("NFC", text))


HOT_TOKENS = 20_000
"""The first this-many vocabulary entries (GloVe orders words by frequency) live in a dict
and in the hot part of the :class:`~server.token_hash.TokenTable`."""
BATCH_MIN_TEXTS = 8
"""``Tokenizer.encode_batch`` tokenizes this many texts or more in numpy; fewer, one by one
(numpy's fixed cost per call, ~50 us, is more than 7 short texts take in Python)."""
_HASH_CHUNK = 8192
"""Vocabulary tokens hashed per step while a file streams in."""


class Vocabulary:
    """Token ↔ id mapping. Line ``i`` of ``vocab.txt`` is the token with id ``i``.

    Compact by design: a Python ``dict`` of 220k words costs ~43 MiB of RAM (measured), more
    than a hundred of the models' own weights. Here only the first :data:`HOT_TOKENS` entries
    (the most frequent words, in GloVe's order) are a dict, for texts tokenized one at a time;
    every token's 64-bit hash of its UTF-8 bytes goes into a
    :class:`~server.token_hash.TokenTable` (the compiled tokenizer's open-addressing table of
    every token, 3.6 MiB for 220k tokens; without the extension, a cache-sized table for the hot
    entries and a sorted array for the rest, 3.0 MiB), used for the rarer tokens of a single
    text and for all tokens of a batch (:mod:`server.native_tokenizer`). A token outside
    the vocabulary could only be mistaken for a vocabulary token if their 64-bit hashes collide
    (probability about ``len(vocab) / 2**64`` per token, ~1e-14); two vocabulary tokens sharing
    a hash keep the lower id. The token strings are kept only when asked for (the toolchain
    needs them; the server does not).
    """

    __slots__ = ("__weakref__", "_hot", "_size", "_table", "_tokens")

    def __init__(
        self, tokens: Iterable[str], keep_tokens: bool = True, *, native: bool = NATIVE
    ) -> None:
        """``native``: build the compiled tokenizer's table (default: when it is built); False
        keeps the numpy tables (tests compare both)."""
        kept: list[str] | None = [] if keep_tokens else None
        hot: dict[str, int] = {}
        hashes: list[HashArray] = []
        size = 0
        iterator = iter(tokens)
        for chunk in iter(lambda: list(itertools.islice(iterator, _HASH_CHUNK)), []):
            if kept is not None:
                kept.extend(chunk)
            for token_id in range(size, min(size + len(chunk), HOT_TOKENS)):
                hot.setdefault(chunk[token_id - size], token_id)
            size += len(chunk)
            hashes.append(string_hashes(chunk))
        if hot.get(PAD_TOKEN) != PAD_ID or hot.get(OOV_TOKEN) != OOV_ID:
            raise ArtifactError(
                f"vocabulary must start with {PAD_TOKEN!r} and {OOV_TOKEN!r} (ids 0 and 1)"
            )
        all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        self._hot = hot
        self._table = TokenTable(all_hashes, HOT_TOKENS, OOV_ID, native=native)
        self._size = size
        self._tokens = kept

    @classmethod
    def from_words(cls, words: Iterable[str], *, native: bool = NATIVE) -> Vocabulary:
        """PAD and OOV followed by ``words`` (duplicates keep their first id)."""
        return cls([PAD_TOKEN, OOV_TOKEN, *words], native=native)

    @classmethod
    def load(cls, path: Path, keep_tokens: bool = True) -> Vocabulary:
        """Read ``vocab.txt``, streaming it line by line (no second copy of the file in RAM)."""
        try:
            with Path(path).open(encoding="utf-8", newline="\n") as f:
                return cls((line[:-1] if line.endswith("\n") else line for line in f), keep_tokens)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: vocabulary file not found") from exc
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{path}: vocabulary is not UTF-8") from exc

    @property
    def tokens(self) -> list[str]:
        """The tokens in id order (only if loaded with ``keep_tokens=True``)."""
        if self._tokens is None:
            raise ArtifactError("this vocabulary was loaded without its token strings")
        return self._tokens

    def save(self, path: Path) -> None:
        if any("\n" in t for t in self.tokens):
            raise ArtifactError("vocabulary tokens must not contain newlines")
        Path(path).write_text("\n".join(self.tokens) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return self._size

    def __contains__(self, token: str) -> bool:
        return token == OOV_TOKEN or self.id(token) != OOV_ID

    def id(self, token: str) -> int:
        return self.ids([token])[0]

    def ids(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens`` (OOV_ID for unknown ones)."""
        out: list[int | None] = list(map(self._hot.get, tokens))  # None: not a hot token
        if None in out:
            misses = [i for i, v in enumerate(out) if v is None]
            found = self._table.lookup_cold(string_hashes([tokens[i] for i in misses]))
            for i, v in zip(misses, found.tolist(), strict=True):
                out[i] = v
        return out  # type: ignore[return-value]  # every None was replaced

    @property
    def table(self) -> TokenTable:
        """Every token's hash → id (what :mod:`server.ascii_batch` looks tokens up in)."""
        return self._table


_shared_lock = threading.Lock()
_shared: weakref.WeakValueDictionary[tuple[str, int, int], Vocabulary] = (
    weakref.WeakValueDictionary()
)


def shared_vocabulary(path: Path) -> Vocabulary:
    """The process's one :class:`Vocabulary` for the file at ``path`` (without token strings).

    Every model reading the same vocabulary file (the models over one shared embedding) gets
    the same object; it is freed when the last of them lets go. Keyed by the resolved path,
    size and modification time, so a rewritten file is read again.
    """
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: vocabulary file not found") from exc
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _shared_lock:
        vocab = _shared.get(key)
        if vocab is None:
            vocab = Vocabulary.load(resolved, keep_tokens=False)
            _shared[key] = vocab
        return vocab


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
        ``fixed_len`` when the model needs it. One ``np.fromiter`` over all ids and one masked
        assignment, not a numpy conversion per text (~6x faster for 64 texts of 50 tokens).
        """
        lengths = np.fromiter(map(len, encoded), dtype=np.intp, count=len(encoded))
        width = self._width(lengths)
        if len(lengths) and int(lengths.max()) > width:
            encoded = [ids[:width] for ids in encoded]
            np.minimum(lengths, width, out=lengths)
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=total)
        return self._padded(flat, lengths, width)

    def _width(self, lengths: IntpArray) -> int:
        spec = self.spec
        if spec.fixed_len is not None:
            return spec.fixed_len
        longest = int(lengths.max()) if len(lengths) else 0
        return min(max(longest, spec.min_len), max(spec.max_len, spec.min_len))

    @staticmethod
    def _padded(flat: IdArray, lengths: IntpArray, width: int) -> IdArray:
        """Rows of ``lengths[i]`` (each ``<= width``) ids from ``flat``, then padding."""
        out = np.full((len(lengths), width), PAD_ID, dtype=np.int32)
        if len(flat):
            out[np.arange(width) < lengths[:, None]] = flat
        return out

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """``[self.encode(t) for t in texts]`` with one vocabulary lookup for all of them."""
        limit = self.spec.fixed_len or self.spec.max_len
        lowercase = self.spec.lowercase
        per_text = [tokenize(t, lowercase)[:limit] for t in texts]
        flat = self.vocab.ids([tok for toks in per_text for tok in toks])
        out: list[list[int]] = []
        start = 0
        for toks in per_text:
            end = start + len(toks)
            out.append(flat[start:end])
            start = end
        return out

    def encode_batch(self, texts: Sequence[str]) -> IdArray:
        """``pad(encode_many(texts))``: the batch a model runs on.

        When the compiled tokenizer (:mod:`server.native_tokenizer`) is built and the
        vocabulary's table is its own, a batch's ASCII texts go through it in one call (a text
        with a non-ASCII character goes through :func:`tokenize`). Otherwise, from
        :data:`BATCH_MIN_TEXTS` texts on, the ASCII texts are tokenized together in numpy
        (:mod:`server.ascii_batch`) and written straight into the padded array. Every path
        gives the same ids.
        """
        if self.vocab.table.slots is not None:
            return self._encode_native(texts if isinstance(texts, list) else list(texts))
        if len(texts) < BATCH_MIN_TEXTS:
            return self.pad(self.encode_many(texts))
        flat, lengths = self._encode_flat(texts)
        return self._padded(flat, lengths, self._width(lengths))

    def _native(self, texts: list[str], min_width: int) -> IdArray | None:
        spec, table = self.spec, self.vocab.table
        assert table.slots is not None
        fixed = spec.fixed_len
        return native_tokenizer.encode_batch(
            texts,
            spec.lowercase,
            fixed or spec.max_len,
            fixed or min_width,
            fixed or max(spec.max_len, spec.min_len),
            table.slots,
            table.slot_count,
            table.missing,
        )

    def _encode_native(self, texts: list[str]) -> IdArray:
        ids = self._native(texts, self.spec.min_len)
        if ids is not None:
            return ids
        # Some text is not ASCII: those through tokenize(), the rest still in one native call.
        plain, other = _split_ascii(texts)
        rows = self.encode_many([texts[i] for i in other])
        ascii_ids = self._native([texts[i] for i in plain], 0)
        assert ascii_ids is not None
        # ascii_ids is as wide as its longest text (min_width 0), or fixed_len
        lengths = np.array([*map(len, rows), ascii_ids.shape[1] if plain else 0], dtype=np.intp)
        out = np.full((len(texts), self._width(lengths)), PAD_ID, dtype=np.int32)
        if plain:
            out[plain, : ascii_ids.shape[1]] = ascii_ids
        for i, row in zip(other, rows, strict=True):
            out[i, : len(row)] = row
        return out

    def _encode_flat(self, texts: Sequence[str]) -> tuple[IdArray, IntpArray]:
        """All texts' ids concatenated, and each text's number of ids."""
        spec = self.spec
        limit = spec.fixed_len or spec.max_len
        table = self.vocab.table
        plain, other = _split_ascii(texts)
        if not other:
            return encode_ascii(texts, lowercase=spec.lowercase, limit=limit, table=table)
        rows = self.encode_many([texts[i] for i in other])
        lengths = np.zeros(len(texts), dtype=np.intp)
        lengths[other] = [len(r) for r in rows]
        ids_plain = np.zeros(0, dtype=np.int32)
        if plain:
            ids_plain, lengths_plain = encode_ascii(
                [texts[i] for i in plain], lowercase=spec.lowercase, limit=limit, table=table
            )
            lengths[plain] = lengths_plain
        offsets = np.cumsum(lengths) - lengths
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        if len(ids_plain):
            flat[_positions(offsets[plain], lengths[plain])] = ids_plain
        for i, row in zip(other, rows, strict=True):
            flat[offsets[i] : offsets[i] + len(row)] = row
        return flat, lengths


def _split_ascii(texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Indices of the ASCII texts and of the others (the batch paths' fast and Unicode parts)."""
    plain: list[int] = []
    other: list[int] = []
    for i, text in enumerate(texts):
        (plain if text.isascii() else other).append(i)
    return plain, other


def _positions(offsets: IntpArray, lengths: IntpArray) -> IntpArray:
    """``concatenate([arange(o, o + n) for o, n in zip(offsets, lengths)])``, vectorised."""
    starts = np.cumsum(lengths) - lengths
    out: IntpArray = np.arange(int(lengths.sum())) + np.repeat(offsets - starts, lengths)
    return out
