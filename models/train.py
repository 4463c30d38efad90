"""Training the shallow CNN on CPU: Adam, per-batch padding, early stopping on validation accuracy.

Determinism: the graph seed (``tf.compat.v1.set_random_seed``), the variable initialisers,
dropout and the numpy generator that shuffles and buckets the batches all derive from
``TrainConfig.seed``. Measured on this machine (TF 2.21 CPU, oneDNN on): two runs with the same
seed give bit-identical weights with ``threads=1`` and with ``threads=2`` (and 1 vs 2 agree).
oneDNN is free to split a reduction (conv back-prop, bias gradients) differently for other
thread counts, shapes or CPUs, which can change the last bits of the weights; ``threads=1``
(``--threads 1``) is the setting to use when exact reproducibility matters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from models.cnn import TrainingGraph, build_training_graph, model_variable_shapes
from models.data import Dataset, LabelArray
from models.embeddings import EmbeddingArtifact, FloatMatrix
from server.artifact import CnnSpec, EmbeddingRef, TokenizerSpec
from server.errors import UsageError
from server.text import Tokenizer

Weights = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class TrainConfig:
    filter_widths: tuple[int, ...] = (1, 2, 3)
    num_filters: int = 128
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    dropout_keep_prob: float = 0.5
    l2: float = 0.0
    patience: int = 2
    """Stop after this many epochs without a better validation accuracy (best weights kept)."""
    trainable_embedding: bool = False
    max_len: int = 100
    seed: int = 0
    threads: int = 2
    """TensorFlow intra-op threads (1 = bit-reproducible)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_filters < 1 or self.patience < 0:
            raise UsageError("epochs, batch size and filters must be >= 1, patience >= 0")
        if not 0 < self.dropout_keep_prob <= 1:
            raise UsageError("dropout keep probability must be in (0, 1]")
        if self.learning_rate <= 0:
            raise UsageError("learning rate must be > 0")


@dataclass
class TrainedModel:
    """Everything an exporter needs, as plain numpy (no session)."""

    spec: CnnSpec
    tokenizer: TokenizerSpec
    labels: tuple[str, ...]
    weights: Weights
    """Model variables by name (``conv-maxpool-3/W`` …), float32."""
    embedding: EmbeddingArtifact
    embedding_matrix: FloatMatrix | None = None
    """Set only when the embedding was trained (it then differs from the artifact's)."""
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def embedding_ref(self) -> EmbeddingRef:
        m = self.embedding.manifest
        return EmbeddingRef(name=m.name, sha256=m.sha256)

    def matrix(self) -> FloatMatrix:
        return (
            self.embedding_matrix if self.embedding_matrix is not None else self.embedding.matrix()
        )


Progress = Callable[[str, int, int], None]
BUCKET_BATCHES = 32


