"""Exporters: one trained model → ``REPO/<model>/<version>/`` in each on-disk format.

Every version directory gets a ``model.json`` (:class:`~server.artifact.ModelManifest`) with the
format, labels, tokenizer, architecture, tensor names, embedding reference (name + sha256),
metrics and the exported files' sizes.

=========================  =====================================================================
format                     files
=========================  =====================================================================
``checkpoint``             ``model.ckpt.{index,data-*,meta}`` + ``checkpoint``: exactly what
                           ``tf.compat.v1.train.Saver()`` writes by default (embedding, Adam
                           slots, step, meta graph). A baseline, not served.
``stripped``               ``model.ckpt.{index,data-*}``: the model's own trainable variables
                           only, no meta graph; the graph is rebuilt from ``architecture``.
``frozen``                 ``model.pb``: embedding-external frozen GraphDef built with
                           ``build_cnn(lookup=None)``; inputs ``input_x`` and
                           ``embedding/lookup``; holds only the model's own weights.
``frozen-selfcontained``   ``model.pb`` + ``vocab.txt``: the embedding frozen inside as a
                           constant (the seed's way); input ``input_x`` → ``output/probs``.
``savedmodel``             ``saved_model.pb`` + ``variables/`` + ``vocab.txt``: TF1 SavedModel,
                           signature ``serving_default``: ``input_x`` → ``probs``,
                           ``predictions``; self-contained (TensorFlow Serving needs that).
=========================  =====================================================================
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.cnn import InGraphEmbedding, model_variable_names
from models.embeddings import EmbeddingArtifact, embedding_dir, write_embedding
from models.train import TrainedModel, Trainer, session_config
from server import __version__
from server.artifact import (
    SHARED_EMBEDDING_FORMATS,
    VOCAB_TXT,
    ModelFormat,
    ModelManifest,
    TensorNames,
    dir_files,
    write_model_manifest,
)
from server.errors import ArtifactError
from server.graph import CnnGraph, build_cnn

CKPT_PREFIX = "model.ckpt"
FROZEN_PB = "model.pb"
OUTPUT_NODES = ("output/probs", "output/predictions", "output/logits")
EXPORT_FORMATS = (
    ModelFormat.CHECKPOINT,
    ModelFormat.STRIPPED,
    ModelFormat.FROZEN,
    ModelFormat.FROZEN_SELFCONTAINED,
    ModelFormat.SAVEDMODEL,
)


@dataclass(frozen=True)
class Exported:
    format: ModelFormat
    path: Path
    manifest: ModelManifest

    @property
    def files(self) -> dict[str, int]:
        return dict(self.manifest.files)

    @property
    def bytes(self) -> int:
        return sum(self.manifest.files.values())


def prepare_version_dir(path: Path, force: bool = False) -> Path:
    """Create an empty version directory; refuse to overwrite one unless ``force``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not force:
            raise ArtifactError(f"{path} already exists (use --force to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _exported(
    model: TrainedModel,
    name: str,
    version: int,
    fmt: ModelFormat,
    version_dir: Path,
    *,
    self_contained: bool = False,
) -> Exported:
    """Write ``model.json`` for the files now in ``version_dir``.

    ``self_contained``: the embedding is inside the export, so the model's own ``vocab.txt`` is
    written beside it and model.json names no shared embedding.
    """
    if self_contained:
        model.embedding.vocab.save(version_dir / VOCAB_TXT)
    manifest = ModelManifest(
        name=name,
        version=version,
        format=fmt,
        labels=model.labels,
        tokenizer=model.tokenizer,
        architecture=model.spec,
        tensors=TensorNames(),
        embedding=None if self_contained else model.embedding_ref,
        vocab=VOCAB_TXT if self_contained else None,
        files=dir_files(version_dir),
        metrics=dict(model.metrics),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        textserve_version=__version__,
    )
    write_model_manifest(version_dir, manifest)
    return Exported(fmt, version_dir, manifest)


