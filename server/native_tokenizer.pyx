# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A batch of ASCII texts → padded token ids in one compiled pass (the inference thread's
tokenizer; :mod:`server.ascii_batch` is the numpy fallback when this module was not built).

Why compiled: a batch is tokenized right after the previous ``session.run``, when the CPU's
caches hold TensorFlow's data. The numpy path then costs ~0.6 ms for 64 texts of 50 tokens
(~0.22 ms warm): it is ~40 numpy calls, each a trip through the interpreter's and numpy's
cold code. Here the whole batch is one call: the texts' bytes are read in place
(``PyUnicode_DATA`` of compact ASCII strings: no join, no copy), every token is hashed
exactly as :func:`server.token_hash.span_hashes` does, and looked up in one open-addressing
table of 12-byte slots (hash, id), at most 70 % full, with the slot of a later token prefetched
while an earlier one is probed. ``docs/bench/README.md`` has the figures.

Tokens are those of :func:`server.text.tokenize` on ASCII text: maximal runs of word bytes
``[A-Za-z0-9_]`` joined by a ``'``, ``-`` or ``.`` that has word bytes on both sides; any
other non-space byte alone. Space is ``\\s`` of ``re.ASCII`` plus ``\\x1c-\\x1f``.
"""

from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

cdef extern from "Python.h":
    bint PyUnicode_Check(object o)
    bint PyUnicode_IS_ASCII(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyUnicode_READY(object o) except -1

cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil

cdef extern from *:
    """
    /* The home slot of a hash among n: the high 64 bits of hash * n (any n, no modulo). */
    static inline uint64_t textserve_home(uint64_t hash, uint64_t n) {
        return (uint64_t)(((unsigned __int128)hash * n) >> 64);
    }
    """
    uint64_t textserve_home(uint64_t hash, uint64_t n) nogil


cdef packed struct Slot:
    uint64_t key
    int32_t id


cdef enum:
    PUNCT = 0
    WORD = 1
    JOIN = 2
    SPACE = 3
    PREFETCH_AHEAD = 16

cdef uint64_t BASE = 0x9E3779B97F4A7C15ULL
cdef uint64_t MIX = 0xBF58476D1CE4E5B9ULL
cdef uint8_t CLASS[256]


cdef void _init_classes() noexcept:
    cdef int c
    for c in range(256):
        CLASS[c] = PUNCT
        if (97 <= c <= 122) or (65 <= c <= 90) or (48 <= c <= 57) or c == 95:
            CLASS[c] = WORD
        elif c == 39 or c == 45 or c == 46:  # ' - .
            CLASS[c] = JOIN
        elif c == 32 or 9 <= c <= 13 or 0x1C <= c <= 0x1F:
            CLASS[c] = SPACE


_init_classes()

SLOT_BYTES = sizeof(Slot)
MAX_LOAD = 0.7
"""At most this share of the table's slots hold a token (3.6 MiB for 220k tokens)."""


cdef inline uint64_t _finish(uint64_t h, Py_ssize_t length) noexcept nogil:
    h += <uint64_t>length
    h ^= h >> 31
    h *= MIX
    h ^= h >> 29
    return h


cdef inline uint8_t _lower(uint8_t b, bint lowercase) noexcept nogil:
    if lowercase and 65 <= b <= 90:
        return b + 32
    return b


cdef Py_ssize_t _hash_text(
    const uint8_t *s, Py_ssize_t n, bint lowercase, Py_ssize_t limit, uint64_t *out
) noexcept nogil:
    """Hashes of the first ``limit`` tokens of ``s[:n]`` into ``out``; returns their number."""
    cdef Py_ssize_t p = 0, q, k = 0
    cdef uint64_t h, power
    cdef uint8_t kind
    while p < n and k < limit:
        kind = CLASS[s[p]]
        if kind == SPACE:
            p += 1
            continue
        if kind != WORD:  # punctuation, or a joiner not between two word bytes (no letters)
            out[k] = _finish(<uint64_t>s[p], 1)
            k += 1
            p += 1
            continue
        h = 0
        power = 1
        q = p
        while True:
            while q < n and CLASS[s[q]] == WORD:
                h += <uint64_t>_lower(s[q], lowercase) * power
                power *= BASE
                q += 1
            if q + 1 < n and CLASS[s[q]] == JOIN and CLASS[s[q + 1]] == WORD:
                h += <uint64_t>s[q] * power
                power *= BASE
                q += 1
                continue
            break
        out[k] = _finish(h, q - p)
        k += 1
        p = q
    return k


cdef inline int32_t _probe(
    const Slot *table, uint64_t count, uint64_t key, int32_t missing
) noexcept nogil:
    cdef uint64_t i = textserve_home(key, count)
    while table[i].id >= 0:
        if table[i].key == key:
            return table[i].id
        i += 1
        if i == count:
            i = 0
    return missing


