"""``textserve import-graph``: add a frozen GraphDef made elsewhere to a model repository.

For graphs written by other people's TF1 code, like the widely copied TextCNN
(``input_x`` [None, 56] int32, ``dropout_keep_prob`` without a default, ``embedding/W`` frozen
inside, ``output/scores`` logits). The command inspects the graph, writes
``REPO/<name>/<version>/`` (``model.pb``, ``vocab.txt``, ``labels.txt``, ``model.json`` with
format ``imported``) and adds or updates the model in ``models.yaml``. At load the server cuts
the embedding out and shares it like any self-contained graph.

Detected (each can be overridden):

* ``--fixed-len``: from ``input_x``'s static shape; batches are padded/truncated to it.
* ``--softmax/--no-softmax``: softmax is applied in numpy unless the output op is a Softmax.
* ``--dropout``: ``dropout_keep_prob`` if the graph has it; 1.0 is fed at serving time.
* ``--embedding-node``: the one Gather/GatherV2 reading a 2-D float32 constant.

Vocabulary (``--vocab``, one token per line, line i = the graph's id i):

* If it starts with ``<pad>`` and ``<unk>`` (textserve's convention) it is used as is.
* Otherwise (e.g. a TF1 ``VocabularyProcessor`` dump, whose id 0 serves both for padding and
  for unknown words) textserve's tokenizer still needs ids 0 = ``<pad>`` and 1 = ``<unk>``, so
  the vocabulary is written as ``<pad>``, ``<unk>`` followed by the file's lines (line i gets
  id i + 2), and the graph's embedding gets two rows prepended to match: a copy of row
  ``--pad-id`` (default 0) and a copy of row ``--unk-id`` (default 0). The stored
  ``model.pb`` therefore differs from the input in that one constant; its answers for any
  text are exactly the original graph's answers for the same text encoded the original way.

Validation errors (missing nodes, labels count != output size, vocabulary larger than the
embedding, corrupt graph) are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from server import __version__
from server.artifact import (
    MODELS_YAML,
    OOV_TOKEN,
    PAD_TOKEN,
    VOCAB_TXT,
    ModelConfig,
    ModelFormat,
    ModelManifest,
    RepositoryConfig,
    TensorNames,
    TokenizerSpec,
    dir_files,
    list_versions,
    load_repository_config,
    write_model_manifest,
    write_repository_config,
)
from server.errors import ArtifactError, UsageError
from server.graph_surgery import (
    EmbeddingSite,
    cut_embedding,
    find_embedding,
    input_length,
    matrix_of,
    node_name,
    nodes_by_name,
    read_graph_def,
    tensor_name,
)

MODEL_PB = "model.pb"
LABELS_TXT = "labels.txt"
DEFAULT_INPUT = "input_x"
DEFAULT_OUTPUT = "output/scores"
DEFAULT_DROPOUT = "dropout_keep_prob"
_ID_DTYPES = {3, 9}  # DT_INT32, DT_INT64
_FLOAT = 1  # DT_FLOAT


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=None, help="model repository (models.yaml)")
    parser.add_argument("--name", required=True, help="model name in models.yaml")
    parser.add_argument("--graph", type=Path, required=True, help="frozen binary GraphDef (.pb)")
    parser.add_argument(
        "--vocab",
        type=Path,
        required=True,
        help="one token per line, line i = the graph's id i (see the module docs for the "
        "<pad>/<unk> header)",
    )
    parser.add_argument(
        "--labels", required=True, help="labels file (one per line) or a comma-separated list"
    )
    parser.add_argument("--input", default=DEFAULT_INPUT, help="ids placeholder [batch, length]")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="logits or probabilities")
    parser.add_argument(
        "--dropout",
        default=None,
        help=f"keep-probability placeholder (default: {DEFAULT_DROPOUT} if present)",
    )
    parser.add_argument(
        "--embedding-node", default=None, help="the embedding lookup to cut (default: detected)"
    )
    parser.add_argument(
        "--fixed-len", type=int, default=None, help="pad/truncate every text to N ids"
    )
    parser.add_argument(
        "--softmax",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply softmax to the output (default: unless the output op is Softmax)",
    )
    parser.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lower-case texts before looking tokens up (default: yes)",
    )
    parser.add_argument(
        "--min-len",
        type=int,
        default=3,
        help="variable-length graphs: pad every batch to at least N ids (the widest filter)",
    )
    parser.add_argument("--pad-id", type=int, default=0, help="headerless vocab: padding row")
    parser.add_argument("--unk-id", type=int, default=0, help="headerless vocab: unknown-word row")
    parser.add_argument("--version", type=int, default=None, help="version number (default: next)")


@dataclass
class _Plan:
    input: str
    output: str
    dropout: str | None
    site: EmbeddingSite
    fixed_len: int | None
    apply_softmax: bool
    tokens: list[str]
    headerless: bool


def _labels(spec: str) -> tuple[str, ...]:
    path = Path(spec)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        labels = [line.strip() for line in lines if line.strip()]
    else:
        labels = [part.strip() for part in spec.split(",") if part.strip()]
    if len(labels) < 2:
        raise UsageError(f"--labels: need at least two labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise UsageError("--labels: labels must be unique")
    return tuple(labels)


def _vocab_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: vocabulary file not found") from exc
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: vocabulary is not UTF-8") from exc
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ArtifactError(f"{path}: vocabulary is empty")
    return lines


def _node(nodes: dict[str, Any], option: str, name: str, graph: Path) -> Any:
    node = nodes.get(node_name(name))
    if node is None:
        raise ArtifactError(f"{graph}: {option} node {node_name(name)!r} not found in the graph")
    return node


def _output_width(graph_def: Any, plan: _Plan, length: int, where: Path) -> int:
    """Run the cut graph once on zeros: the output must be [batch, classes].

    The cut is made on an in-memory copy (cut_embedding consumes its input); ``graph_def`` is
    left as it was.
    """
    import tensorflow as tf

    from server.runtime.frozen import graph_of

    keep = [plan.input, plan.output] + ([plan.dropout] if plan.dropout else [])
    scratch = type(graph_def)()
    scratch.CopyFrom(graph_def)
    cut = cut_embedding(scratch, keep, plan.site.cut)
    del scratch
    graph = graph_of(cut.graph_def, where)
    feeds: dict[str, Any] = {
        tensor_name(plan.input): np.zeros((2, length), np.int32),
        cut.placeholder: np.zeros((2, length, plan.site.dim), np.float32),
    }
    if plan.dropout:
        feeds[tensor_name(plan.dropout)] = 1.0
    try:
        with tf.compat.v1.Session(graph=graph) as session:
            out = np.asarray(session.run(tensor_name(plan.output), feeds))
    except (tf.errors.OpError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"the graph does not run with its embedding cut out: {first}") from exc
    if out.ndim != 2 or out.shape[0] != 2:
        raise ArtifactError(
            f"--output {plan.output!r} has shape {list(out.shape[1:])} per batch; "
            "expected [batch, classes]"
        )
    return int(out.shape[1])


def _plan(args: argparse.Namespace, graph_def: Any, graph_path: Path) -> _Plan:
    nodes = nodes_by_name(graph_def)
    input_node = _node(nodes, "--input", args.input, graph_path)
    if input_node.op != "Placeholder" or input_node.attr["dtype"].type not in _ID_DTYPES:
        raise ArtifactError(f"{graph_path}: --input {input_node.name!r} must be an int placeholder")
    output_node = _node(nodes, "--output", args.output, graph_path)
    dropout_node = (
        _node(nodes, "--dropout", args.dropout, graph_path)
        if args.dropout is not None
        else nodes.get(DEFAULT_DROPOUT)
    )
    dropout: str | None = None
    if dropout_node is not None:
        dropout = dropout_node.name
        if (
            dropout_node.op not in ("Placeholder", "PlaceholderWithDefault")
            or dropout_node.attr["dtype"].type != _FLOAT
        ):
            raise ArtifactError(f"{graph_path}: dropout {dropout!r} must be a float32 placeholder")
    try:
        site = find_embedding(graph_def, args.embedding_node)
    except ArtifactError as exc:
        hint = "" if args.embedding_node else " (pass --embedding-node)"
        raise ArtifactError(f"{graph_path}: {exc.message}{hint}") from exc

    detected = input_length(graph_def, input_node.name)
    if args.fixed_len is not None:
        if args.fixed_len < 1:
            raise UsageError("--fixed-len must be positive")
        if detected is not None and detected != args.fixed_len:
            raise ArtifactError(
                f"--fixed-len {args.fixed_len}, but {input_node.name!r} has a fixed length of "
                f"{detected}"
            )
    fixed_len = args.fixed_len if args.fixed_len is not None else detected
    apply_softmax = output_node.op != "Softmax" if args.softmax is None else bool(args.softmax)

    lines = _vocab_lines(args.vocab)
    headerless = lines[:2] != [PAD_TOKEN, OOV_TOKEN]
    if len(lines) > site.rows:
        raise ArtifactError(
            f"{args.vocab}: {len(lines)} tokens but the graph's embedding has {site.rows} rows"
        )
    for option, row in (("--pad-id", args.pad_id), ("--unk-id", args.unk_id)):
        if headerless and not 0 <= row < site.rows:
            raise UsageError(f"{option} {row} outside the embedding's {site.rows} rows")
    tokens = [PAD_TOKEN, OOV_TOKEN, *lines] if headerless else lines
    return _Plan(
        input=input_node.name,
        output=output_node.name,
        dropout=dropout,
        site=site,
        fixed_len=fixed_len,
        apply_softmax=apply_softmax,
        tokens=tokens,
        headerless=headerless,
    )


def _prepend_rows(graph_def: Any, site: EmbeddingSite, pad_id: int, unk_id: int) -> None:
    """Embedding rows [pad, unk, *rows] so that id i + 2 reads the graph's row i."""
    import tensorflow as tf

    const = nodes_by_name(graph_def)[site.const]
    matrix = matrix_of(const)
    extended = np.concatenate([matrix[[pad_id, unk_id]], matrix], axis=0)
    const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(extended))


