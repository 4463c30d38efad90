"""Formats ``frozen``, ``frozen-selfcontained`` and ``imported``: a frozen GraphDef (``model.pb``).

``frozen``: the graph was exported with ``embedding/lookup`` as a placeholder; rows come from the
shared embedding artifact.

``frozen-selfcontained`` (the seed's way): the embedding is a constant inside the graph. It is
cut out at load (:mod:`server.graph_surgery`) and registered in the store by content hash; when
the same bytes are already loaded (the demo embedding, another version of the model) the
graph's copy is dropped. When the registry passes an embedding directory (the model's
embedding, or an override such as an int8 copy) that artifact is used instead of the cut
matrix, after checking the cut matrix is the one the artifact was made from.

``imported`` (``textserve import-graph``): a frozen GraphDef made elsewhere, loaded like a
self-contained one. Such graphs (e.g. the widely copied TF1 TextCNN) differ from textserve's own
in ways model.json records, and the runtime honours:

* ``tensors.input_ids`` / ``tensors.output`` / ``tensors.dropout``: their own names; the dropout
  placeholder usually has no default, so 1.0 is fed.
* ``tokenizer.fixed_len``: the input placeholder has a fixed length; every batch is padded or
  truncated to it.
* ``apply_softmax``: the graph outputs logits (``output/scores``); softmax is applied in numpy.
* ``tensors.embedded``: the lookup to cut (None: the single Gather of a 2-D float32 constant).

Either way the session never sees a large constant, so its first run is as fast as any other
(importing the seed's graph naively costs ~13-18 s and +1.5 GiB on the first run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.artifact import EmbeddingManifest, ModelManifest
from server.embeddings import EmbeddingStore, SharedEmbedding, array_sha256
from server.errors import ArtifactError
from server.graph_surgery import (
    constant_bytes,
    cut_embedding,
    node_name,
    nodes_by_name,
    read_graph_def,
    require_nodes,
    tensor_name,
)
from server.runtime.lookup import SCOPE as LOOKUP_SCOPE
from server.runtime.lookup import Lookup, add_lookup
from server.runtime.session_runtime import SessionRuntime, new_session, released_on_error
from server.text import Tokenizer

MODEL_PB = "model.pb"


def graph_of(
    graph_def: Any, where: Path, input_map: Callable[[], dict[str, Any]] | None = None
) -> Any:
    """A finalized ``tf.Graph`` of ``graph_def``; one TensorFlow refuses is an ArtifactError.

    ``input_map`` (called inside the new graph, before the import) may add nodes and returns
    ``import_graph_def``'s input map: graph tensor name → the added tensor replacing it.
    """
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            mapping = input_map() if input_map is not None else None
            tf.compat.v1.import_graph_def(graph_def, input_map=mapping, name="")
    except (ValueError, tf.errors.OpError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{where}: cannot import the graph: {message}") from exc
    graph.finalize()
    return graph


def _has_node(graph_def: Any, name: str | None) -> bool:
    return name is not None and any(n.name == node_name(name) for n in graph_def.node)


def _placeholder_type(node: Any) -> tuple[Any, Any]:
    """``node``'s dtype and (possibly unknown) shape, from its attributes."""
    import tensorflow as tf

    shape = tf.TensorShape(node.attr["shape"].shape) if "shape" in node.attr else None
    return tf.as_dtype(node.attr["dtype"].type), shape


def _placeholder_like(node: Any, where: Path) -> Any:
    """A new int placeholder with ``node``'s dtype and shape (the model's ids input)."""
    import tensorflow as tf

    dtype, shape = _placeholder_type(node)
    if node.op != "Placeholder" or dtype not in (tf.int32, tf.int64):
        raise ArtifactError(
            f"{where}: input {node.name!r} must be an int32/int64 Placeholder, got {node.op} "
            f"{dtype.name}"
        )
    return tf.compat.v1.placeholder(dtype, shape, name="input_ids")


def _check_embedded(node: Any, embedding: SharedEmbedding, where: Path) -> None:
    """The node the lookup replaces: a float32 placeholder of the embedding's width."""
    import tensorflow as tf

    dtype, shape = _placeholder_type(node)
    if node.op != "Placeholder" or dtype != tf.float32:
        raise ArtifactError(
            f"{where}: {node.name} must be a float32 placeholder the runtime feeds, got "
            f"{node.op} {dtype.name}"
        )
    dim = shape[-1] if shape is not None and shape.rank else None
    if dim is not None and dim != embedding.dim:
        raise ArtifactError(
            f"{where}: graph expects {dim}-dim embeddings, embedding {embedding.name!r} has "
            f"{embedding.dim}"
        )


