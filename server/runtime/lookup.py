"""The embedding lookup inside each model's session, reading the shared matrix without a copy.

Every session gets the same small subgraph in front of its network: a placeholder for the
shared matrix (float32, float16 or int8), one for int8's per-row scales, and ``GatherV2`` +
cast (+ scale) producing the float32 ``[batch, length, dim]`` rows the network was built for.
Each ``session.run`` feeds the store's memory-mapped matrix itself. TensorFlow wraps a fed
C-contiguous, 64-byte-aligned numpy array as a tensor without copying it (measured: feeding the
252 MiB seed matrix + gathering 64 x 50 rows takes ~0.8 ms), so:

* no session holds a copy of the matrix, and nothing outside TensorFlow does either;
* the gather runs in TensorFlow's C++ thread pool, not in numpy while holding the GIL, and
  its output lives in TensorFlow's pooled allocator instead of a per-thread scratch buffer
  (measured with ten seed-scale models: docs/memory/README.md).

The matrix is only ever read: ``GatherV2`` never forwards its input buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from server.artifact import EmbeddingDtype
from server.embeddings import ALIGNMENT, SharedEmbedding

Tensor = Any  # tf.Tensor

SCOPE = "textserve_lookup"
"""Name scope of the added nodes (no textserve or imported graph uses it)."""


@dataclass(frozen=True)
class Lookup:
    """The lookup's output and what each run feeds (placeholder → the store's array)."""

    rows: Tensor
    feeds: tuple[tuple[Tensor, np.ndarray[Any, Any]], ...]


def _tf_dtype(dtype: EmbeddingDtype) -> Any:
    import tensorflow as tf

    return {
        EmbeddingDtype.FLOAT32: tf.float32,
        EmbeddingDtype.FLOAT16: tf.float16,
        EmbeddingDtype.INT8: tf.int8,
    }[dtype]


def add_lookup(embedding: SharedEmbedding, ids: Tensor) -> Lookup:
    """In the current default graph: float32 rows ``[*ids.shape, dim]`` of ``embedding``."""
    import tensorflow as tf

    v1 = tf.compat.v1
    for array in (embedding.matrix, embedding.scales):
        if array is not None and array.ctypes.data % ALIGNMENT:
            raise AssertionError(f"{embedding!r} is not {ALIGNMENT}-byte aligned")
    with tf.name_scope(SCOPE):
        matrix = v1.placeholder(_tf_dtype(embedding.dtype), [None, embedding.dim], name="matrix")
        feeds: list[tuple[Tensor, np.ndarray[Any, Any]]] = [(matrix, embedding.matrix)]
        rows = tf.gather(matrix, ids, axis=0, name="gather")
        if embedding.dtype is not EmbeddingDtype.FLOAT32:
            rows = tf.cast(rows, tf.float32, name="cast")
        if embedding.scales is not None:
            scales = v1.placeholder(tf.float32, [None], name="scales")
            feeds.append((scales, embedding.scales))
            row_scales = tf.gather(scales, ids, axis=0, name="gather_scales")
            rows = tf.multiply(rows, tf.expand_dims(row_scales, -1), name="dequantize")
    return Lookup(rows=rows, feeds=tuple(feeds))