def _next_version(model_dir: Path, requested: int | None) -> int:
    existing = list_versions(model_dir)
    if requested is None:
        return max(existing, default=0) + 1
    if requested < 1:
        raise UsageError("--version must be >= 1")
    if requested in existing:
        raise ArtifactError(f"{model_dir / str(requested)} already exists")
    return requested


def _update_config(repo: Path, name: str) -> None:
    config = load_repository_config(repo) if (repo / MODELS_YAML).is_file() else RepositoryConfig()
    current = config.model(name)
    entry = (
        ModelConfig(name=name, base_path=name, format=ModelFormat.IMPORTED)
        if current is None
        else current.model_copy(update={"base_path": name, "format": ModelFormat.IMPORTED})
    )
    models = [entry if m.name == name else m for m in config.models]
    if current is None:
        models.append(entry)
    write_repository_config(repo, config.model_copy(update={"models": tuple(models)}))


def _verify(version_dir: Path, num_labels: int) -> None:
    """Load the written version exactly as the server will, and run it once."""
    from server.embeddings import EmbeddingStore
    from server.runtime.loader import load_runtime

    runtime = load_runtime(
        version_dir,
        store=EmbeddingStore(),
        embedding_dir=None,
        intra_op_threads=1,
        inter_op_threads=1,
    )
    try:
        probs = runtime.predict(runtime.tokenizer.encode_batch(["a test sentence"]))
        if probs.shape != (1, num_labels) or not np.isfinite(probs).all():
            raise ArtifactError(f"{version_dir}: the imported model answers {probs!r}")
    finally:
        runtime.close()