def graph_with_lookup(
    graph_def: Any, *, input_ids: str, embedded: str, embedding: SharedEmbedding, where: Path
) -> tuple[Any, str, Lookup]:
    """A finalized ``tf.Graph`` of ``graph_def`` whose ``embedded`` placeholder is replaced by
    :func:`~server.runtime.lookup.add_lookup` on a fresh ids placeholder, which also replaces
    ``input_ids`` everywhere (so lengths and masks read the same ids). Returns the graph, the
    new ids tensor's name and the lookup."""
    import tensorflow as tf

    require_nodes(graph_def, [input_ids, embedded], str(where))
    nodes = nodes_by_name(graph_def)
    _check_embedded(nodes[node_name(embedded)], embedding, where)
    added: list[tuple[Any, Lookup]] = []

    def lookup_in_front() -> dict[str, Any]:
        with tf.name_scope(LOOKUP_SCOPE):
            ids = _placeholder_like(nodes[node_name(input_ids)], where)
            added.append((ids, add_lookup(embedding, ids)))
        return {tensor_name(input_ids): ids, tensor_name(embedded): added[0][1].rows}

    graph = graph_of(graph_def, where, lookup_in_front)
    ids, lookup = added[0]
    return graph, ids.name, lookup


def build_graph_runtime(
    graph_def: Any,
    manifest: ModelManifest,
    *,
    where: Path,
    tokenizer: Tokenizer,
    store: EmbeddingStore,
    embedding: SharedEmbedding,
    embedded: str,
    intra_op_threads: int,
    inter_op_threads: int,
) -> SessionRuntime:
    """Session runtime over an embedding-external ``graph_def``; owns ``embedding``'s reference."""
    with released_on_error(store, embedding):
        tensors = manifest.tensors
        own = constant_bytes(graph_def)
        dropout = tensors.dropout if _has_node(graph_def, tensors.dropout) else None
        graph, ids, lookup = graph_with_lookup(
            graph_def,
            input_ids=tensors.input_ids,
            embedded=embedded,
            embedding=embedding,
            where=where,
        )
        session = new_session(graph, intra_op_threads, inter_op_threads)
    return SessionRuntime(
        manifest=manifest,
        tokenizer=tokenizer,
        graph=graph,
        session=session,
        store=store,
        embedding=embedding,
        own_bytes=own,
        input_ids=ids,
        lookup=lookup,
        output=tensor_name(tensors.output),
        dropout=None if dropout is None else tensor_name(dropout),
        apply_softmax=manifest.apply_softmax,
    )


def load_frozen(
    version_dir: Path,
    manifest: ModelManifest,
    *,
    tokenizer: Tokenizer,
    store: EmbeddingStore,
    embedding: SharedEmbedding,
    intra_op_threads: int,
    inter_op_threads: int,
) -> SessionRuntime:
    """Format ``frozen``: the graph feeds on ``tensors.embedded``; takes ``embedding``'s ref."""
    path = Path(version_dir) / MODEL_PB
    with released_on_error(store, embedding):
        embedded = manifest.tensors.embedded
        if embedded is None:
            raise ArtifactError(f"{version_dir}/model.json: tensors.embedded is required")
        graph_def = read_graph_def(path)
        require_nodes(
            graph_def, [manifest.tensors.input_ids, embedded, manifest.tensors.output], str(path)
        )
    return build_graph_runtime(
        graph_def,
        manifest,
        where=path,
        tokenizer=tokenizer,
        store=store,
        embedding=embedding,
        embedded=embedded,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )


def load_selfcontained(
    version_dir: Path,
    manifest: ModelManifest,
    *,
    tokenizer: Tokenizer,
    store: EmbeddingStore,
    embedding_dir: Path | None,
    embedding_manifest: EmbeddingManifest | None,
    intra_op_threads: int,
    inter_op_threads: int,
) -> SessionRuntime:
    """Formats ``frozen-selfcontained`` and ``imported``: cut the embedding, share it.

    The lookup cut is ``tensors.embedded`` when the graph has it, else the graph's single
    Gather of a 2-D float32 constant.
    """
    path = Path(version_dir) / MODEL_PB
    tensors = manifest.tensors
    graph_def = read_graph_def(path)
    embedded = tensors.embedded
    if embedded is not None and not _has_node(graph_def, embedded):
        # The graph's lookup has another name (e.g. "embedding_1/lookup" when the exporter
        # opened the "embedding" scope twice): the single Gather of a matrix is found instead.
        embedded = None
    keep = [tensors.input_ids, tensors.output]
    require_nodes(graph_def, keep, str(path))
    if _has_node(graph_def, tensors.dropout):
        assert tensors.dropout is not None
        keep.append(tensors.dropout)
    try:
        cut = cut_embedding(graph_def, keep, embedded)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc.message}") from exc
    del graph_def
    matrix = cut.matrix
    embedding: SharedEmbedding
    if embedding_dir is not None:
        assert embedding_manifest is not None
        cut_sha = array_sha256(matrix)
        if cut_sha not in (embedding_manifest.sha256, embedding_manifest.source_sha256):
            raise ArtifactError(
                f"{path}: the graph's embedding (sha256 {cut_sha[:12]}…) is not the one "
                f"embedding {embedding_manifest.name!r} was made from"
            )
        del matrix, cut_sha
        embedding = store.acquire(embedding_dir)
    else:
        embedding = store.register_array(matrix, name=f"{manifest.name}/{cut.site.const}")
        del matrix
    graph_def, placeholder = cut.graph_def, cut.placeholder
    del cut
    return build_graph_runtime(
        graph_def,
        manifest,
        where=path,
        tokenizer=tokenizer,
        store=store,
        embedding=embedding,
        embedded=placeholder,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