@contextmanager
def inference_session(
    model: TrainedModel, *, with_embedding: bool
) -> Iterator[tuple[Any, CnnGraph]]:
    """A fresh graph + session holding the model's weights (and the embedding, if asked).

    Variables get their values by feeding each initializer's initial value, so no assign ops or
    constants are added to the graph.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        emb = (
            InGraphEmbedding(model.embedding.manifest.rows, model.spec.embedding_dim)
            if with_embedding
            else None
        )
        cnn = build_cnn(model.spec, lookup=emb)
        by_name = {v.op.name: v for v in v1.global_variables()}
        feed: dict[Any, Any] = {
            by_name[n].initial_value: model.weights[n] for n in model_variable_names(model.spec)
        }
    if emb is not None:
        feed[emb.init] = np.ascontiguousarray(model.matrix())
    session = v1.Session(graph=graph, config=session_config(2))
    try:
        with graph.as_default():  # Saver/builder calls need graph mode, not eager
            session.run([v.initializer for v in by_name.values()], feed)
            yield session, cnn
    finally:
        session.close()


def export_checkpoint(
    trainer: Trainer, model: TrainedModel, version_dir: Path, name: str, version: int
) -> Exported:
    """The full default-Saver checkpoint, written from the live training session."""
    trainer.set_weights(model.weights)
    trainer.save_full_checkpoint(version_dir / CKPT_PREFIX)
    return _exported(model, name, version, ModelFormat.CHECKPOINT, version_dir)


def export_stripped(model: TrainedModel, version_dir: Path, name: str, version: int) -> Exported:
    import tensorflow as tf

    with inference_session(model, with_embedding=False) as (session, _):
        variables = tf.compat.v1.global_variables()
        saver = tf.compat.v1.train.Saver(var_list={v.op.name: v for v in variables})
        saver.save(
            session, str(version_dir / CKPT_PREFIX), write_meta_graph=False, write_state=False
        )
    return _exported(model, name, version, ModelFormat.STRIPPED, version_dir)


def _freeze(session: Any) -> bytes:
    import tensorflow as tf

    graph_def = session.graph.as_graph_def()
    frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
        session, graph_def, list(OUTPUT_NODES)
    )
    data: bytes = frozen.SerializeToString()
    return data


def export_frozen(model: TrainedModel, version_dir: Path, name: str, version: int) -> Exported:
    """Embedding-external frozen GraphDef: feed ``input_x`` and ``embedding/lookup``."""
    with inference_session(model, with_embedding=False) as (session, _):
        (version_dir / FROZEN_PB).write_bytes(_freeze(session))
    return _exported(model, name, version, ModelFormat.FROZEN, version_dir)


def export_frozen_selfcontained(
    model: TrainedModel, version_dir: Path, name: str, version: int
) -> Exported:
    """The seed's way: embedding frozen inside the GraphDef, with the model's own vocab.txt."""
    with inference_session(model, with_embedding=True) as (session, _):
        (version_dir / FROZEN_PB).write_bytes(_freeze(session))
    return _exported(
        model, name, version, ModelFormat.FROZEN_SELFCONTAINED, version_dir, self_contained=True
    )


def export_savedmodel(model: TrainedModel, version_dir: Path, name: str, version: int) -> Exported:
    """TF1 SavedModel (``serve`` tag) for TensorFlow Serving users; self-contained."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tempfile.TemporaryDirectory(dir=version_dir.parent) as tmp:
        out = Path(tmp) / "sm"
        with inference_session(model, with_embedding=True) as (session, cnn):
            builder = v1.saved_model.Builder(str(out))
            signature = v1.saved_model.predict_signature_def(
                inputs={"input_x": cnn.input_x},
                outputs={"probs": cnn.probs, "predictions": cnn.predictions},
            )
            builder.add_meta_graph_and_variables(
                session,
                [v1.saved_model.tag_constants.SERVING],
                signature_def_map={"serving_default": signature},
                strip_default_attrs=True,
            )
            builder.save()
        for p in out.iterdir():
            shutil.move(str(p), version_dir / p.name)
    return _exported(model, name, version, ModelFormat.SAVEDMODEL, version_dir, self_contained=True)


_EXPORTERS = {
    ModelFormat.STRIPPED: export_stripped,
    ModelFormat.FROZEN: export_frozen,
    ModelFormat.FROZEN_SELFCONTAINED: export_frozen_selfcontained,
    ModelFormat.SAVEDMODEL: export_savedmodel,
}


def export(
    model: TrainedModel,
    fmt: ModelFormat,
    version_dir: Path,
    name: str,
    version: int,
    *,
    trainer: Trainer | None = None,
    force: bool = False,
) -> Exported:
    """Export ``model`` as ``fmt`` into ``version_dir`` (``checkpoint`` needs the live trainer)."""
    version_dir = prepare_version_dir(version_dir, force)
    if fmt == ModelFormat.CHECKPOINT:
        if trainer is None:
            raise ArtifactError("a full checkpoint is written from the training session")
        return export_checkpoint(trainer, model, version_dir, name, version)
    if fmt not in _EXPORTERS:
        raise ArtifactError(f"cannot export format {fmt}")
    if fmt in SHARED_EMBEDDING_FORMATS and model.embedding_matrix is not None:
        raise ArtifactError(
            "this model fine-tuned its embedding: write it with save_tuned_embedding() first"
        )
    return _EXPORTERS[fmt](model, version_dir, name, version)


def save_tuned_embedding(model: TrainedModel, repo: Path, name: str) -> EmbeddingArtifact:
    """Write a fine-tuned embedding as its own artifact and point the model at it."""
    matrix = model.embedding_matrix
    if matrix is None:
        return model.embedding
    words = model.embedding.vocab.tokens[2:]
    source = f"{model.embedding.manifest.source}, fine-tuned"
    art = write_embedding(
        embedding_dir(repo, name),
        name,
        words,
        matrix.shape[1],
        lambda a, b: matrix[a + 2 : b + 2],
        source,
        special_rows=matrix[:2],
    )
    model.embedding = art
    model.embedding_matrix = None
    return art
