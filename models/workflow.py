"""What ``textserve train`` and ``textserve export`` do, as functions (the commands only parse).

* :func:`train_and_save`: train (optionally from a frozen graph's weights), write the full
  training checkpoint to ``out`` and/or export formats into a repository.
* :func:`export_run`: read a training run (full checkpoint + model.json) and export it.
* :func:`register`: add a model (and its embedding) to ``models.yaml``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from models.cnn import EMBEDDING_VAR, model_variable_names
from models.data import Dataset
from models.embeddings import EmbeddingArtifact, embedding_dir, load_embedding
from models.export import CKPT_PREFIX, Exported, export, prepare_version_dir, save_tuned_embedding
from models.train import TrainConfig, TrainedModel, Trainer
from server.artifact import (
    EMBEDDINGS_DIR,
    MODELS_YAML,
    SERVABLE_FORMATS,
    SHARED_EMBEDDING_FORMATS,
    EmbeddingConfig,
    ModelConfig,
    ModelFormat,
    RepositoryConfig,
    SpecificVersions,
    VersionPolicy,
    dir_files,
    list_versions,
    load_model_manifest,
    load_repository_config,
    sha256_bytes,
    write_model_manifest,
    write_repository_config,
)
from server.errors import ArtifactError, UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"invalid model name {name!r}: letters, digits, '_', '.', '-' (max 64, no leading "
            "punctuation)"
        )
    return name


def resolve_embedding(spec: str, repo: Path | None) -> EmbeddingArtifact:
    """An embedding directory path, or the name of one under ``REPO/embeddings/``."""
    path = Path(spec)
    if not path.is_dir() and repo is not None and _NAME.match(spec):
        path = embedding_dir(repo, spec)
    if not path.is_dir():
        raise ArtifactError(f"{spec}: embedding directory not found")
    return load_embedding(path)


def next_version(model_dir: Path) -> int:
    versions = list_versions(model_dir)
    return (max(versions) + 1) if versions else 1


def register(
    repo: Path, name: str, embedding: EmbeddingArtifact, versions: Sequence[int] | None = None
) -> None:
    """Add ``name`` (base path ``name``) and its embedding to models.yaml if they are absent.

    ``versions``: serve exactly these (``version_policy: {specific: …}``), for a model whose
    newest version is not servable (a checkpoint or SavedModel); default ``latest``.
    """
    repo = Path(repo)
    config = load_repository_config(repo) if (repo / MODELS_YAML).exists() else RepositoryConfig()
    models = list(config.models)
    embeddings = list(config.embeddings)
    if config.model(name) is None:
        policy: VersionPolicy = "latest"
        if versions:
            policy = SpecificVersions(specific=tuple(versions))
        models.append(ModelConfig(name=name, base_path=name, version_policy=policy))
    try:
        rel = embedding.path.resolve().relative_to(repo.resolve())
    except ValueError:
        rel = None
    if rel is not None and config.embedding(embedding.name) is None:
        embeddings.append(EmbeddingConfig(name=embedding.name, path=rel.as_posix()))
    write_repository_config(
        repo, RepositoryConfig(models=tuple(models), embeddings=tuple(embeddings))
    )


@dataclass
class TrainResult:
    model: TrainedModel
    run_dir: Path | None = None
    exports: list[Exported] = field(default_factory=list)


def _ensure_in_repo(embedding: EmbeddingArtifact, repo: Path) -> None:
    inside = embedding_dir(repo, embedding.name).resolve()
    if embedding.path.resolve() != inside:
        raise UsageError(
            f"embedding {embedding.path} is not in {repo / EMBEDDINGS_DIR}: the server only "
            f"reads embeddings inside the repository (copy it to {inside})"
        )


def _export_into_repo(
    model: TrainedModel,
    repo: Path,
    name: str,
    formats: Sequence[ModelFormat],
    trainer: Trainer | None,
    log: Log,
) -> list[Exported]:
    if any(f in SHARED_EMBEDDING_FORMATS for f in formats):
        if model.embedding_matrix is not None:
            art = save_tuned_embedding(model, repo, f"{name}-embedding")
            log(f"fine-tuned embedding written to {art.path}")
        else:
            _ensure_in_repo(model.embedding, repo)
    exports = []
    for fmt in formats:
        version = next_version(Path(repo) / name)
        exports.append(
            export(model, fmt, Path(repo) / name / str(version), name, version, trainer=trainer)
        )
        log(f"{name} version {version}: {fmt.value}")
    servable = [e.manifest.version for e in exports if e.format in SERVABLE_FORMATS]
    if servable:
        newest_servable = max(servable) == max(list_versions(Path(repo) / name))
        register(repo, name, model.embedding, None if newest_servable else servable)
    return exports


def train_and_save(
    dataset: Dataset,
    embedding: EmbeddingArtifact,
    config: TrainConfig,
    *,
    out: Path | None = None,
    repo: Path | None = None,
    name: str | None = None,
    formats: Sequence[ModelFormat] = (ModelFormat.STRIPPED,),
    init_from: Path | None = None,
    force: bool = False,
    log: Log = _quiet,
    progress: bool = True,
) -> TrainResult:
    if name is not None:
        check_name(name)
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not force:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    init_weights = None
    if init_from is not None:
        from models.frozen import read_frozen_weights

        frozen = read_frozen_weights(init_from)
        spec = frozen.spec
        if spec.embedding_dim != embedding.manifest.dim:
            raise UsageError(
                f"embedding dimension mismatch: {init_from} expects {spec.embedding_dim}, "
                f"embedding {embedding.name} has {embedding.manifest.dim}"
            )
        if spec.num_classes != len(dataset.labels):
            raise UsageError(
                f"{init_from} has {spec.num_classes} classes, dataset {dataset.name} has "
                f"{len(dataset.labels)} labels"
            )
        config = replace(config, filter_widths=spec.filter_widths, num_filters=spec.num_filters)
        init_weights = frozen.weights
        log(
            f"initialised from {init_from}: filter widths {spec.filter_widths}, "
            f"{spec.num_filters} filters"
        )
    with Trainer(embedding, dataset.labels, config, init_weights) as trainer:
        if init_weights is not None:
            acc = trainer.accuracy(trainer.encode(dataset.validation.texts), dataset.validation.y)
            log(f"validation accuracy before training: {acc:.4f}")
        if progress:
            model = trainer.fit_with_bar(dataset, name or dataset.name)
        else:
            model = trainer.fit(dataset)
        result = TrainResult(model)
        if out is not None:
            out_dir = prepare_version_dir(Path(out), force)
            run_name = name or check_name(re.sub(r"[^A-Za-z0-9_.-]", "-", out_dir.resolve().name))
            from models.export import export_checkpoint

            export_checkpoint(trainer, model, out_dir, run_name, 1)
            result.run_dir = out_dir
            log(f"training checkpoint written to {out_dir}")
        if repo is not None:
            assert name is not None
            result.exports = _export_into_repo(model, repo, name, formats, trainer, log)
    return result


def read_run(run_dir: Path, embedding: EmbeddingArtifact) -> TrainedModel:
    """A :class:`TrainedModel` from a full training checkpoint directory."""
    import tensorflow as tf

    run_dir = Path(run_dir)
    manifest = load_model_manifest(run_dir)
    if manifest.format != ModelFormat.CHECKPOINT or manifest.architecture is None:
        raise ArtifactError(f"{run_dir}: not a training run (format {manifest.format.value})")
    spec = manifest.architecture
    if spec.embedding_dim != embedding.manifest.dim:
        raise UsageError(
            f"embedding dimension mismatch: the model expects {spec.embedding_dim}, "
            f"embedding {embedding.name} has {embedding.manifest.dim}"
        )
    try:
        reader = tf.train.load_checkpoint(str(run_dir / CKPT_PREFIX))
    except (ValueError, tf.errors.OpError) as exc:
        raise ArtifactError(f"{run_dir}: cannot read the checkpoint: {exc}") from exc
    weights = {
        n: np.asarray(reader.get_tensor(n), dtype=np.float32) for n in model_variable_names(spec)
    }
    tuned = None
    if reader.has_tensor(EMBEDDING_VAR):
        matrix = np.ascontiguousarray(reader.get_tensor(EMBEDDING_VAR), dtype=np.float32)
        if matrix.shape != (embedding.manifest.rows, embedding.manifest.dim):
            raise ArtifactError(
                f"{run_dir}: checkpoint embedding {matrix.shape} does not match {embedding.name} "
                f"({embedding.manifest.rows} x {embedding.manifest.dim})"
            )
        if sha256_bytes(matrix.data) != embedding.manifest.sha256:
            tuned = matrix  # trained with --trainable-embedding
    elif manifest.embedding is not None and not embedding.manifest.compatible_with(
        manifest.embedding
    ):
        raise ArtifactError(
            f"{run_dir}: trained with another embedding ({manifest.embedding.name})"
        )
    return TrainedModel(
        spec=spec,
        tokenizer=manifest.tokenizer,
        labels=manifest.labels,
        weights=weights,
        embedding=embedding,
        embedding_matrix=tuned,
        metrics=dict(manifest.metrics),
    )


def export_run(
    run_dir: Path,
    repo: Path,
    name: str,
    formats: Sequence[ModelFormat],
    *,
    embedding: str | None = None,
    log: Log = _quiet,
) -> list[Exported]:
    """Export a training run into ``repo/name/<next versions>``, one version per format."""
    check_name(name)
    run_dir = Path(run_dir)
    manifest = load_model_manifest(run_dir)
    if embedding is None:
        if manifest.embedding is None:
            raise UsageError(f"{run_dir}: no embedding recorded; pass --embedding")
        embedding = manifest.embedding.name
    art = resolve_embedding(embedding, repo)
    model = read_run(run_dir, art)
    exports: list[Exported] = []
    rest = [f for f in formats if f != ModelFormat.CHECKPOINT]
    if ModelFormat.CHECKPOINT in formats:
        version = next_version(Path(repo) / name)
        vdir = prepare_version_dir(Path(repo) / name / str(version))
        for p in run_dir.iterdir():
            if p.name.startswith(CKPT_PREFIX) or p.name == "checkpoint":
                shutil.copy2(p, vdir / p.name)
        m = manifest.model_copy(update={"name": name, "version": version, "files": dir_files(vdir)})
        write_model_manifest(vdir, m)
        exports.append(Exported(ModelFormat.CHECKPOINT, vdir, m))
        log(f"{name} version {version}: checkpoint")
    exports.extend(_export_into_repo(model, repo, name, rest, None, log))
    return exports
