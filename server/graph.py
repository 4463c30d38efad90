"""The shallow CNN's inference graph (TF1 style), shared by training and serving.

    input_x [B, T] int32 ──► embedding/lookup [B, T, D] float32
        ──► conv-maxpool-{w}: conv1d(width w) + bias ─► ReLU ─► masked max over time   (per w)
        ──► concat ─► dropout(dropout_keep_prob, default 1.0) ─► output/logits ─► output/probs
                                                                              └► output/predictions

Stable node names (documented contract, see ``server.artifact``):
``input_x``, ``dropout_keep_prob``, ``embedding/lookup``, ``lengths``,
``conv-maxpool-{w}/W``, ``conv-maxpool-{w}/b``, ``output/W``, ``output/b``,
``output/logits``, ``output/probs``, ``output/predictions``.

The max-pool only looks at windows inside ``max(length, widest filter)`` tokens, so a text
gives the same probabilities whatever it is padded to: a batch of mixed lengths answers
exactly what each text would answer alone.

``embedding/lookup`` is where serving cuts the graph: the server puts there a gather from the
shared embedding store's matrix, fed on every run without a copy (:mod:`server.runtime.lookup`).
Training builds the same name as ``tf.identity`` of an in-graph gather.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.artifact import PAD_ID, CnnSpec

Tensor = Any  # tf.Tensor; TensorFlow ships no type stubs.


@dataclass(frozen=True)
class CnnGraph:
    input_x: Tensor
    dropout_keep_prob: Tensor
    embedded: Tensor
    lengths: Tensor
    logits: Tensor
    probs: Tensor
    predictions: Tensor


def build_cnn(
    spec: CnnSpec,
    lookup: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
) -> CnnGraph:
    """Build the CNN in the current default graph.

    ``lookup`` maps ``input_x`` to embedded rows ``[B, T, D]`` (training). When ``None`` the
    embedded rows are a placeholder the caller feeds (serving from the shared store).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    input_x = v1.placeholder(tf.int32, [None, None], name="input_x")
    keep_prob = v1.placeholder_with_default(1.0, [], name="dropout_keep_prob")
    with tf.name_scope("embedding"):
        if lookup is None:
            embedded = v1.placeholder(tf.float32, [None, None, spec.embedding_dim], name="lookup")
        else:
            embedded = tf.identity(lookup(input_x), name="lookup")
    lengths = tf.reduce_sum(
        tf.cast(tf.not_equal(input_x, PAD_ID), tf.int32), axis=1, name="lengths"
    )
    widest = max(spec.filter_widths)
    effective = tf.maximum(lengths, widest)
    time_steps = tf.shape(input_x)[1]
    init = v1.glorot_uniform_initializer(seed=seed)
    pooled = []
    for width in spec.filter_widths:
        with v1.variable_scope(f"conv-maxpool-{width}"):
            kernel = v1.get_variable(
                "W", [width, spec.embedding_dim, spec.num_filters], initializer=init
            )
            bias = v1.get_variable(
                "b", [spec.num_filters], initializer=v1.constant_initializer(0.1)
            )
            conv = tf.nn.conv1d(embedded, kernel, stride=1, padding="VALID")
            h = tf.nn.relu(tf.nn.bias_add(conv, bias))
            # Windows fully inside the effective length; ReLU output is >= 0, so zeroing the
            # others never changes the max.
            valid = tf.sequence_mask(
                effective - width + 1, time_steps - width + 1, dtype=tf.float32
            )
            pooled.append(tf.reduce_max(h * valid[:, :, None], axis=1))
    features = tf.concat(pooled, axis=1, name="features")
    dropped = tf.nn.dropout(features, rate=1.0 - keep_prob, seed=seed)
    with v1.variable_scope("output"):
        w_out = v1.get_variable(
            "W", [spec.num_filters * len(spec.filter_widths), spec.num_classes], initializer=init
        )
        b_out = v1.get_variable("b", [spec.num_classes], initializer=v1.constant_initializer(0.1))
        logits = tf.nn.bias_add(tf.matmul(dropped, w_out), b_out, name="logits")
        probs = tf.nn.softmax(logits, name="probs")
        predictions = tf.argmax(logits, axis=1, output_type=tf.int32, name="predictions")
    return CnnGraph(input_x, keep_prob, embedded, lengths, logits, probs, predictions)
