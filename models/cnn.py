"""The training graph: :func:`server.graph.build_cnn` + an in-graph embedding, loss and Adam.

The embedding is the variable ``embedding/W`` (non-trainable unless asked). Its initial value
is the placeholder ``embedding/W_init``, fed once when the variables are initialised: the
matrix never becomes a graph constant (``initializer=<numpy array>`` would keep a second copy
of it inside the GraphDef).

Training adds (outside the serving contract): ``input_y`` (int32 label ids), ``loss/loss``,
``accuracy/accuracy``, ``global_step``, the Adam optimizer and its slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from server.artifact import CnnSpec
from server.graph import CnnGraph, Tensor, build_cnn

EMBEDDING_VAR = "embedding/W"
EMBEDDING_INIT = "embedding/W_init"

# Variables owned by the model itself (no embedding, no optimizer state).
MODEL_VARIABLE_PREFIXES = ("conv-maxpool-", "output/")


def is_model_variable(name: str) -> bool:
    """True for ``conv-maxpool-*/W|b`` and ``output/W|b`` (names without ``:0``)."""
    return name.startswith(MODEL_VARIABLE_PREFIXES)


def model_variable_names(spec: CnnSpec) -> list[str]:
    names = [f"conv-maxpool-{w}/{p}" for w in spec.filter_widths for p in ("W", "b")]
    return [*names, "output/W", "output/b"]


def model_variable_shapes(spec: CnnSpec) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for w in spec.filter_widths:
        shapes[f"conv-maxpool-{w}/W"] = (w, spec.embedding_dim, spec.num_filters)
        shapes[f"conv-maxpool-{w}/b"] = (spec.num_filters,)
    shapes["output/W"] = (spec.num_filters * len(spec.filter_widths), spec.num_classes)
    shapes["output/b"] = (spec.num_classes,)
    return shapes


class InGraphEmbedding:
    """The ``lookup`` callable for :func:`build_cnn`: ``tf.nn.embedding_lookup`` on a variable.

    Called inside build_cnn's ``embedding`` name scope, so the variable is ``embedding/W`` and
    its initial-value placeholder ``embedding/W_init``.
    """

    def __init__(self, rows: int, dim: int, trainable: bool = False) -> None:
        self.rows = rows
        self.dim = dim
        self.trainable = trainable
        self.init: Tensor = None
        self.variable: Any = None

    def __call__(self, input_x: Tensor) -> Tensor:
        import tensorflow as tf

        v1 = tf.compat.v1
        self.init = v1.placeholder(tf.float32, [self.rows, self.dim], name="W_init")
        self.variable = v1.Variable(self.init, trainable=self.trainable, name="W")
        return tf.nn.embedding_lookup(self.variable, input_x)


@dataclass(frozen=True)
class TrainingGraph:
    graph: Any  # tf.Graph
    spec: CnnSpec
    cnn: CnnGraph
    embedding: InGraphEmbedding | None
    input_y: Tensor
    learning_rate: Tensor
    loss: Tensor
    accuracy: Tensor
    correct: Tensor
    train_op: Any
    global_step: Any
    init_op: Any

    def init_feed(self, matrix: npt.NDArray[np.float32] | None) -> dict[Tensor, Any]:
        """Feed for :attr:`init_op`: the embedding matrix through its placeholder."""
        if self.embedding is None:
            return {}
        return {self.embedding.init: matrix}

    def model_variables(self) -> list[Any]:
        """``conv-maxpool-*/W,b`` and ``output/W,b``, in a stable order."""
        import tensorflow as tf

        with self.graph.as_default():
            by_name = {v.op.name: v for v in tf.compat.v1.global_variables()}
        return [by_name[n] for n in model_variable_names(self.spec)]


def build_training_graph(
    spec: CnnSpec,
    embedding_rows: int | None,
    *,
    trainable_embedding: bool = False,
    seed: int = 0,
    l2: float = 0.0,
) -> TrainingGraph:
    """A new ``tf.Graph`` with the CNN, its loss and Adam.

    ``embedding_rows=None`` builds the embedding-external variant (``embedding/lookup`` is a
    placeholder fed with gathered rows); otherwise the embedding is the variable ``embedding/W``.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        emb = (
            None
            if embedding_rows is None
            else InGraphEmbedding(embedding_rows, spec.embedding_dim, trainable_embedding)
        )
        cnn = build_cnn(spec, lookup=emb, seed=seed)
        input_y = v1.placeholder(tf.int32, [None], name="input_y")
        lr = v1.placeholder_with_default(1e-3, [], name="learning_rate")
        with tf.name_scope("loss"):
            xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=input_y, logits=cnn.logits)
            loss = tf.reduce_mean(xent)
            if l2 > 0:
                kernels = [
                    v
                    for v in v1.trainable_variables()
                    if is_model_variable(v.op.name) and v.op.name.endswith("/W")
                ]
                loss = loss + l2 * tf.add_n([tf.nn.l2_loss(w) for w in kernels])
            loss = tf.identity(loss, name="loss")
        with tf.name_scope("accuracy"):
            correct = tf.cast(tf.equal(cnn.predictions, input_y), tf.float32, name="correct")
            accuracy = tf.reduce_mean(correct, name="accuracy")
        global_step = v1.train.get_or_create_global_step()
        train_op = v1.train.AdamOptimizer(lr).minimize(loss, global_step=global_step)
        init_op = v1.global_variables_initializer()
    return TrainingGraph(
        graph, spec, cnn, emb, input_y, lr, loss, accuracy, correct, train_op, global_step, init_op
    )
