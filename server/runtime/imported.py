"""Format ``imported``: a frozen GraphDef made elsewhere (``textserve import-graph``).

Such graphs (e.g. the widely copied TF1 TextCNN) differ from textserve's own in ways model.json
records, and this runtime honours:

* ``tensors.input_ids`` / ``tensors.output`` / ``tensors.dropout``: their own names; the dropout
  placeholder usually has no default, so 1.0 is fed.
* ``tokenizer.fixed_len``: the input placeholder has a fixed length; every batch is padded or
  truncated to it.
* ``apply_softmax``: the graph outputs logits (``output/scores``); softmax is applied in numpy.
* ``tensors.embedded``: the lookup to cut (None: the single Gather of a 2-D float32 constant).
  The embedding is cut out and shared by content hash like any self-contained graph.
"""

from __future__ import annotations

from pathlib import Path

from server.artifact import EmbeddingManifest, ModelManifest
from server.embeddings import EmbeddingStore
from server.runtime.frozen import load_selfcontained
from server.runtime.session_runtime import SessionRuntime
from server.text import Tokenizer


def load_imported(
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
    return load_selfcontained(
        version_dir,
        manifest,
        tokenizer=tokenizer,
        store=store,
        embedding_dir=embedding_dir,
        embedding_manifest=embedding_manifest,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
