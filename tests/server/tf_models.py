"""Test helpers: small real TensorFlow models and repository artifacts written the plain TF way.

These write the on-disk contract (``server.artifact``) with TensorFlow's own tools (Saver,
``convert_variables_to_constants``) and never with the code under test, so the runtimes are
checked against independently made artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.artifact import (
    EMBEDDINGS_DIR,
    MATRIX_NPY,
    SCALES_NPY,
    VOCAB_TXT,
    CnnSpec,
    EmbeddingDtype,
    EmbeddingManifest,
    EmbeddingRef,
    ModelFormat,
    ModelManifest,
    TensorNames,
    TokenizerSpec,
    write_embedding_manifest,
    write_model_manifest,
)
from server.graph import CnnGraph, build_cnn

FloatArray = npt.NDArray[np.float32]
LABELS4 = ("world", "sports", "business", "science")


def random_matrix(rows: int, dim: int, seed: int = 0) -> FloatArray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(0.5)


def quantize_int8(matrix: FloatArray) -> tuple[npt.NDArray[np.int8], FloatArray]:
    scales = (np.abs(matrix).max(axis=1) / 127.0).astype(np.float32)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(matrix / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def sha256_of(*arrays: npt.NDArray[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_embedding(
    repo: Path,
    name: str,
    matrix: npt.NDArray[Any],
    *,
    scales: FloatArray | None = None,
    source_sha256: str | None = None,
) -> Path:
    """``repo/embeddings/<name>/`` with matrix.npy (+ scales.npy), vocab.txt, embedding.json."""
    directory = repo / EMBEDDINGS_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / MATRIX_NPY, matrix, allow_pickle=False)
    chunks: list[npt.NDArray[Any]] = [matrix]
    if scales is not None:
        np.save(directory / SCALES_NPY, scales, allow_pickle=False)
        chunks.append(scales)
    words = [f"w{i}" for i in range(2, matrix.shape[0])]
    (directory / VOCAB_TXT).write_text("\n".join(["<pad>", "<unk>", *words]) + "\n", "utf-8")
    write_embedding_manifest(
        directory,
        EmbeddingManifest(
            name=name,
            rows=matrix.shape[0],
            dim=matrix.shape[1],
            dtype=EmbeddingDtype(matrix.dtype.name),
            sha256=sha256_of(*chunks),
            source_sha256=source_sha256,
            source="generated for tests",
        ),
    )
    return directory


def embedding_ref(directory: Path) -> EmbeddingRef:
    data = json.loads((directory / "embedding.json").read_text("utf-8"))
    return EmbeddingRef(name=data["name"], sha256=data["sha256"])


@dataclass
class TrainedCnn:
    """A textserve CNN whose embedding is an in-graph variable (as at training time)."""

    spec: CnnSpec
    graph: Any
    session: Any
    net: CnnGraph

    def probs(self, ids: npt.NDArray[np.int32]) -> FloatArray:
        out: FloatArray = self.session.run(self.net.probs, {self.net.input_x: ids})
        return out

    def weights(self) -> dict[str, npt.NDArray[Any]]:
        import tensorflow as tf

        with self.graph.as_default():
            variables = {v.op.name: v for v in tf.compat.v1.trainable_variables()}
        values: dict[str, npt.NDArray[Any]] = self.session.run(variables)
        return values

    def close(self) -> None:
        self.session.close()


def make_cnn(spec: CnnSpec, matrix: FloatArray, seed: int = 0) -> TrainedCnn:
    """The CNN with ``embedding/W`` (not trainable) initialised from ``matrix`` via a feed."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        init_value = v1.placeholder(tf.float32, matrix.shape, name="embedding_init")

        def lookup(ids: Any) -> Any:  # called inside build_cnn's "embedding" name scope
            table = v1.get_variable("embedding/W", initializer=init_value, trainable=False)
            return tf.gather(table, ids)

        net = build_cnn(spec, lookup=lookup, seed=seed)
        init = v1.global_variables_initializer()
        # Move biases off their constant init so every weight matters in the comparison.
        bumps = [
            v.assign_add(v1.random_normal(v.shape, stddev=0.2, seed=seed + i))
            for i, v in enumerate(v1.trainable_variables())
        ]
    session = v1.Session(graph=graph)
    session.run(init, {init_value: matrix})
    session.run(bumps)
    return TrainedCnn(spec, graph, session, net)


def export_stripped(cnn: TrainedCnn, version_dir: Path) -> None:
    import tensorflow as tf

    version_dir.mkdir(parents=True, exist_ok=True)
    with cnn.graph.as_default():
        saver = tf.compat.v1.train.Saver(
            var_list={v.op.name: v for v in tf.compat.v1.trainable_variables()}
        )
        saver.save(cnn.session, str(version_dir / "model.ckpt"), write_meta_graph=False)


def export_selfcontained(cnn: TrainedCnn, version_dir: Path) -> None:
    """The seed's format: everything, embedding included, frozen into model.pb."""
    import tensorflow as tf

    version_dir.mkdir(parents=True, exist_ok=True)
    frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
        cnn.session, cnn.graph.as_graph_def(), ["output/probs", "output/predictions"]
    )
    (version_dir / "model.pb").write_bytes(frozen.SerializeToString())


def export_frozen_external(cnn: TrainedCnn, version_dir: Path) -> None:
    """Weights frozen, ``embedding/lookup`` left as a placeholder (format ``frozen``)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    version_dir.mkdir(parents=True, exist_ok=True)
    weights = cnn.weights()
    graph = tf.Graph()
    with graph.as_default():
        build_cnn(cnn.spec, lookup=None)
        assigns = [v.assign(weights[v.op.name]) for v in v1.trainable_variables()]
        with v1.Session(graph=graph) as session:
            session.run(assigns)
            frozen = v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["output/probs", "output/predictions"]
            )
    (version_dir / "model.pb").write_bytes(frozen.SerializeToString())


def weight_bytes(cnn: TrainedCnn) -> int:
    return sum(int(v.nbytes) for v in cnn.weights().values())


def write_manifest(
    version_dir: Path,
    *,
    name: str,
    fmt: ModelFormat,
    spec: CnnSpec | None,
    labels: tuple[str, ...] = LABELS4,
    embedding: EmbeddingRef | None = None,
    vocab: str | None = None,
    version: int = 1,
    tensors: TensorNames | None = None,
    tokenizer: TokenizerSpec | None = None,
    apply_softmax: bool = False,
) -> ModelManifest:
    manifest = ModelManifest(
        name=name,
        version=version,
        format=fmt,
        labels=labels,
        tokenizer=tokenizer or TokenizerSpec(),
        architecture=spec,
        tensors=tensors or TensorNames(),
        apply_softmax=apply_softmax,
        embedding=embedding,
        vocab=vocab,
    )
    version_dir.mkdir(parents=True, exist_ok=True)
    write_model_manifest(version_dir, manifest)
    return manifest


def write_vocab(path: Path, rows: int) -> None:
    words = [f"w{i}" for i in range(2, rows)]
    path.write_text("\n".join(["<pad>", "<unk>", *words]) + "\n", "utf-8")


def sample_ids(rows: int, seed: int = 1, batch: int = 8, length: int = 12) -> npt.NDArray[np.int32]:
    """A padded batch of mixed lengths (some texts shorter than the widest filter)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), dtype=np.int32)
    for row in range(batch):
        n = int(rng.integers(1, length + 1))
        ids[row, :n] = rng.integers(1, rows, size=n)
    return ids