cdef inline int32_t _probe_ahead(
    const Slot *table, uint64_t count, const uint64_t *hashes, Py_ssize_t i, Py_ssize_t n,
    int32_t missing,
) noexcept nogil:
    """The id of ``hashes[i]`` (of ``n``), the slot of ``hashes[i + PREFETCH_AHEAD]`` fetched
    meanwhile: the probes of a batch overlap their cache misses."""
    if i + PREFETCH_AHEAD < n:
        __builtin_prefetch(&table[textserve_home(hashes[i + PREFETCH_AHEAD], count)])
    return _probe(table, count, hashes[i], missing)


def build_table(const uint64_t[::1] hashes):
    """``(slots, count)``: the open-addressing table of ``hashes[i] → i`` (equal hashes keep the
    lower id) in ``count`` slots of :data:`SLOT_BYTES` bytes (a uint8 array), at most
    :data:`MAX_LOAD` full. A hash's home slot is ``hash * count >> 64``; collisions probe the
    next slots (linear probing, wrapping around)."""
    cdef Py_ssize_t n = hashes.shape[0], i
    cdef double max_load = MAX_LOAD
    cdef Py_ssize_t count = max(16, <Py_ssize_t>(<double>n / max_load) + 1)
    slots = np.empty(count * sizeof(Slot), dtype=np.uint8)
    cdef uint8_t[::1] view = slots
    cdef Slot *table = <Slot *>&view[0]
    cdef uint64_t at, key
    for i in range(count):
        table[i].key = 0
        table[i].id = -1
    for i in range(n):
        key = hashes[i]
        at = textserve_home(key, count)
        while table[at].id >= 0 and table[at].key != key:
            at += 1
            if at == <uint64_t>count:
                at = 0
        if table[at].id < 0:  # else an equal hash holds a lower id already
            table[at].key = key
            table[at].id = <int32_t>i
    return slots, count


def encode_batch(
    list texts,
    bint lowercase,
    Py_ssize_t limit,
    Py_ssize_t min_width,
    Py_ssize_t max_width,
    const uint8_t[::1] slots,
    uint64_t count,
    int32_t missing,
):
    """The ``[len(texts), width]`` int32 ids of ``texts`` (each cut to ``limit`` tokens, padded
    with 0 to ``width`` = the longest text's tokens, clamped to ``[min_width, max_width]``),
    or None if a text is not an ASCII ``str`` (the caller's Unicode path takes the batch)."""
    cdef Py_ssize_t n = len(texts), i, j, k, total_bytes = 0, longest = 0, width, row, at
    cdef object text
    if limit > max_width:
        limit = max_width  # a row never holds more ids than the array is wide
    for text in texts:
        if not PyUnicode_Check(text):
            return None
        PyUnicode_READY(text)
        if not PyUnicode_IS_ASCII(text):
            return None
        total_bytes += PyUnicode_GET_LENGTH(text)
    cdef Py_ssize_t capacity = total_bytes if total_bytes < n * limit else n * limit
    cdef uint64_t *hashes = <uint64_t *>malloc((capacity + 1) * sizeof(uint64_t))
    cdef Py_ssize_t *counts = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
    if hashes == NULL or counts == NULL:
        free(hashes)
        free(counts)
        raise MemoryError()
    cdef const Slot *table = <const Slot *>&slots[0]
    cdef int32_t[:, ::1] view
    try:
        k = 0
        for i in range(n):
            text = texts[i]
            counts[i] = _hash_text(
                <const uint8_t *>PyUnicode_DATA(text),
                PyUnicode_GET_LENGTH(text),
                lowercase,
                limit,
                hashes + k,
            )
            k += counts[i]
            if counts[i] > longest:
                longest = counts[i]
        width = min(max(longest, min_width), max_width)
        out = np.empty((n, width), dtype=np.int32)
        if n == 0 or width == 0:
            return out
        view = out
        # The GIL is kept: this takes microseconds, and a thread that gives it up can wait
        # up to sys.getswitchinterval() (5 ms) to get it back from a busy event loop.
        at = 0
        for row in range(n):
            for j in range(counts[row]):
                view[row, j] = _probe_ahead(table, count, hashes, at, k, missing)
                at += 1
            if counts[row] < width:
                memset(&view[row, counts[row]], 0, (width - counts[row]) * sizeof(int32_t))
        return out
    finally:
        free(hashes)
        free(counts)


def lookup(const uint64_t[::1] hashes, const uint8_t[::1] slots, uint64_t count, int32_t missing):
    """The id of each hash in the table (``missing`` where it is absent), as int32."""
    cdef Py_ssize_t n = hashes.shape[0], i
    out = np.empty(n, dtype=np.int32)
    if n == 0:
        return out
    cdef int32_t[::1] view = out
    cdef const Slot *table = <const Slot *>&slots[0]
    for i in range(n):
        view[i] = _probe_ahead(table, count, &hashes[0], i, n, missing)
    return out
