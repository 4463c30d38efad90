"""Tokenizing many texts at once in numpy, with the same tokens as :func:`server.text.tokenize`.

The server uses the compiled :mod:`server.native_tokenizer` when it is built (the normal
install: ~4x faster again right after a ``session.run``); this module is the fallback without
a C compiler, and takes the ASCII texts of a batch that also holds non-ASCII ones.

Per text, Python's ``re.findall`` plus a dict lookup per token cost ~11 us (50-token texts);
for a batch of 64 that is 0.7 ms measured alone and 1.1-1.3 ms right after a ``session.run``
(colder caches), 13 % of the batch's predict. Here the ASCII texts of a batch are joined into
one byte buffer and their tokens found with array operations:

* every byte gets a class: word (``[A-Za-z0-9_]``), joiner (``'``, ``-``, ``.``), space
  (``\\s`` in ``re.ASCII``, and ``\\x1c-\\x1f``, as the ASCII pattern of ``tokenize`` excludes
  them) or punctuation (anything else);
* a joiner belongs to a word when both its neighbours are word bytes (the pattern
  ``\\w++(?:['\\-.]\\w++)*+``); word tokens are the maximal runs of word bytes, punctuation
  and lone joiners are one-byte tokens, spaces separate;
* the spans are hashed and looked up all at once (:mod:`server.token_hash`).

Texts are joined with ``\\n`` (a space byte), so no token crosses two texts. A text with a
non-ASCII character goes through :func:`~server.text.tokenize` (Unicode classes, NFC), as
before. Tests check equality with the reference path on WordNet's glosses and on random text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from server.token_hash import IntpArray, TokenTable, span_hashes

__all__ = ["encode_ascii"]

_WORD, _JOIN, _SPACE, _PUNCT = 1, 2, 3, 0
WINDOW_BYTES = 1 << 15
"""Texts are encoded in groups of at most this many bytes (bounds the temporary arrays)."""


def _classes() -> npt.NDArray[np.uint8]:
    table = np.full(256, _PUNCT, dtype=np.uint8)
    for code in range(128):
        ch = chr(code)
        if ch.isalnum() or ch == "_":
            table[code] = _WORD
        elif ch in "'-.":
            table[code] = _JOIN
        elif ch in " \t\n\r\f\v" or 0x1C <= code <= 0x1F:
            table[code] = _SPACE
    return table


_CLASS = _classes()


def token_spans(buf: npt.NDArray[np.uint8]) -> tuple[IntpArray, IntpArray]:
    """``(starts, ends)`` of the tokens of ASCII ``buf``, in order."""
    if len(buf) == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    cls = _CLASS.take(buf)
    word = cls == _WORD
    join = cls == _JOIN
    inside = word.copy()  # bytes inside word tokens
    inside[1:-1] |= join[1:-1] & word[:-2] & word[2:]
    single = cls == _PUNCT  # one-byte tokens
    single |= join & ~inside
    first = single.copy()
    first[0] |= inside[0]
    first[1:] |= inside[1:] & ~inside[:-1]
    last = single
    last[-1] |= inside[-1]
    last[:-1] |= inside[:-1] & ~inside[1:]
    ends = np.flatnonzero(last)
    ends += 1
    return np.flatnonzero(first), ends


def encode_ascii(
    texts: Sequence[str], *, lowercase: bool, limit: int, table: TokenTable
) -> tuple[npt.NDArray[np.int32], IntpArray]:
    """``(ids, counts)``: the ids of all texts' first ``limit`` tokens, concatenated, and the
    number of ids of each text. Every text must be ASCII."""
    ids: list[npt.NDArray[np.int32]] = []
    counts: list[IntpArray] = []
    widths = np.fromiter(map(len, texts), dtype=np.intp, count=len(texts))
    widths += 1  # the separator
    ends = np.cumsum(widths)  # where each text ends if all were joined, separator included
    begins = ends - widths
    start = 0
    while start < len(texts):
        offset = int(begins[start])
        stop = max(start + 1, int(np.searchsorted(ends, offset + WINDOW_BYTES, "right")))
        group_ids, group_counts = _encode_group(
            texts[start:stop], begins[start:stop] - offset, lowercase, limit, table
        )
        ids.append(group_ids)
        counts.append(group_counts)
        start = stop
    if len(ids) == 1:
        return ids[0], counts[0]
    if not ids:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.intp)
    return np.concatenate(ids), np.concatenate(counts)


def _encode_group(
    texts: Sequence[str],
    text_starts: IntpArray,
    lowercase: bool,
    limit: int,
    table: TokenTable,
) -> tuple[npt.NDArray[np.int32], IntpArray]:
    """:func:`encode_ascii` of texts that fit one window; ``text_starts``: where each begins in
    their ``\n``-join."""
    joined = "\n".join(texts)
    if lowercase:
        joined = joined.lower()
    buf = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    starts, ends = token_spans(buf)
    first = np.searchsorted(starts, text_starts)  # each text's first token
    counts: IntpArray = np.diff(first, append=len(starts))
    if len(counts) and int(counts.max()) > limit:
        rank = np.arange(len(starts)) - np.repeat(first, counts)
        keep = rank < limit
        starts, ends = starts[keep], ends[keep]
        np.minimum(counts, limit, out=counts)
    return table.lookup(span_hashes(buf, starts, ends)), counts
