"""Token → id lookups in numpy: a 64-bit hash of each token's UTF-8 bytes and two tables.

The batch tokenizer (:mod:`server.ascii_batch`) finds every token of a request as a byte span
of one buffer; :func:`span_hashes` hashes all spans at once (a polynomial hash over prefix
sums, then a multiply-xorshift finaliser), and :class:`TokenTable` maps the hashes to ids
without creating a Python object per token:

* the **hot table** holds the first ``hot`` vocabulary entries (GloVe orders words by
  frequency: the 20k most frequent words are ~97 % of the tokens of WordNet's glosses) in an
  open-addressing array of ``2**k`` slots, small enough to stay in the CPU cache (768 KiB for
  20k words), probed with a few vectorised rounds;
* the **cold table** holds the rest, sorted by hash (12 bytes a token), searched with
  ``np.searchsorted`` for the hot table's misses only. A binary search per token over the
  whole vocabulary was measured 4x slower than the hot probe (cache misses).

When the compiled :mod:`server.native_tokenizer` is built (the normal install), the table is
instead one open-addressing table of every token (12-byte slots, at most 70 % full: 3.6 MiB
for 220k tokens, against 3.0 MiB for the two tables above), probed in C with prefetching;
the batch tokenizer reads it directly. ``native=False`` builds the numpy tables anyway.

Equal hashes for two vocabulary tokens keep the lower id. A token outside the vocabulary is
mistaken for a vocabulary token only if their hashes collide (about ``len(vocab) / 2**64``
per token). The hash is not keyed: someone who crafts colliding tokens can only change the
classification of their own text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "NATIVE",
    "HashArray",
    "TokenTable",
    "native_tokenizer",
    "require_native",
    "span_hashes",
    "string_hashes",
]

try:
    from server import native_tokenizer
except ImportError:  # built without a C compiler: the numpy tables and tokenizer
    native_tokenizer = None  # type: ignore[assignment]

NATIVE = native_tokenizer is not None
"""True when the compiled tokenizer (:mod:`server.native_tokenizer`) is available."""

HashArray = npt.NDArray[np.uint64]
IntpArray = npt.NDArray[np.intp]

_U = np.uint64
_BASE = _U(0x9E3779B97F4A7C15)  # odd, so it has an inverse modulo 2**64
_MIX = _U(0xBF58476D1CE4E5B9)
_CACHED_POWERS = 1 << 15
"""Powers kept for buffers up to this many bytes (2 x 256 KiB); longer ones compute their own."""


def _inverse(a: int) -> int:
    """The inverse of odd ``a`` modulo 2**64 (Newton's iteration)."""
    x = a
    for _ in range(6):
        x = (x * (2 - a * x)) % (1 << 64)
    return x


def _powers(base: np.uint64, n: int) -> HashArray:
    out = np.full(n, base, dtype=_U)
    out[0] = 1
    np.multiply.accumulate(out, out=out)  # wraps modulo 2**64, as intended
    return out


_BASE_INVERSE = _U(_inverse(int(_BASE)))
_POW = _powers(_BASE, _CACHED_POWERS)
_INV = _powers(_BASE_INVERSE, _CACHED_POWERS)


def span_hashes(buf: npt.NDArray[np.uint8], starts: IntpArray, ends: IntpArray) -> HashArray:
    """The hash of each byte span ``buf[starts[i]:ends[i]]`` (equal bytes, equal hash)."""
    n = len(buf)
    if n <= _CACHED_POWERS:
        pow_, inv = _POW[:n], _INV
    else:
        pow_, inv = _powers(_BASE, n), _powers(_BASE_INVERSE, n)
    prefix = np.empty(n + 1, dtype=_U)
    prefix[0] = 0
    np.cumsum(buf * pow_, out=prefix[1:])
    h = prefix[ends]
    h -= prefix[starts]
    h *= inv[starts]  # sum of b[i] * BASE**(i - start): independent of where the span lies
    h += (ends - starts).astype(_U)
    h ^= h >> _U(31)
    h *= _MIX
    h ^= h >> _U(29)
    return h


def string_hashes(tokens: Sequence[str]) -> HashArray:
    """:func:`span_hashes` of each string's UTF-8 bytes (lone surrogates passed through)."""
    if not tokens:
        return np.zeros(0, dtype=_U)
    encoded = [t.encode("utf-8", "surrogatepass") for t in tokens]
    lengths = np.fromiter(map(len, encoded), dtype=np.intp, count=len(encoded))
    ends = np.cumsum(lengths)
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return span_hashes(buf, ends - lengths, ends)


class TokenTable:
    """Hash → id for one vocabulary: the native table (every token), or a cache-sized hot
    table and a sorted cold table."""

    __slots__ = (
        "_cold_hashes",
        "_cold_ids",
        "_hot_ids",
        "_hot_keys",
        "_mask",
        "missing",
        "slot_count",
        "slots",
    )

    def __init__(self, hashes: HashArray, hot: int, missing: int, *, native: bool = NATIVE) -> None:
        """``hashes[i]`` is the hash of the token with id ``i``. ``missing`` is the id of a token
        not found (OOV). With ``native`` (default: when the extension is built) every hash goes
        into :attr:`slots`; else the first ``hot`` go to the hot table, the rest to the cold."""
        self.missing = missing
        self.slots: npt.NDArray[np.uint8] | None = None
        """The native table (``None`` on the numpy tables)."""
        self.slot_count = 0
        empty = np.zeros(0, dtype=_U)
        self._hot_keys, self._hot_ids, self._mask = empty, np.zeros(0, dtype=np.int32), _U(0)
        self._cold_hashes, self._cold_ids = empty, np.zeros(0, dtype=np.int32)
        if native:
            require_native()
            self.slots, self.slot_count = native_tokenizer.build_table(np.ascontiguousarray(hashes))
            return
        hot = min(hot, len(hashes))
        size = 1 << max(4, int(3 * hot - 1).bit_length())  # load factor <= 1/3
        self._mask = _U(size - 1)
        keys = [0] * size
        ids = [-1] * size  # -1: an empty slot
        seen: set[int] = set()
        for token_id, key in enumerate(hashes[:hot].tolist()):
            if key in seen:
                continue  # an equal hash: the lower id stays
            seen.add(key)
            slot = key & (size - 1)
            while ids[slot] >= 0:
                slot = (slot + 1) & (size - 1)
            keys[slot] = key
            ids[slot] = token_id
        self._hot_keys = np.array(keys, dtype=_U)
        self._hot_ids = np.array(ids, dtype=np.int32)
        cold = hashes[hot:]
        order = np.argsort(cold, kind="stable")  # equal hashes: the lowest id first
        ordered = cold[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        self._cold_hashes = np.ascontiguousarray(ordered[first])
        self._cold_ids = (order[first] + hot).astype(np.int32)

    @property
    def nbytes(self) -> int:
        arrays = (self._hot_keys, self._hot_ids, self._cold_hashes, self._cold_ids)
        return sum(a.nbytes for a in arrays) + (0 if self.slots is None else self.slots.nbytes)

    def lookup(self, hashes: HashArray) -> npt.NDArray[np.int32]:
        """The id of each hash (``missing`` where it is not in the vocabulary)."""
        if self.slots is not None:
            return native_tokenizer.lookup(hashes, self.slots, self.slot_count, self.missing)
        out = self._probe_hot(hashes)
        misses = np.flatnonzero(out < 0)
        if misses.size:
            out[misses] = self.lookup_cold(hashes[misses])
        return out

    def lookup_cold(self, hashes: HashArray) -> npt.NDArray[np.int32]:
        """The id of each hash among the cold tokens only (``missing`` elsewhere); on the
        native table, among all tokens (for hashes of tokens already known not to be hot)."""
        if self.slots is not None:
            return self.lookup(hashes)
        table = self._cold_hashes
        if len(table) == 0:
            return np.full(len(hashes), self.missing, dtype=np.int32)
        pos = np.searchsorted(table, hashes)
        np.minimum(pos, len(table) - 1, out=pos)
        return np.where(table[pos] == hashes, self._cold_ids[pos], self.missing).astype(np.int32)

    def _probe_hot(self, hashes: HashArray) -> npt.NDArray[np.int32]:
        """Hot ids, -1 where the hash is not a hot token (linear probing, vectorised)."""
        keys, ids, mask = self._hot_keys, self._hot_ids, self._mask
        slot = (hashes & mask).astype(np.intp)
        out = ids[slot]
        pending = np.flatnonzero((keys[slot] != hashes) & (out >= 0))
        out[pending] = -1
        while pending.size:
            slot[pending] = (slot[pending] + 1) & int(mask)
            at = slot[pending]
            found = ids[at]
            hit = keys[at] == hashes[pending]
            out[pending[hit]] = found[hit]
            pending = pending[~hit & (found >= 0)]
        return out


def require_native() -> None:
    """RuntimeError if :mod:`server.native_tokenizer` was not built."""
    if not NATIVE:
        raise RuntimeError("server.native_tokenizer is not built (no C compiler at install?)")
