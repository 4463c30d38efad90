"""Compression strategies for a textserve model repository.

Each strategy writes a *new* artifact next to the one it reads and never modifies the source:

``to_float16``        a float16 copy of a float32 embedding (RAM and disk halve).
``to_int8``           an int8 copy with one float32 scale per row (symmetric:
                      ``scale = max|row| / 127``, ``q = round(row / scale)``; an all-zero row gets
                      scale 0). The server keeps it int8 in RAM and dequantizes only the rows a
                      batch gathers, so RAM drops to ~1/4 — unlike the Graph Transform Tool's
                      ``quantize_weights``, which saved disk but dequantized the whole matrix
                      back to float32 at load.
``prune_vocabulary``  keep the N most frequent tokens of a corpus (+ PAD and OOV), ids remapped;
                      a new ``vocab.txt`` + row subset. Words not kept read the OOV row.
``prune_model``       zero the smallest-|w| entries of the conv and dense kernels to a target
                      sparsity; a new model version. Raw size is unchanged — the saving only
                      appears once the files are compressed (gzip/zip), which is measured.

Embedding copies record ``source_sha256``: the sha256 of the float32 matrix the chain started
from, which is what a model's ``model.json`` references — so ``EmbeddingManifest.compatible_with``
lets the same model versions read any compressed copy. Models never see ids, only embedded rows,
so vocabulary pruning needs no change to the models either.

Large matrices are processed in row chunks: the source is memory-mapped, the output is written
through :func:`numpy.lib.format.open_memmap`, and sha256 is computed on the fly, so RAM stays at
a few chunks whatever the matrix size. Only the weight-pruning strategy imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from server import __version__
from server.artifact import (
    EMBEDDINGS_DIR,
    MATRIX_NPY,
    MODEL_JSON,
    OOV_ID,
    PAD_ID,
    SCALES_NPY,
    VOCAB_TXT,
    EmbeddingConfig,
    EmbeddingDtype,
    EmbeddingManifest,
    ModelConfig,
    ModelFormat,
    ModelManifest,
    RepositoryConfig,
    dir_files,
    list_versions,
    load_embedding_manifest,
    load_model_manifest,
    load_repository_config,
    resolve_inside,
    write_embedding_manifest,
    write_model_manifest,
    write_repository_config,
)
from server.errors import ArtifactError, UsageError
from server.text import Vocabulary, tokenize

DEFAULT_CHUNK_ROWS = 16_384
"""Rows converted per step (16k x 300 float32 = 19.7 MB)."""
INT8_MAX = 127

FloatArray = npt.NDArray[np.float32]
Int8Array = npt.NDArray[np.int8]
PruneScope = Literal["layer", "global"]

PRUNABLE_WEIGHTS = re.compile(r"(?:^|/)(?:conv-maxpool-\d+|output)/W$")
"""Names of the CNN's conv and dense kernels (see server/graph.py); biases are never pruned."""


# ---------------------------------------------------------------------------------------------
# Pure array helpers (no files)


def quantize_rows_int8(rows: npt.NDArray[np.floating[Any]]) -> tuple[Int8Array, FloatArray]:
    """Symmetric per-row int8: ``scale = max|row| / 127``, ``q = round(row / scale)``.

    ``q * scale`` is within ``scale / 2`` of each element. An all-zero row gets scale 0 and
    all-zero ``q`` (dequantizes to exact zeros, no division by zero, no NaN).
    """
    rows32 = np.asarray(rows, dtype=np.float32)
    if rows32.ndim != 2:
        raise ValueError("expected a [rows, dim] matrix")
    scales = (np.max(np.abs(rows32), axis=1) / np.float32(INT8_MAX)).astype(np.float32)
    divisor = np.where(scales > 0, scales, np.float32(1.0))
    q = np.rint(rows32 / divisor[:, None])
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return q.astype(np.int8), scales


def dequantize_int8(q: Int8Array, scales: FloatArray) -> FloatArray:
    """``q[i, j] * scales[i]`` as float32 (what the server computes for gathered rows)."""
    return (q.astype(np.float32) * scales.astype(np.float32)[:, None]).astype(np.float32)