def length_bucketed_batches(
    lengths: npt.NDArray[np.int64], batch_size: int, rng: np.random.Generator
) -> list[npt.NDArray[np.int64]]:
    """Shuffled mini-batches of similar-length texts (less padding per batch).

    The examples are shuffled, cut into pools of ``BUCKET_BATCHES`` batches, each pool sorted
    by length and cut into batches; then the batches are shuffled. Every example appears once.
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * BUCKET_BATCHES
    batches: list[npt.NDArray[np.int64]] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def session_config(threads: int) -> Any:
    import tensorflow as tf

    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=threads,
        inter_op_parallelism_threads=1,
        allow_soft_placement=True,
    )


class Trainer:
    """Owns one training graph and session. Use as a context manager."""

    def __init__(
        self,
        embedding: EmbeddingArtifact,
        labels: tuple[str, ...],
        config: TrainConfig,
        init_weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        import tensorflow as tf

        self.config = config
        self.embedding = embedding
        self.labels = labels
        dim = embedding.manifest.dim
        self.spec = CnnSpec(
            embedding_dim=dim,
            filter_widths=config.filter_widths,
            num_filters=config.num_filters,
            num_classes=len(labels),
        )
        self.tokenizer_spec = TokenizerSpec(
            max_len=config.max_len, min_len=max(config.filter_widths)
        )
        self.tokenizer = Tokenizer(embedding.vocab, self.tokenizer_spec)
        self.tg: TrainingGraph = build_training_graph(
            self.spec,
            embedding.manifest.rows,
            trainable_embedding=config.trainable_embedding,
            seed=config.seed,
            l2=config.l2,
        )
        self.session = tf.compat.v1.Session(
            graph=self.tg.graph, config=session_config(config.threads)
        )
        self.session.run(
            self.tg.init_op, self.tg.init_feed(np.ascontiguousarray(embedding.matrix()))
        )
        self._vars = {v.op.name: v for v in self.tg.model_variables()}
        with self.tg.graph.as_default():
            self._assign_ph = {
                n: tf.compat.v1.placeholder(tf.float32, v.shape, name=f"assign/{n}")
                for n, v in self._vars.items()
            }
            self._assign_op = tf.group(
                *[v.assign(self._assign_ph[n]) for n, v in self._vars.items()]
            )
            self._saver = tf.compat.v1.train.Saver()
        self.tg.graph.finalize()
        if init_weights is not None:
            try:
                self.set_weights(init_weights)
            except BaseException:
                self.session.close()
                raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    # -- weights ---------------------------------------------------------------------------

    def weights(self) -> Weights:
        values = self.session.run(self._vars)
        return {n: np.asarray(v, dtype=np.float32) for n, v in values.items()}

    def set_weights(self, weights: Mapping[str, npt.NDArray[np.float32]]) -> None:
        shapes = model_variable_shapes(self.spec)
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise UsageError(f"initial weights lack {', '.join(missing)}")
        for name, shape in shapes.items():
            if tuple(weights[name].shape) != shape:
                raise UsageError(
                    f"initial weight {name} has shape {tuple(weights[name].shape)}, "
                    f"this model needs {shape}"
                )
        feed = {self._assign_ph[n]: weights[n] for n in shapes}
        self.session.run(self._assign_op, feed)

    def embedding_matrix(self) -> FloatMatrix:
        assert self.tg.embedding is not None
        m: FloatMatrix = self.session.run(self.tg.embedding.variable)
        return m

    # -- running ---------------------------------------------------------------------------

    def encode(self, texts: tuple[str, ...] | list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t) for t in texts]

    def predict_proba(self, encoded: list[list[int]], batch_size: int = 256) -> FloatMatrix:
        """Probabilities in input order; texts are batched by length (the graph is
        padding-invariant, so this changes only the speed)."""
        out = np.zeros((len(encoded), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        for start in range(0, len(encoded), batch_size):
            idx = order[start : start + batch_size]
            ids = self.tokenizer.pad([encoded[i] for i in idx])
            out[idx] = self.session.run(self.tg.cnn.probs, {self.tg.cnn.input_x: ids})
        return out

    def accuracy(self, encoded: list[list[int]], y: LabelArray) -> float:
        if len(y) == 0:
            return float("nan")
        probs = self.predict_proba(encoded)
        return float(np.mean(probs.argmax(axis=1) == y))

    def fit(self, dataset: Dataset, progress: Progress | None = None) -> TrainedModel:
        """Train with early stopping on validation accuracy; the best epoch's weights are kept."""
        cfg = self.config
        if tuple(dataset.labels) != self.labels:
            raise UsageError("dataset labels differ from the trainer's labels")
        if len(dataset.train) == 0:
            raise UsageError(f"dataset {dataset.name!r} has no training examples")
        rng = np.random.default_rng(cfg.seed)
        train_x = self.encode(dataset.train.texts)
        val_x = self.encode(dataset.validation.texts)
        tg = self.tg
        n = len(train_x)
        best_acc, best_epoch, best_weights = -1.0, 0, self.weights()
        history: list[dict[str, float]] = []
        started = time.monotonic()
        lengths = np.array([len(e) for e in train_x])
        for epoch in range(1, cfg.epochs + 1):
            batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
            steps = len(batches)  # the same every epoch
            losses = []
            for step, idx in enumerate(batches):
                ids = self.tokenizer.pad([train_x[i] for i in idx])
                feed = {
                    tg.cnn.input_x: ids,
                    tg.input_y: dataset.train.y[idx],
                    tg.cnn.dropout_keep_prob: cfg.dropout_keep_prob,
                    tg.learning_rate: cfg.learning_rate,
                }
                _, loss = self.session.run([tg.train_op, tg.loss], feed)
                losses.append(float(loss))
                if progress is not None:
                    progress(
                        f"epoch {epoch}/{cfg.epochs}",
                        (epoch - 1) * steps + step + 1,
                        cfg.epochs * steps,
                    )
            val_acc = self.accuracy(val_x, dataset.validation.y) if val_x else float("nan")
            history.append(
                {"epoch": epoch, "loss": float(np.mean(losses)), "val_accuracy": val_acc}
            )
            if not val_x or val_acc > best_acc:
                best_acc, best_epoch, best_weights = val_acc, epoch, self.weights()
            elif epoch - best_epoch >= cfg.patience:
                break
        self.set_weights(best_weights)
        metrics = {
            "train_examples": float(n),
            "epochs_run": float(len(history)),
            "best_epoch": float(best_epoch),
            "train_seconds": round(time.monotonic() - started, 3),
        }
        if val_x:
            metrics["val_accuracy"] = best_acc
        if len(dataset.test):
            metrics["test_accuracy"] = self.accuracy(
                self.encode(dataset.test.texts), dataset.test.y
            )
        return TrainedModel(
            spec=self.spec,
            tokenizer=self.tokenizer_spec,
            labels=self.labels,
            weights=best_weights,
            embedding=self.embedding,
            embedding_matrix=self.embedding_matrix() if self.config.trainable_embedding else None,
            metrics=metrics,
            history=history,
        )

    def fit_with_bar(self, dataset: Dataset, label: str) -> TrainedModel:
        """:meth:`fit` driving a progress bar labelled ``label`` (on stderr, if a terminal)."""
        from models.progress import training_bar

        with training_bar(label) as bar:
            return self.fit(dataset, bar)

    def save_full_checkpoint(self, prefix: Path) -> Path:
        """The full checkpoint exactly as ``tf.compat.v1.train.Saver()`` writes it by default:
        every global variable (embedding, Adam slots, step) plus the ``.meta`` graph."""
        with self.tg.graph.as_default():
            saved: str = self._saver.save(self.session, str(prefix))
        return Path(saved)
