"""The session-backed runtime every format ends up as: one tf.Graph + one Session per version.

The loaders put :mod:`server.runtime.lookup`'s gather where the embedding lookup was
(``embedding/lookup`` for textserve graphs), so ``predict`` feeds the ids, the shared matrix
itself (no copy: see that module) and 1.0 for dropout, and runs a callable made once at load
(``Session.make_callable``): the per-batch cost is one ``session.run``. TensorFlow releases the
GIL while it runs, so predicts for different models proceed in parallel on worker threads.

Load runs the graph on a one-row batch (the output width is checked against the labels) and on
one representative batch: graph optimisation and first-use costs happen then, not on the first
request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from server.artifact import PAD_ID, ModelManifest
from server.embeddings import EmbeddingStore, SharedEmbedding
from server.errors import ArtifactError, BadRequest, ModelNotReady
from server.runtime.base import ProbArray, Runtime
from server.runtime.lookup import Lookup
from server.text import IdArray, Tokenizer

WARMUP_SHAPE = (64, 64)
"""A representative batch (texts, tokens) run once at load."""

Session = Any  # tf.compat.v1.Session
Graph = Any  # tf.Graph


def new_session(graph: Graph, intra_op_threads: int, inter_op_threads: int) -> Session:
    """A TF1 session on ``graph`` with its own thread counts (0 = TensorFlow's default)."""
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
        allow_soft_placement=True,
    )
    return tf.compat.v1.Session(graph=graph, config=config)


@contextmanager
def released_on_error(store: EmbeddingStore, embedding: SharedEmbedding) -> Iterator[None]:
    """Give ``embedding``'s store reference back if the block raises.

    For a loader that holds the reference until it hands it to a :class:`SessionRuntime`.
    """
    try:
        yield
    except BaseException:
        store.release(embedding)
        raise


def fit_length(ids: IdArray, *, fixed: int | None, minimum: int) -> IdArray:
    """Pad (with PAD_ID) or truncate ``ids`` to ``fixed`` columns, else pad up to ``minimum``."""
    width = ids.shape[1]
    target = fixed if fixed is not None else max(width, minimum)
    if width == target:
        return ids
    out = np.full((ids.shape[0], target), PAD_ID, dtype=np.int32)
    n = min(width, target)
    out[:, :n] = ids[:, :n]
    return out


def softmax(logits: ProbArray) -> ProbArray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted: ProbArray = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


class SessionRuntime(Runtime):
    """A loaded model version: a session whose embedding rows come from the store."""

    def __init__(
        self,
        *,
        manifest: ModelManifest,
        tokenizer: Tokenizer,
        graph: Graph,
        session: Session,
        store: EmbeddingStore,
        embedding: SharedEmbedding,
        own_bytes: int,
        input_ids: str,
        lookup: Lookup,
        output: str,
        dropout: str | None,
        apply_softmax: bool,
    ) -> None:
        """Takes ownership of ``session`` and of one store reference to ``embedding``.

        On any error here both are released before the error propagates.
        """
        self.manifest = manifest
        self.tokenizer = tokenizer
        self._graph = graph
        self._session = session
        self._store = store
        self._embedding: SharedEmbedding | None = embedding
        self._own_bytes = own_bytes
        self._apply_softmax = apply_softmax
        self._fixed_len = tokenizer.spec.fixed_len
        self._min_len = tokenizer.spec.min_len
        self._close_lock = threading.Lock()
        self._closed = False
        try:
            self._check_vocabulary()
            fetch = self._tensor(output)
            feeds = [self._tensor(input_ids), *(tensor for tensor, _ in lookup.feeds)]
            extra: tuple[Any, ...] = tuple(array for _, array in lookup.feeds)
            if dropout is not None:
                feeds.append(self._tensor(dropout))
                extra += (np.array(1.0, dtype=np.float32),)  # keep_prob: no dropout
            self._extra = extra
            """What every run feeds after the ids: the shared matrix (+ scales), keep_prob."""
            self._run = session.make_callable(fetch, feeds)
            self._warm_up()
        except BaseException:
            self.close()
            raise

    # -- load-time checks ---------------------------------------------------------------------

    def _tensor(self, name: str) -> Any:
        try:
            return self._graph.get_tensor_by_name(name)
        except (KeyError, ValueError) as exc:
            raise ArtifactError(
                f"{self.manifest.name} v{self.manifest.version}: the graph has no tensor {name!r}"
            ) from exc

    def _check_vocabulary(self) -> None:
        assert self._embedding is not None
        if len(self.tokenizer.vocab) > self._embedding.rows:
            raise ArtifactError(
                f"{self.manifest.name} v{self.manifest.version}: vocabulary has "
                f"{len(self.tokenizer.vocab)} tokens but embedding {self._embedding.name!r} "
                f"has {self._embedding.rows} rows"
            )

    def _warm_up(self) -> None:
        """Check the output width, then pay TensorFlow's first-call costs now, not on a request.

        The first batch of a session optimises the graph and creates its kernels; the first
        full-size batch of a process also JIT-compiles oneDNN kernels and grows the allocator
        (~40-90 ms here, 3-5x a steady batch). One batch of :data:`WARMUP_SHAPE` absorbs both.
        """
        width = self._fixed_len or self._min_len
        probs = self.predict(np.zeros((1, width), dtype=np.int32))
        if probs.shape != (1, len(self.labels)):
            raise ArtifactError(
                f"{self.manifest.name} v{self.manifest.version}: the graph outputs "
                f"{probs.shape[1:]} values per text but model.json has {len(self.labels)} labels"
            )
        self.predict(np.zeros(WARMUP_SHAPE, np.int32))  # predict fits it to fixed_len/min_len

    # -- Runtime ------------------------------------------------------------------------------

    def predict(self, ids: IdArray) -> ProbArray:
        embedding = self._embedding
        if embedding is None:
            raise ModelNotReady(f"{self.manifest.name} v{self.manifest.version} is unloaded")
        batch = np.asarray(ids)
        if batch.ndim != 2:
            raise BadRequest(f"token ids must be [batch, length], got shape {batch.shape}")
        if not np.issubdtype(batch.dtype, np.integer):
            raise BadRequest(f"token ids must be integers, got {batch.dtype}")
        batch = np.ascontiguousarray(batch, dtype=np.int32)
        batch = fit_length(batch, fixed=self._fixed_len, minimum=self._min_len)
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        embedding.check_ids(batch)
        try:
            out = self._run(batch, *self._extra)
        except RuntimeError as exc:  # the session was closed under us
            if self._closed:
                raise ModelNotReady(
                    f"{self.manifest.name} v{self.manifest.version} is unloaded"
                ) from exc
            raise
        result = np.asarray(out, dtype=np.float32)
        if self._apply_softmax:
            result = softmax(result.copy() if not result.flags.writeable else result)
        return result

    @property
    def own_bytes(self) -> int:
        return self._own_bytes

    @property
    def embedding(self) -> SharedEmbedding | None:
        """The shared embedding this runtime reads (None once closed)."""
        return self._embedding

    @property
    def embedding_key(self) -> str | None:
        return None if self._embedding is None else self._embedding.sha256

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            embedding, self._embedding = self._embedding, None
            try:
                self._session.close()
            finally:
                if embedding is not None:
                    self._store.release(embedding)