def prune_array(weights: npt.NDArray[Any], sparsity: float) -> npt.NDArray[Any]:
    """A copy of ``weights`` with exactly ``round(sparsity * size)`` smallest-|w| entries zeroed.

    Ties at the threshold are broken by position, so the count is exact (entries that were
    already zero are among the smallest and count towards it).
    """
    _check_sparsity(sparsity)
    out = np.array(weights, copy=True)
    k = round(sparsity * out.size)
    if k > 0:
        flat = out.reshape(-1)
        idx = np.argpartition(np.abs(flat), k - 1)[:k]
        flat[idx] = 0
    return out


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")


def prune_arrays(
    arrays: dict[str, npt.NDArray[Any]], sparsity: float, scope: PruneScope = "layer"
) -> dict[str, npt.NDArray[Any]]:
    """Prune every array to ``sparsity``: each on its own (``layer``) or by one global threshold.

    ``global`` zeroes exactly ``round(sparsity * total)`` entries across all arrays together, so
    layers with small weights lose more of them.
    """
    _check_sparsity(sparsity)
    if scope == "layer":
        return {name: prune_array(a, sparsity) for name, a in arrays.items()}
    names = sorted(arrays)
    sizes = [arrays[n].size for n in names]
    flat = np.concatenate([np.abs(arrays[n]).reshape(-1).astype(np.float64) for n in names])
    k = round(sparsity * flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    out: dict[str, npt.NDArray[Any]] = {}
    start = 0
    for name, size in zip(names, sizes, strict=True):
        pruned = np.array(arrays[name], copy=True)
        pruned.reshape(-1)[mask[start : start + size]] = 0
        out[name] = pruned
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# Repository helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _repo_config(repo: Path) -> RepositoryConfig:
    if (Path(repo) / "models.yaml").exists():
        return load_repository_config(repo)
    return RepositoryConfig()


def embedding_dir(repo: Path, name: str) -> Path:
    """Directory of embedding ``name``: its models.yaml path, else ``embeddings/<name>``."""
    entry = _repo_config(repo).embedding(name)
    rel = entry.path if entry is not None else f"{EMBEDDINGS_DIR}/{name}"
    path = resolve_inside(repo, rel)
    if not path.is_dir():
        raise ArtifactError(f"embedding {name!r}: no directory {rel!r} in the repository")
    return path


def model_dir(repo: Path, name: str) -> Path:
    """Base directory of model ``name``: its models.yaml ``base_path``, else ``<name>``."""
    entry = _repo_config(repo).model(name)
    rel = entry.base_path if entry is not None else name
    path = resolve_inside(repo, rel)
    if not path.is_dir():
        raise ArtifactError(f"model {name!r}: no directory {rel!r} in the repository")
    return path


def _load_matrix(directory: Path, manifest: EmbeddingManifest) -> npt.NDArray[Any]:
    path = directory / MATRIX_NPY
    try:
        matrix: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not found") from exc
    except ValueError as exc:
        raise ArtifactError(f"{path}: not a valid .npy file: {exc}") from exc
    if matrix.shape != (manifest.rows, manifest.dim):
        raise ArtifactError(
            f"{path}: shape {matrix.shape} does not match embedding.json "
            f"({manifest.rows}, {manifest.dim})"
        )
    if matrix.dtype != np.dtype(manifest.dtype.value):
        raise ArtifactError(
            f"{path}: dtype {matrix.dtype} but embedding.json says {manifest.dtype}"
        )
    return matrix


def _load_scales(directory: Path, manifest: EmbeddingManifest) -> FloatArray:
    path = directory / SCALES_NPY
    try:
        scales = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: an int8 embedding needs per-row scales") from exc
    if scales.shape != (manifest.rows,) or scales.dtype != np.float32:
        raise ArtifactError(
            f"{path}: expected float32 [{manifest.rows}], got {scales.dtype} {scales.shape}"
        )
    return np.asarray(scales, dtype=np.float32)


def _chunks(rows: int, chunk_rows: int) -> Iterator[slice]:
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be positive")
    for start in range(0, rows, chunk_rows):
        yield slice(start, min(rows, start + chunk_rows))


def _contiguous_bytes(a: npt.NDArray[Any]) -> memoryview:
    return np.ascontiguousarray(a).data.cast("B")


def register_embedding(
    repo: Path,
    name: str,
    path: str,
    dtype: EmbeddingDtype,
    use_for: Sequence[str] = (),
) -> RepositoryConfig:
    """Add (or replace) embedding ``name`` in models.yaml; point the ``use_for`` models at it."""
    config = _repo_config(repo)
    entry = EmbeddingConfig(name=name, path=path, dtype=dtype)
    embeddings = (*(e for e in config.embeddings if e.name != name), entry)
    known = {m.name for m in config.models}
    missing = sorted(set(use_for) - known)
    if missing:
        raise ArtifactError(f"models.yaml has no model(s) {missing} to point at {name!r}")
    models: list[ModelConfig] = [
        m.model_copy(update={"embedding": name}) if m.name in use_for else m for m in config.models
    ]
    updated = config.model_copy(update={"embeddings": embeddings, "models": tuple(models)})
    # Round-trip through validation (model_copy does not validate).
    updated = RepositoryConfig.model_validate(updated.model_dump(mode="json"))
    write_repository_config(repo, updated)
    return updated


# ---------------------------------------------------------------------------------------------
# Embedding strategies


@dataclass(frozen=True)
class EmbeddingResult:
    """What an embedding strategy wrote."""

    strategy: str
    name: str
    path: Path
    manifest: EmbeddingManifest
    source: EmbeddingManifest
    ram_bytes: int
    """Bytes the server holds for this embedding (matrix + scales)."""
    source_ram_bytes: int
    extra: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "strategy": self.strategy,
            "name": self.name,
            "path": str(self.path),
            "dtype": self.manifest.dtype.value,
            "rows": self.manifest.rows,
            "dim": self.manifest.dim,
            "sha256": self.manifest.sha256,
            "source": self.source.name,
            "source_sha256": self.manifest.source_sha256,
            "ram_bytes": self.ram_bytes,
            "source_ram_bytes": self.source_ram_bytes,
            "disk_bytes": sum(self.manifest.files.values()),
            "source_disk_bytes": sum(self.source.files.values()),
            **self.extra,
        }