def run(args: argparse.Namespace) -> int:
    from server.settings import Settings

    repo: Path = args.repo if args.repo is not None else Settings().repo
    try:
        ModelConfig(name=args.name, base_path=args.name)
    except ValidationError as exc:
        raise UsageError(f"--name {args.name!r}: letters, digits, '_', '.', '-' (max 64)") from exc
    labels = _labels(args.labels)
    graph_path: Path = args.graph
    graph_def = read_graph_def(graph_path)
    plan = _plan(args, graph_def, graph_path)
    if args.min_len < 1:
        raise UsageError("--min-len must be positive")
    length = plan.fixed_len or max(32, args.min_len)
    width = _output_width(graph_def, plan, length, graph_path)
    if width != len(labels):
        raise ArtifactError(
            f"{len(labels)} labels given, but {plan.output!r} has {width} values per text"
        )
    if plan.headerless:
        _prepend_rows(graph_def, plan.site, args.pad_id, args.unk_id)

    model_dir = repo / args.name
    version = _next_version(model_dir, args.version)
    version_dir = model_dir / str(version)
    staging = model_dir / f".import-{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if plan.headerless:
            (staging / MODEL_PB).write_bytes(graph_def.SerializeToString())
        else:
            shutil.copyfile(graph_path, staging / MODEL_PB)
        del graph_def
        (staging / VOCAB_TXT).write_text("\n".join(plan.tokens) + "\n", encoding="utf-8")
        (staging / LABELS_TXT).write_text("\n".join(labels) + "\n", encoding="utf-8")
        fixed = plan.fixed_len
        manifest = ModelManifest(
            name=args.name,
            version=version,
            format=ModelFormat.IMPORTED,
            labels=labels,
            tokenizer=TokenizerSpec(
                lowercase=args.lowercase,
                max_len=fixed or max(TokenizerSpec().max_len, args.min_len),
                min_len=min(fixed, args.min_len) if fixed else args.min_len,
                fixed_len=fixed,
            ),
            tensors=TensorNames(
                input_ids=tensor_name(plan.input),
                embedded=tensor_name(plan.site.cut),
                dropout=None if plan.dropout is None else tensor_name(plan.dropout),
                output=tensor_name(plan.output),
            ),
            apply_softmax=plan.apply_softmax,
            vocab=VOCAB_TXT,
            files=dir_files(staging),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            textserve_version=__version__,
        )
        write_model_manifest(staging, manifest)
        staging.rename(version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _verify(version_dir, len(labels))
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        raise
    _update_config(repo, args.name)

    site = plan.site
    vocab_note = (
        f"no <pad>/<unk> header: ids shifted by 2, <pad> = row {args.pad_id}, "
        f"<unk> = row {args.unk_id}"
        if plan.headerless
        else "textserve header"
    )
    print(f"imported {args.name} version {version} into {version_dir}")
    print(
        f"  {plan.input} ({'fixed length ' + str(fixed) if fixed else 'variable length'}) -> "
        f"{plan.output} ({len(labels)} labels, "
        f"{'softmax applied in numpy' if plan.apply_softmax else 'graph outputs probabilities'})"
    )
    print(
        f"  embedding {site.rows} x {site.dim} cut at {site.cut!r} when served; vocabulary "
        f"{len(plan.tokens)} tokens ({vocab_note}); dropout: {plan.dropout or 'none'}"
    )
    return 0
