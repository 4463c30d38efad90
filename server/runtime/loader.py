"""``load_runtime``: a model version directory → a live, session-backed :class:`Runtime`.

The registry resolves which embedding directory a model reads (its model.json's embedding, or
a per-model override from models.yaml such as an int8 copy) and passes it here; this module
reads model.json, checks the embedding is compatible with the one the model was trained with,
builds the tokenizer and dispatches on the format. Every failure is an
:class:`~server.errors.ArtifactError` with a one-line message naming the file.
"""

from __future__ import annotations

from pathlib import Path

from server.artifact import (
    SHARED_EMBEDDING_FORMATS,
    VOCAB_TXT,
    EmbeddingManifest,
    ModelFormat,
    ModelManifest,
    load_embedding_manifest,
    load_model_manifest,
    resolve_inside,
)
from server.embeddings import EmbeddingStore
from server.errors import ArtifactError
from server.runtime.base import Runtime
from server.text import Tokenizer, shared_vocabulary


def _vocabulary(version_dir: Path, manifest: ModelManifest, embedding_dir: Path | None) -> Path:
    if manifest.vocab is not None:
        return resolve_inside(version_dir, manifest.vocab)
    if embedding_dir is not None:
        return Path(embedding_dir) / VOCAB_TXT
    return Path(version_dir) / VOCAB_TXT


def _embedding_manifest(
    version_dir: Path, manifest: ModelManifest, embedding_dir: Path | None
) -> EmbeddingManifest | None:
    if embedding_dir is None:
        if manifest.format in SHARED_EMBEDDING_FORMATS:
            raise ArtifactError(
                f"{version_dir}: format {manifest.format.value} reads a shared embedding, "
                "but none was given"
            )
        return None
    emb = load_embedding_manifest(Path(embedding_dir))
    if manifest.embedding is not None and not emb.compatible_with(manifest.embedding):
        raise ArtifactError(
            f"{version_dir}: trained with embedding {manifest.embedding.name!r} "
            f"(sha256 {manifest.embedding.sha256[:12]}…), but {embedding_dir} holds "
            f"{emb.name!r} (sha256 {emb.sha256[:12]}…), not made from it"
        )
    if manifest.embedding is None and manifest.format in SHARED_EMBEDDING_FORMATS:
        raise ArtifactError(f"{version_dir}/model.json: 'embedding' is required for this format")
    return emb


def load_runtime(
    version_dir: Path,
    *,
    store: EmbeddingStore,
    embedding_dir: Path | None,
    intra_op_threads: int,
    inter_op_threads: int,
) -> Runtime:
    """Load one model version. ``embedding_dir`` is None for self-contained/imported graphs."""
    version_dir = Path(version_dir)
    manifest = load_model_manifest(version_dir)
    emb_manifest = _embedding_manifest(version_dir, manifest, embedding_dir)
    vocab = shared_vocabulary(_vocabulary(version_dir, manifest, embedding_dir))
    tokenizer = Tokenizer(vocab, manifest.tokenizer)

    fmt = manifest.format
    if fmt in SHARED_EMBEDDING_FORMATS:
        assert embedding_dir is not None
        embedding = store.acquire(embedding_dir)
        if fmt is ModelFormat.STRIPPED:
            from server.runtime.stripped import load_stripped as load_shared
        else:
            from server.runtime.frozen import load_frozen as load_shared

        return load_shared(
            version_dir,
            manifest,
            tokenizer=tokenizer,
            store=store,
            embedding=embedding,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
    if fmt in (ModelFormat.FROZEN_SELFCONTAINED, ModelFormat.IMPORTED):
        from server.runtime.frozen import load_selfcontained

        return load_selfcontained(
            version_dir,
            manifest,
            tokenizer=tokenizer,
            store=store,
            embedding_dir=embedding_dir,
            embedding_manifest=emb_manifest,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
    raise ArtifactError(f"{version_dir}: format {fmt.value!r} is not servable by textserve")