class _EmbeddingWriter:
    """Writes ``embeddings/<name>/`` into a temporary sibling directory, renamed on commit."""

    def __init__(self, repo: Path, name: str, overwrite: bool) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise UsageError(f"invalid embedding name {name!r}")
        self.repo = Path(repo)
        self.rel = f"{EMBEDDINGS_DIR}/{name}"
        self.final = resolve_inside(self.repo, self.rel)
        if self.final.exists() and not overwrite:
            raise ArtifactError(f"{self.final} already exists (use overwrite)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.final.parent))

    def commit(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _source_root_sha(manifest: EmbeddingManifest) -> str:
    """The float32 matrix a chain of copies started from (what models reference)."""
    return manifest.source_sha256 or manifest.sha256


def _convert_embedding(
    repo: Path,
    source: str,
    name: str,
    dtype: EmbeddingDtype,
    chunk_rows: int,
    overwrite: bool,
    register: bool,
    use_for: Sequence[str],
    strategy: str,
) -> EmbeddingResult:
    repo = Path(repo)
    src_dir = embedding_dir(repo, source)
    src = load_embedding_manifest(src_dir)
    if src.dtype is not EmbeddingDtype.FLOAT32:
        raise ArtifactError(
            f"embedding {source!r} is {src.dtype}; {strategy} needs a float32 source"
        )
    matrix = _load_matrix(src_dir, src)
    writer = _EmbeddingWriter(repo, name, overwrite)
    try:
        out = np.lib.format.open_memmap(
            writer.tmp / MATRIX_NPY, mode="w+", dtype=np.dtype(dtype.value), shape=matrix.shape
        )
        scales = np.zeros(src.rows, dtype=np.float32) if dtype is EmbeddingDtype.INT8 else None
        src_hash = hashlib.sha256()
        out_hash = hashlib.sha256()
        for rows in _chunks(src.rows, chunk_rows):
            chunk = np.ascontiguousarray(matrix[rows])
            src_hash.update(_contiguous_bytes(chunk))
            if not np.all(np.isfinite(chunk)):
                raise ArtifactError(f"embedding {source!r}: non-finite values in rows {rows}")
            converted: npt.NDArray[Any]
            if scales is not None:
                converted, scales[rows] = quantize_rows_int8(chunk)
            else:
                with np.errstate(over="ignore"):  # checked just below
                    converted = chunk.astype(np.float16)
                if not np.all(np.isfinite(converted)):
                    raise ArtifactError(
                        f"embedding {source!r}: values in rows {rows} overflow float16"
                    )
            out[rows] = converted
            out_hash.update(_contiguous_bytes(converted))
        out.flush()
        del out
        if src_hash.hexdigest() != src.sha256:
            raise ArtifactError(
                f"embedding {source!r}: matrix sha256 {src_hash.hexdigest()} does not match "
                f"embedding.json ({src.sha256}); the file is corrupt or was changed"
            )
        if scales is not None:
            np.save(writer.tmp / SCALES_NPY, scales, allow_pickle=False)
            out_hash.update(_contiguous_bytes(scales))
        shutil.copyfile(src_dir / VOCAB_TXT, writer.tmp / VOCAB_TXT)
        manifest = EmbeddingManifest(
            name=name,
            rows=src.rows,
            dim=src.dim,
            dtype=dtype,
            sha256=out_hash.hexdigest(),
            source_sha256=_source_root_sha(src),
            source=f"{src.source or src.name}; {strategy} of {src.name!r}",
            files=dir_files(writer.tmp),
        )
        write_embedding_manifest(writer.tmp, manifest)
        final = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if register:
        register_embedding(repo, name, writer.rel, dtype, use_for)
    return EmbeddingResult(
        strategy=strategy,
        name=name,
        path=final,
        manifest=manifest,
        source=src,
        ram_bytes=embedding_ram_bytes(manifest),
        source_ram_bytes=embedding_ram_bytes(src),
    )


def embedding_ram_bytes(manifest: EmbeddingManifest) -> int:
    """Bytes the serving store holds for an embedding: matrix, plus scales for int8."""
    itemsize = np.dtype(manifest.dtype.value).itemsize
    scales = manifest.rows * 4 if manifest.dtype is EmbeddingDtype.INT8 else 0
    return manifest.rows * manifest.dim * itemsize + scales


def to_float16(
    repo: Path,
    source: str,
    name: str | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    register: bool = True,
    use_for: Sequence[str] = (),
) -> EmbeddingResult:
    """Write a float16 copy of float32 embedding ``source`` (default name ``<source>-float16``)."""
    return _convert_embedding(
        repo,
        source,
        name or f"{source}-float16",
        EmbeddingDtype.FLOAT16,
        chunk_rows,
        overwrite,
        register,
        use_for,
        "float16",
    )


def to_int8(
    repo: Path,
    source: str,
    name: str | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    register: bool = True,
    use_for: Sequence[str] = (),
) -> EmbeddingResult:
    """Write a per-row-scaled int8 copy of float32 embedding ``source`` (``<source>-int8``)."""
    return _convert_embedding(
        repo,
        source,
        name or f"{source}-int8",
        EmbeddingDtype.INT8,
        chunk_rows,
        overwrite,
        register,
        use_for,
        "int8",
    )


def select_top_tokens(
    vocab: Vocabulary, texts: Iterable[str], keep: int, lowercase: bool = True
) -> tuple[list[int], dict[str, float]]:
    """Ids (ascending) of the ``keep`` in-vocabulary tokens most frequent in ``texts``.

    Ties are broken by the original id (GloVe's vocabulary is in corpus-frequency order). When
    the texts contain fewer than ``keep`` distinct known tokens, the rest are filled with the
    lowest unused ids, so exactly ``min(keep, len(vocab) - 2)`` ids come back. PAD and OOV are
    never in the list (every pruned vocabulary starts with them).

    Also returns corpus statistics: token counts and the fraction of corpus tokens known before
    and after pruning.
    """
    if keep < 1:
        raise UsageError(f"keep must be at least 1, got {keep}")
    counts: Counter[int] = Counter()
    total = 0
    for text in texts:
        ids = vocab.ids(tokenize(text, lowercase))
        total += len(ids)
        counts.update(ids)
    known = total - counts.get(OOV_ID, 0)
    counts.pop(OOV_ID, None)
    counts.pop(PAD_ID, None)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    chosen = ranked[:keep]
    limit = min(keep, len(vocab) - 2)
    if len(chosen) < limit:
        taken = set(chosen)
        filler = (i for i in range(2, len(vocab)) if i not in taken)
        chosen.extend(next(filler) for _ in range(limit - len(chosen)))
    kept_tokens = sum(counts[i] for i in chosen)
    stats = {
        "corpus_tokens": float(total),
        "corpus_distinct_known": float(len(counts)),
        "coverage_before": known / total if total else 0.0,
        "coverage_after": kept_tokens / total if total else 0.0,
    }
    return sorted(chosen), stats


def prune_vocabulary(
    repo: Path,
    source: str,
    texts: Iterable[str],
    keep: int,
    name: str | None = None,
    *,
    lowercase: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    register: bool = True,
    use_for: Sequence[str] = (),
) -> EmbeddingResult:
    """Keep PAD, OOV and the ``keep`` most frequent tokens of ``texts``; remap ids.

    Works on any dtype (an int8 source keeps its scales for the kept rows). The row of a kept
    token is copied bit for bit; every other word now reads the OOV row.
    """
    repo = Path(repo)
    src_dir = embedding_dir(repo, source)
    src = load_embedding_manifest(src_dir)
    vocab = Vocabulary.load(src_dir / VOCAB_TXT)
    if len(vocab) != src.rows:
        raise ArtifactError(
            f"embedding {source!r}: vocab.txt has {len(vocab)} lines, matrix {src.rows} rows"
        )
    chosen, stats = select_top_tokens(vocab, texts, keep, lowercase)
    order = np.array([PAD_ID, OOV_ID, *chosen], dtype=np.int64)
    matrix = _load_matrix(src_dir, src)
    scales = _load_scales(src_dir, src) if src.dtype is EmbeddingDtype.INT8 else None
    out_name = name or f"{source}-top{keep}"
    writer = _EmbeddingWriter(repo, out_name, overwrite)
    try:
        out = np.lib.format.open_memmap(
            writer.tmp / MATRIX_NPY, mode="w+", dtype=matrix.dtype, shape=(len(order), src.dim)
        )
        h = hashlib.sha256()
        for rows in _chunks(len(order), chunk_rows):
            block = np.ascontiguousarray(matrix[order[rows]])
            out[rows] = block
            h.update(_contiguous_bytes(block))
        out.flush()
        del out
        if scales is not None:
            kept_scales = np.ascontiguousarray(scales[order])
            np.save(writer.tmp / SCALES_NPY, kept_scales, allow_pickle=False)
            h.update(_contiguous_bytes(kept_scales))
        Vocabulary([vocab.tokens[i] for i in order.tolist()]).save(writer.tmp / VOCAB_TXT)
        manifest = EmbeddingManifest(
            name=out_name,
            rows=len(order),
            dim=src.dim,
            dtype=src.dtype,
            sha256=h.hexdigest(),
            source_sha256=_source_root_sha(src),
            source=f"{src.source or src.name}; top {keep} tokens of {src.name!r}",
            files=dir_files(writer.tmp),
        )
        write_embedding_manifest(writer.tmp, manifest)
        final = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if register:
        register_embedding(repo, out_name, writer.rel, src.dtype, use_for)
    return EmbeddingResult(
        strategy="vocab-prune",
        name=out_name,
        path=final,
        manifest=manifest,
        source=src,
        ram_bytes=embedding_ram_bytes(manifest),
        source_ram_bytes=embedding_ram_bytes(src),
        extra={"keep": float(keep), "kept_rows": float(len(order)), **stats},
    )


# ---------------------------------------------------------------------------------------------
# Weight pruning (TensorFlow)


@dataclass(frozen=True)
class DiskSizes:
    """Bytes of a version directory's files (model.json excluded): raw, gzip'd, one zip."""

    raw: int
    gzip: int
    zip: int


def disk_sizes(directory: Path) -> DiskSizes:
    """Raw size; sum of each file gzip'd (level 6, streamed); size of a deflate zip of them all."""
    files = dir_files(directory)
    gz = 0
    for rel in files:
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container
        with (Path(directory) / rel).open("rb") as f:
            while block := f.read(1 << 20):
                gz += len(comp.compress(block))
        gz += len(comp.flush())
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "model.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in files:
                zf.write(Path(directory) / rel, arcname=rel)
        zipped = archive.stat().st_size
    return DiskSizes(raw=sum(files.values()), gzip=gz, zip=zipped)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_model` wrote."""

    model: str
    source_version: int
    version: int
    path: Path
    format: ModelFormat
    sparsity_target: float
    sparsity: float
    """Zeros / entries over all pruned tensors."""
    tensors: dict[str, tuple[int, int]]
    """Pruned tensor → (zeros, entries)."""
    source_sizes: DiskSizes
    sizes: DiskSizes

    def record(self) -> dict[str, Any]:
        return {
            "strategy": "weight-prune",
            "model": self.model,
            "source_version": self.source_version,
            "version": self.version,
            "path": str(self.path),
            "format": self.format.value,
            "sparsity_target": self.sparsity_target,
            "sparsity": self.sparsity,
            "tensors": {k: {"zeros": z, "entries": n} for k, (z, n) in self.tensors.items()},
            "source_disk_bytes": vars(self.source_sizes),
            "disk_bytes": vars(self.sizes),
        }


def _checkpoint_prefix(version_dir: Path) -> Path:
    indexes = sorted(version_dir.glob("*.index"))
    if len(indexes) != 1:
        raise ArtifactError(
            f"{version_dir}: expected one checkpoint (*.index), found {len(indexes)}"
        )
    return indexes[0].with_suffix("")


def read_checkpoint(prefix: Path) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of a TF checkpoint, by name (``tf.compat.v1.train.NewCheckpointReader``)."""
    import tensorflow as tf

    try:
        reader = tf.compat.v1.train.NewCheckpointReader(str(prefix))
    except (tf.errors.OpError, ValueError) as exc:
        raise ArtifactError(f"{prefix}: not a readable checkpoint: {exc}") from exc
    names = sorted(reader.get_variable_to_shape_map())
    return {n: np.asarray(reader.get_tensor(n)) for n in names}


def write_checkpoint(prefix: Path, tensors: dict[str, npt.NDArray[Any]], write_state: bool) -> None:
    """Save ``tensors`` under their names with ``tf.compat.v1.train.Saver``.

    Initial values are fed through placeholders, never baked into the graph as constants.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        feeds = {}
        var_list = {}
        for i, (name, value) in enumerate(sorted(tensors.items())):
            ph = v1.placeholder(tf.as_dtype(value.dtype), value.shape, name=f"init_{i}")
            var_list[name] = v1.Variable(ph, name=f"var_{i}", trainable=False)
            feeds[ph] = value
        saver = v1.train.Saver(var_list=var_list, save_relative_paths=True)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.variables_initializer(list(var_list.values())), feed_dict=feeds)
            saver.save(sess, str(prefix), write_meta_graph=False, write_state=write_state)


_Pruner = Callable[[Path, Path, float, PruneScope], tuple[dict[str, npt.NDArray[Any]], set[Path]]]
"""(source dir, output dir, sparsity, scope) → (pruned tensors, source files it replaced)."""


def _prune_checkpoint(
    src_dir: Path, out_dir: Path, sparsity: float, scope: PruneScope
) -> tuple[dict[str, npt.NDArray[Any]], set[Path]]:
    prefix = _checkpoint_prefix(src_dir)
    tensors = read_checkpoint(prefix)
    targets = {n: a for n, a in tensors.items() if PRUNABLE_WEIGHTS.search(n)}
    if not targets:
        raise ArtifactError(f"{prefix}: no conv/dense kernels to prune (names like output/W)")
    pruned = prune_arrays(targets, sparsity, scope)
    tensors.update(pruned)
    state = src_dir / "checkpoint"
    write_checkpoint(out_dir / prefix.name, tensors, write_state=state.exists())
    replaced = {p for p in src_dir.iterdir() if p.name.startswith(prefix.name + ".")}
    return pruned, replaced | {state}


def _prune_graphdef(
    src_dir: Path, out_dir: Path, sparsity: float, scope: PruneScope
) -> tuple[dict[str, npt.NDArray[Any]], set[Path]]:
    import tensorflow as tf

    graphs = sorted(src_dir.glob("*.pb"))
    if len(graphs) != 1:
        raise ArtifactError(f"{src_dir}: expected one frozen graph (*.pb), found {len(graphs)}")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(graphs[0].read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise ArtifactError(f"{graphs[0]}: not a GraphDef: {exc}") from exc
    nodes = {
        n.name: n for n in graph_def.node if n.op == "Const" and PRUNABLE_WEIGHTS.search(n.name)
    }
    if not nodes:
        raise ArtifactError(f"{graphs[0]}: no conv/dense kernel constants to prune")
    arrays = {name: tf.make_ndarray(n.attr["value"].tensor) for name, n in nodes.items()}
    pruned = prune_arrays(arrays, sparsity, scope)
    for name, value in pruned.items():
        nodes[name].attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    (out_dir / graphs[0].name).write_bytes(graph_def.SerializeToString())
    return pruned, {graphs[0]}


def prune_model(
    repo: Path,
    model: str,
    sparsity: float,
    *,
    version: int | None = None,
    new_version: int | None = None,
    scope: PruneScope = "layer",
) -> PruneResult:
    """Write ``<model>/<new_version>/``: ``version`` (default latest) with kernels pruned.

    Stripped checkpoints are read with ``NewCheckpointReader`` and rewritten with ``Saver``;
    frozen GraphDefs get their kernel constants rewritten. Other files (vocabularies) are
    copied. model.json records the target and measured sparsity and the raw / gzip / zip sizes
    of both versions in ``metrics`` (the source's accuracy metrics are not carried over: they
    no longer describe the pruned weights).
    """
    _check_sparsity(sparsity)
    repo = Path(repo)
    base = model_dir(repo, model)
    versions = list_versions(base)
    if not versions:
        raise ArtifactError(f"model {model!r} has no version directories")
    src_version = version if version is not None else max(versions)
    if src_version not in versions:
        raise ArtifactError(f"model {model!r} has no version {src_version}")
    target = new_version if new_version is not None else max(versions) + 1
    if target in versions:
        raise ArtifactError(f"model {model!r} already has version {target}")
    src_dir = base / str(src_version)
    manifest = load_model_manifest(src_dir)
    prune_fn: _Pruner
    if manifest.format is ModelFormat.STRIPPED:
        prune_fn = _prune_checkpoint
    elif manifest.format in (
        ModelFormat.FROZEN,
        ModelFormat.FROZEN_SELFCONTAINED,
        ModelFormat.IMPORTED,
    ):
        prune_fn = _prune_graphdef
    else:
        raise ArtifactError(f"{src_dir}: cannot prune format {manifest.format.value!r}")
    out_dir = base / str(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.", dir=base))
    try:
        pruned, replaced = prune_fn(src_dir, tmp, sparsity, scope)
        for path in sorted(src_dir.rglob("*")):
            rel = path.relative_to(src_dir)
            if path.is_dir() or rel.as_posix() == MODEL_JSON or path in replaced:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, tmp / rel)
        tensors = {n: (int(np.count_nonzero(a == 0)), int(a.size)) for n, a in pruned.items()}
        zeros = sum(z for z, _ in tensors.values())
        entries = sum(n for _, n in tensors.values())
        source_sizes = disk_sizes(src_dir)
        sizes = disk_sizes(tmp)
        metrics = {
            "prune_sparsity_target": sparsity,
            "prune_sparsity": zeros / entries,
            "prune_source_version": float(src_version),
            "disk_bytes": float(sizes.raw),
            "disk_bytes_gzip": float(sizes.gzip),
            "disk_bytes_zip": float(sizes.zip),
            "source_disk_bytes": float(source_sizes.raw),
            "source_disk_bytes_gzip": float(source_sizes.gzip),
            "source_disk_bytes_zip": float(source_sizes.zip),
        }
        new_manifest = manifest.model_copy(
            update={
                "version": target,
                "files": dir_files(tmp),
                "metrics": metrics,
                "created_at": _now(),
                "textserve_version": __version__,
            }
        )
        write_model_manifest(tmp, ModelManifest.model_validate(new_manifest.model_dump()))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PruneResult(
        model=model,
        source_version=src_version,
        version=target,
        path=out_dir,
        format=manifest.format,
        sparsity_target=sparsity,
        sparsity=zeros / entries,
        tensors=tensors,
        source_sizes=source_sizes,
        sizes=sizes,
    )
