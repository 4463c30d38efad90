"""Format ``stripped``: trainable variables only (``model.ckpt.*``), graph rebuilt from model.json.

The graph is :func:`server.graph.build_cnn` with :func:`server.runtime.lookup.add_lookup` as
its lookup (the shared matrix is fed, never copied), so it has no embedding variable at all;
the checkpoint's variables are restored with ``tf.compat.v1.train.Saver(var_list=...)``.
Checkpoint names and shapes are checked first, so a missing variable or a wrong architecture
gives a one-line ArtifactError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.artifact import ModelManifest
from server.embeddings import EmbeddingStore, SharedEmbedding
from server.errors import ArtifactError
from server.runtime.lookup import Lookup, add_lookup
from server.runtime.session_runtime import SessionRuntime, new_session, released_on_error
from server.text import Tokenizer

CHECKPOINT_PREFIX = "model.ckpt"
"""``<version>/model.ckpt.index`` + ``model.ckpt.data-*``."""


_TF_BOILERPLATE = ("Graph execution error", "Detected at node", "File ", "Node:", "[[")
"""Lines of a TensorFlow OpError message that say where, not what (skipped in reasons)."""


def _first_line(message: str) -> str:
    """The first line of ``message`` that says what went wrong (e.g. "Read less bytes than
    requested" rather than TensorFlow's "Graph execution error:" header)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TF_BOILERPLATE)]
    return (useful or lines or [message])[0]


def load_stripped(
    version_dir: Path,
    manifest: ModelManifest,
    *,
    tokenizer: Tokenizer,
    store: EmbeddingStore,
    embedding: SharedEmbedding,
    intra_op_threads: int,
    inter_op_threads: int,
) -> SessionRuntime:
    """Build the runtime; takes ownership of one store reference to ``embedding``."""
    import tensorflow as tf

    from server.graph import build_cnn

    with released_on_error(store, embedding):
        spec = manifest.architecture
        if spec is None:
            raise ArtifactError(
                f"{version_dir}: a stripped model needs 'architecture' in model.json"
            )
        if spec.embedding_dim != embedding.dim:
            raise ArtifactError(
                f"{version_dir}: architecture.embedding_dim {spec.embedding_dim} != embedding "
                f"{embedding.name!r} dim {embedding.dim}"
            )
        prefix = Path(version_dir) / CHECKPOINT_PREFIX
        if not prefix.with_name(prefix.name + ".index").is_file():
            raise ArtifactError(f"{prefix}.index: checkpoint not found")
        try:
            stored = dict(tf.train.list_variables(str(prefix)))
        except (tf.errors.OpError, ValueError) as exc:
            raise ArtifactError(
                f"{prefix}: unreadable checkpoint: {_first_line(str(exc))}"
            ) from exc

        graph = tf.Graph()
        lookups: list[Lookup] = []

        def lookup(ids: Any) -> Any:
            lookups.append(add_lookup(embedding, ids))
            return lookups[-1].rows

        with graph.as_default():
            net = build_cnn(spec, lookup=lookup)
            variables = {v.op.name: v for v in tf.compat.v1.trainable_variables()}
            for name, var in variables.items():
                if name not in stored:
                    raise ArtifactError(f"{prefix}: variable {name!r} missing from the checkpoint")
                if list(stored[name]) != var.shape.as_list():
                    raise ArtifactError(
                        f"{prefix}: variable {name!r} has shape {stored[name]} in the checkpoint, "
                        f"the architecture in model.json needs {var.shape.as_list()}"
                    )
            saver = tf.compat.v1.train.Saver(var_list=variables, allow_empty=False)
        own_bytes = sum(v.shape.num_elements() * v.dtype.size for v in variables.values())
        session = new_session(graph, intra_op_threads, inter_op_threads)
        try:
            with graph.as_default():  # Saver.restore must not see eager mode
                saver.restore(session, str(prefix))
        except (tf.errors.OpError, ValueError) as exc:
            session.close()
            raise ArtifactError(
                f"{prefix}: cannot restore checkpoint: {_first_line(str(exc))}"
            ) from exc
        except BaseException:
            session.close()
            raise
    graph.finalize()
    dropout = manifest.tensors.dropout
    return SessionRuntime(
        manifest=manifest,
        tokenizer=tokenizer,
        graph=graph,
        session=session,
        store=store,
        embedding=embedding,
        own_bytes=own_bytes,
        input_ids=net.input_x.name,
        lookup=lookups[0],
        output=net.probs.name,
        dropout=net.dropout_keep_prob.name if dropout is not None else None,
        apply_softmax=False,
    )
