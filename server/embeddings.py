"""The process-wide embedding store: one copy of each distinct embedding, shared by all models.

Serving cuts every graph at ``embedding/lookup`` and puts a gather there whose matrix is fed
from a :class:`SharedEmbedding` here on every run, without a copy
(:mod:`server.runtime.lookup`), so no session ever holds a copy of a shared matrix.
Embeddings are keyed by content (sha256), so two models — or a model and a matrix cut out of a
self-contained graph — that use the same bytes share one copy.

Sources:

* an embedding artifact directory (``embedding.json`` + ``matrix.npy`` [+ ``scales.npy``]),
  memory-mapped read-only (``mmap_mode="r"``, ``allow_pickle=False``): the pages live in the
  page cache, shared with every other process mapping the same file;
* :meth:`EmbeddingStore.register_array`: a matrix cut out of a self-contained graph
  (:mod:`server.graph_surgery`). If an artifact with the same bytes is already loaded it is
  reused and the graph's copy is dropped.

dtypes: float32; float16 (rows are cast after gathering); int8 with per-row float32 scales
(``value = int8 * scale[row]``; only the gathered rows are dequantized).

Integrity: with ``verify=True`` (the default) the first acquire of an artifact hashes the matrix
(+ scales) and compares it with ``embedding.json``'s ``sha256`` — about 0.3 s for a 265 MB
matrix, once per process per embedding (it also reads the whole file into the page cache, which
is shared between processes). A mismatch is an :class:`~server.errors.ArtifactError`: a model
would otherwise silently read rows it was not trained with. ``verify=False`` skips the hash (fast
restarts on a trusted repository); shapes and dtypes are always checked.

Thread safety: acquire/release/register_array take one lock (loads are rare and short);
:meth:`SharedEmbedding.lookup` only reads the matrix and is safe from any number of threads.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.artifact import (
    MATRIX_NPY,
    SCALES_NPY,
    EmbeddingDtype,
    EmbeddingManifest,
    load_embedding_manifest,
    sha256_bytes,
)
from server.errors import ArtifactError, BadRequest

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

ALIGNMENT = 64
"""Byte alignment of held matrices. TensorFlow feeds a numpy array without copying it only when
its data is aligned for Eigen (64 bytes with AVX-512)."""


def aligned_empty(shape: tuple[int, ...], dtype: npt.DTypeLike = np.float32) -> npt.NDArray[Any]:
    """An uninitialised C-contiguous array whose data starts on an :data:`ALIGNMENT` boundary."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dt).reshape(shape)


def array_sha256(*arrays: npt.NDArray[Any]) -> str:
    """sha256 of the arrays' raw bytes in C order, one after the other (no copy if contiguous)."""
    return sha256_bytes(*(np.ascontiguousarray(a).data for a in arrays))


def _aligned(array: npt.NDArray[Any], name: str) -> npt.NDArray[Any]:
    """``array`` if its data starts on an :data:`ALIGNMENT` boundary, else an aligned copy.

    Sessions are fed the matrix itself (:mod:`server.runtime.lookup`); TensorFlow copies a fed
    array that is not aligned, on every run. ``.npy`` files pad their header to 64 bytes, so
    memory-mapped artifacts are aligned; an array cut out of a graph proto may not be.
    """
    if array.ctypes.data % ALIGNMENT == 0 and array.flags.c_contiguous:
        return array
    if isinstance(array, np.memmap):
        log.warning("embedding %r: mapped matrix not %d-byte aligned; copied", name, ALIGNMENT)
    out = aligned_empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A plain ndarray view (not np.memmap) that refuses writes."""
    view = array.view(np.ndarray)
    view.flags.writeable = False
    return view


class SharedEmbedding:
    """One embedding matrix held once per process. Obtain it from an :class:`EmbeddingStore`."""

    def __init__(
        self,
        *,
        name: str,
        sha256: str,
        matrix: npt.NDArray[Any],
        scales: FloatArray | None = None,
        source: Path | None = None,
    ) -> None:
        if matrix.ndim != 2:
            raise ArtifactError(f"embedding {name!r}: matrix must be 2-D, got {matrix.shape}")
        dtype = EmbeddingDtype(matrix.dtype.name)
        if (dtype is EmbeddingDtype.INT8) != (scales is not None):
            raise ArtifactError(f"embedding {name!r}: per-row scales go with int8 (and only int8)")
        if scales is not None and scales.shape != (matrix.shape[0],):
            raise ArtifactError(
                f"embedding {name!r}: scales shape {scales.shape} != ({matrix.shape[0]},)"
            )
        self.name = name
        self.sha256 = sha256
        self.dtype = dtype
        self.rows: int = int(matrix.shape[0])
        self.dim: int = int(matrix.shape[1])
        self.source = source
        self.matrix = _read_only(_aligned(matrix, name))
        self.scales: FloatArray | None = (
            None if scales is None else _read_only(_aligned(scales, name))
        )
        self.nbytes: int = int(matrix.nbytes) + (0 if scales is None else int(scales.nbytes))
        self._users = 0

    @property
    def users(self) -> int:
        """How many holders (runtimes) currently share this embedding."""
        return self._users

    def __repr__(self) -> str:
        return (
            f"SharedEmbedding({self.name!r}, {self.rows}x{self.dim} {self.dtype.value}, "
            f"sha256={self.sha256[:12]}, users={self._users})"
        )

    def check_ids(self, ids: npt.NDArray[np.integer[Any]]) -> None:
        """Ids outside ``[0, rows)`` are a :class:`~server.errors.BadRequest`; ``ids`` not empty."""
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.rows:
            bad = lo if lo < 0 else hi
            raise BadRequest(f"token id {bad} outside embedding {self.name!r} ({self.rows} rows)")

    def lookup(
        self, ids: npt.NDArray[np.integer[Any]], out: FloatArray | None = None
    ) -> FloatArray:
        """Rows for ``ids`` (any shape, usually ``[B, T]``) as float32 ``[*ids.shape, dim]``.

        ``out`` (C-contiguous float32 of that shape) receives the rows; otherwise a fresh
        aligned array is returned. Serving gathers inside the session
        (:mod:`server.runtime.lookup`); this is the numpy reference for tools and tests.
        Ids outside ``[0, rows)`` are a :class:`~server.errors.BadRequest`.
        """
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise BadRequest(f"token ids must be integers, got {ids.dtype}")
        shape = (*ids.shape, self.dim)
        if out is None:
            out = aligned_empty(shape)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}"
            )
        if ids.size == 0:
            return out
        self.check_ids(ids)
        # Bounds are checked above, so mode="clip" never clips; it lets np.take write straight
        # into ``out`` (mode="raise" buffers the result and copies it, ~2x slower).
        if self.dtype is EmbeddingDtype.FLOAT32:
            np.take(self.matrix, ids, axis=0, out=out, mode="clip")
        elif self.dtype is EmbeddingDtype.FLOAT16:
            np.copyto(out, np.take(self.matrix, ids, axis=0, mode="clip"), casting="same_kind")
        else:
            assert self.scales is not None
            gathered = np.take(self.matrix, ids, axis=0, mode="clip")
            row_scales = np.take(self.scales, ids, mode="clip")
            np.multiply(gathered, row_scales[..., None], out=out)
        return out


def _load_npy(path: Path, what: str) -> npt.NDArray[Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found")
    try:
        array: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: not a readable .npy {what}: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise ArtifactError(f"{path}: expected one array, got {type(array).__name__}")
    if array.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        raise ArtifactError(f"{path}: {what} must be in native byte order, got {array.dtype.str}")
    if not array.flags.c_contiguous:
        raise ArtifactError(f"{path}: {what} must be stored in C order (fortran_order is False)")
    return array


def _load_artifact(directory: Path, manifest: EmbeddingManifest, verify: bool) -> SharedEmbedding:
    matrix = _load_npy(directory / MATRIX_NPY, "embedding matrix")
    where = directory / MATRIX_NPY
    if matrix.dtype != np.dtype(manifest.dtype.value):
        raise ArtifactError(
            f"{where}: dtype {matrix.dtype.name} but embedding.json says {manifest.dtype.value}"
        )
    if matrix.shape != (manifest.rows, manifest.dim):
        raise ArtifactError(
            f"{where}: shape {tuple(matrix.shape)} but embedding.json says "
            f"({manifest.rows}, {manifest.dim})"
        )
    scales: FloatArray | None = None
    if manifest.dtype is EmbeddingDtype.INT8:
        scales = _load_npy(directory / SCALES_NPY, "int8 scales")
        if scales.dtype != np.float32 or scales.shape != (manifest.rows,):
            raise ArtifactError(
                f"{directory / SCALES_NPY}: expected float32 ({manifest.rows},), "
                f"got {scales.dtype.name} {tuple(scales.shape)}"
            )
    if verify:
        actual = array_sha256(matrix) if scales is None else array_sha256(matrix, scales)
        if actual != manifest.sha256:
            raise ArtifactError(
                f"{where}: sha256 {actual[:16]}… does not match embedding.json "
                f"({manifest.sha256[:16]}…): the file is corrupt or was replaced"
            )
    return SharedEmbedding(
        name=manifest.name, sha256=manifest.sha256, matrix=matrix, scales=scales, source=directory
    )


class EmbeddingStore:
    """Process-wide, reference-counted embeddings keyed by sha256.

    Every :meth:`acquire` / :meth:`register_array` must be paired with one :meth:`release`;
    releasing the last user drops the store's reference so the memory (or mapping) is freed.
    """

    def __init__(self, *, verify: bool = True) -> None:
        self.verify = verify
        self._lock = threading.Lock()
        self._by_sha: dict[str, SharedEmbedding] = {}

    def acquire(self, embedding_dir: Path, *, verify: bool | None = None) -> SharedEmbedding:
        """The embedding stored in ``embedding_dir`` (loaded on first use), one more user."""
        directory = Path(embedding_dir)
        manifest = load_embedding_manifest(directory)
        with self._lock:
            existing = self._by_sha.get(manifest.sha256)
            if existing is None:
                check = self.verify if verify is None else verify
                existing = _load_artifact(directory, manifest, check)
                self._by_sha[manifest.sha256] = existing
            elif (existing.rows, existing.dim, existing.dtype) != (
                manifest.rows,
                manifest.dim,
                manifest.dtype,
            ):
                raise ArtifactError(
                    f"{directory}: same sha256 as loaded embedding {existing.name!r} but "
                    f"shape/dtype differ ({manifest.rows}x{manifest.dim} {manifest.dtype.value} "
                    f"vs {existing.rows}x{existing.dim} {existing.dtype.value})"
                )
            existing._users += 1
            return existing

    def register_array(
        self, array: npt.NDArray[Any], *, name: str | None = None
    ) -> SharedEmbedding:
        """Share a matrix cut out of a graph, keyed by the sha256 of its raw (C-order) bytes.

        If an embedding with the same bytes is already loaded (an artifact or another graph),
        that one gets one more user and ``array`` is not kept: the caller should drop it.
        ``name`` (for messages and metrics) defaults to ``graph-<sha256 prefix>``.
        """
        if array.ndim != 2 or array.dtype not in (np.float32, np.float16):
            raise ArtifactError(
                f"embedding {name or 'cut from a graph'!r}: expected a 2-D float32/float16 "
                f"matrix, got {array.dtype} {array.shape}"
            )
        matrix = np.ascontiguousarray(array)
        sha = array_sha256(matrix)
        name = name or f"graph-{sha[:12]}"
        with self._lock:
            existing = self._by_sha.get(sha)
            if existing is None:
                existing = SharedEmbedding(name=name, sha256=sha, matrix=matrix)
                self._by_sha[sha] = existing
            elif (existing.rows, existing.dim, existing.dtype.value) != (
                matrix.shape[0],
                matrix.shape[1],
                matrix.dtype.name,
            ):
                raise ArtifactError(
                    f"embedding {name!r}: same bytes as {existing.name!r} but a different shape"
                )
            existing._users += 1
            return existing

    def release(self, embedding: SharedEmbedding) -> None:
        """One user fewer; the last release removes the embedding from the store."""
        with self._lock:
            current = self._by_sha.get(embedding.sha256)
            if current is not embedding or embedding._users <= 0:
                raise ValueError(f"{embedding!r} is not held in this store")
            embedding._users -= 1
            if embedding._users == 0:
                del self._by_sha[embedding.sha256]

    def get(self, sha256: str) -> SharedEmbedding | None:
        with self._lock:
            return self._by_sha.get(sha256)

    def embeddings(self) -> list[SharedEmbedding]:
        """Loaded embeddings (a snapshot), e.g. for metrics."""
        with self._lock:
            return list(self._by_sha.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all loaded embeddings (each counted once)."""
        with self._lock:
            return sum(e.nbytes for e in self._by_sha.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_sha)

    def __contains__(self, sha256: object) -> bool:
        with self._lock:
            return sha256 in self._by_sha
