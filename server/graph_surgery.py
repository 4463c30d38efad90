"""Cut the embedding out of a frozen GraphDef, so that the embedding store can share it.

A frozen text classifier looks up its embedding with a ``Gather``/``GatherV2``/``ResourceGather``
whose params are a 2-D float ``Const`` — directly, or through ``Identity`` nodes such as
``embedding/W/read`` in TF1 ``RefVariable`` graphs. :func:`cut_embedding` replaces the lookup
node (or the ``Identity`` naming it, e.g. textserve's ``embedding/lookup``) with a float32
``Placeholder`` of the same name and shape ``[None, T or None, D]``, drops the nodes nobody
needs any more (``tf.compat.v1.graph_util.extract_sub_graph``) and hands the matrix back as
numpy. The runtime then maps that placeholder to its own gather from the shared copy
(:mod:`server.runtime.lookup`).

Why: TensorFlow copies a large graph constant several times on a session's first run (graph
optimisation and constant folding): for a 220k x 300 float32 matrix that first run took
~13-18 s and +1.5 GiB on this machine, for every model. Fed rows cost nothing of the kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.errors import ArtifactError

GraphDef = Any  # tf.compat.v1.GraphDef (TensorFlow ships no type stubs)
NodeDef = Any

GATHER_OPS = frozenset({"Gather", "GatherV2", "ResourceGather"})
PASS_THROUGH_OPS = frozenset({"Identity", "Snapshot", "StopGradient"})

_DT_FLOAT = 1  # types_pb2.DT_FLOAT


def node_name(tensor_or_node: str) -> str:
    """``"scope/op:0"`` / ``"^scope/op"`` → ``"scope/op"``."""
    name = tensor_or_node.lstrip("^")
    head, sep, tail = name.rpartition(":")
    return head if sep and tail.isdigit() else name


def tensor_name(name: str) -> str:
    """``"scope/op"`` → ``"scope/op:0"``; names with an output index are kept."""
    _, sep, tail = name.rpartition(":")
    return name if sep and tail.isdigit() else f"{name}:0"


def read_graph_def(path: Path) -> GraphDef:
    """Parse a binary GraphDef file; a missing or corrupt file is an ArtifactError."""
    import tensorflow as tf

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: graph file not found") from exc
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ArtifactError(f"{path}: not a valid binary GraphDef ({exc})") from exc
    del data
    if not graph_def.node:
        raise ArtifactError(f"{path}: not a valid binary GraphDef (no nodes)")
    return graph_def


def nodes_by_name(graph_def: GraphDef) -> dict[str, NodeDef]:
    return {n.name: n for n in graph_def.node}


def require_nodes(graph_def: GraphDef, names: Iterable[str], where: str = "graph") -> None:
    """ArtifactError naming the first tensor/node of ``names`` that the graph lacks."""
    nodes = nodes_by_name(graph_def)
    for name in names:
        if node_name(name) not in nodes:
            raise ArtifactError(f"{where}: node {node_name(name)!r} not found in the graph")


def _through_pass_through(nodes: dict[str, NodeDef], name: str) -> NodeDef | None:
    node = nodes.get(node_name(name))
    seen = 0
    while node is not None and node.op in PASS_THROUGH_OPS and node.input and seen < 64:
        node = nodes.get(node_name(node.input[0]))
        seen += 1
    return node


def _const_shape(node: NodeDef) -> tuple[int, ...]:
    return tuple(int(d.size) for d in node.attr["value"].tensor.tensor_shape.dim)


def _is_matrix_const(node: NodeDef | None) -> bool:
    return (
        node is not None
        and node.op == "Const"
        and node.attr["dtype"].type == _DT_FLOAT
        and len(_const_shape(node)) == 2
    )


def _gather_axis_is_zero(nodes: dict[str, NodeDef], gather: NodeDef) -> bool:
    if gather.op != "GatherV2":
        return True
    if "batch_dims" in gather.attr and gather.attr["batch_dims"].i != 0:
        return False
    if len(gather.input) < 3:
        return False
    axis = _through_pass_through(nodes, gather.input[2])
    if axis is None or axis.op != "Const":
        return False
    import tensorflow as tf

    return bool(np.all(tf.make_ndarray(axis.attr["value"].tensor) == 0))


@dataclass(frozen=True)
class EmbeddingSite:
    """Where a graph looks its embedding up."""

    cut: str
    """The node replaced by a placeholder (the gather, or an Identity naming its output)."""
    gather: str
    const: str
    rows: int
    dim: int
    ids: str
    """The node feeding the gather's indices (usually the ``input_x`` placeholder)."""


def _site(nodes: dict[str, NodeDef], cut: NodeDef) -> EmbeddingSite | None:
    gather = _through_pass_through(nodes, cut.name)
    if gather is None or gather.op not in GATHER_OPS or len(gather.input) < 2:
        return None
    const = _through_pass_through(nodes, gather.input[0])
    if const is None or not _is_matrix_const(const) or not _gather_axis_is_zero(nodes, gather):
        return None
    rows, dim = _const_shape(const)
    return EmbeddingSite(
        cut=cut.name,
        gather=gather.name,
        const=const.name,
        rows=rows,
        dim=dim,
        ids=node_name(gather.input[1]),
    )


def find_embedding(graph_def: GraphDef, embedded: str | None = None) -> EmbeddingSite:
    """Locate the embedding lookup: ``embedded`` if given, else the only candidate.

    ``embedded`` may name the gather itself or an Identity of its output. Without it, every
    gather reading a 2-D float constant is a candidate; zero or several is an ArtifactError.
    """
    nodes = nodes_by_name(graph_def)
    if embedded is not None:
        name = node_name(embedded)
        node = nodes.get(name)
        if node is None:
            raise ArtifactError(f"embedding node {name!r} not found in the graph")
        site = _site(nodes, node)
        if site is None:
            raise ArtifactError(
                f"node {name!r} ({node.op}) is not an embedding lookup: expected a Gather/"
                "GatherV2/ResourceGather on axis 0 of a 2-D float32 constant"
            )
        return site
    candidates = [
        s for n in graph_def.node if n.op in GATHER_OPS and (s := _site(nodes, n)) is not None
    ]
    if not candidates:
        raise ArtifactError(
            "no embedding lookup found (no Gather/GatherV2/ResourceGather reads a 2-D float32 "
            "constant); name it explicitly"
        )
    if len(candidates) > 1:
        names = ", ".join(repr(s.gather) for s in candidates)
        raise ArtifactError(f"several embedding lookups found ({names}); name one explicitly")
    return candidates[0]


def _static_ids_shape(nodes: dict[str, NodeDef], ids: str) -> list[int] | None:
    node = _through_pass_through(nodes, ids)
    if node is None or node.op not in ("Placeholder", "PlaceholderWithDefault"):
        return None
    shape = node.attr["shape"].shape
    if shape.unknown_rank:
        return None
    return [int(d.size) for d in shape.dim]


def input_length(graph_def: GraphDef, input_ids: str) -> int | None:
    """The fixed sequence length of a ``[batch, T]`` ids placeholder, or None if variable."""
    shape = _static_ids_shape(nodes_by_name(graph_def), input_ids)
    if shape is None or len(shape) != 2 or shape[1] < 0:
        return None
    return shape[1]


def matrix_of(const: NodeDef) -> npt.NDArray[Any]:
    """A float32 Const's value as numpy (zero-copy over the ``tensor_content`` bytes)."""
    tensor = const.attr["value"].tensor
    shape = _const_shape(const)
    dtype = np.float32
    content = tensor.tensor_content
    if content:
        array: npt.NDArray[Any] = np.frombuffer(content, dtype=dtype)
        if array.size != int(np.prod(shape)):
            raise ArtifactError(f"constant {const.name!r}: {array.size} values for shape {shape}")
        return array.reshape(shape)
    import tensorflow as tf

    return np.ascontiguousarray(tf.make_ndarray(tensor).astype(dtype, copy=False))


@dataclass(frozen=True)
class CutGraph:
    graph_def: GraphDef
    """The graph with a Placeholder where the lookup was; the constant is gone."""
    matrix: npt.NDArray[Any]
    """The embedding, ``[rows, dim]`` float32."""
    site: EmbeddingSite
    placeholder: str
    """Tensor name to feed the gathered rows to (``site.cut + ":0"``)."""


def cut_embedding(
    graph_def: GraphDef, keep: Sequence[str], embedded: str | None = None
) -> CutGraph:
    """Cut the embedding out of ``graph_def`` (consumed: its constant is emptied).

    ``keep`` are the nodes/tensors the caller will feed or fetch (inputs, outputs, dropout);
    everything else that no longer leads to them is dropped.
    """
    import tensorflow as tf

    site = find_embedding(graph_def, embedded)
    nodes = nodes_by_name(graph_def)
    require_nodes(graph_def, keep)
    ids_shape = _static_ids_shape(nodes, site.ids)
    # [None, T or None, D]: the batch dimension stays open whatever the graph said.
    placeholder_shape = [-1, *ids_shape[1:]] if ids_shape else [-1, -1]
    placeholder_shape.append(site.dim)

    const = nodes[site.const]
    matrix = matrix_of(const)
    # Free the proto's copy now: the matrix owns its bytes.
    const.attr["value"].tensor.ClearField("tensor_content")

    cut = nodes[site.cut]
    cut.op = "Placeholder"
    del cut.input[:]
    cut.attr.clear()
    cut.attr["dtype"].type = _DT_FLOAT
    cut.attr["shape"].shape.CopyFrom(
        tf.TensorShape([None if d < 0 else d for d in placeholder_shape]).as_proto()
    )
    cut.ClearField("device")

    keep_nodes = sorted({node_name(k) for k in keep} | {site.cut})
    pruned = tf.compat.v1.graph_util.extract_sub_graph(graph_def, keep_nodes)
    still_used = [n.name for n in pruned.node if n.name == site.const]
    if still_used:
        users = [n.name for n in pruned.node if site.const in {node_name(i) for i in n.input}]
        raise ArtifactError(
            f"embedding constant {site.const!r} is also used by {users[:3]}; it cannot be shared"
        )
    return CutGraph(graph_def=pruned, matrix=matrix, site=site, placeholder=f"{site.cut}:0")


def constant_bytes(graph_def: GraphDef) -> int:
    """Bytes of the values of every Const in ``graph_def`` (a frozen model's own weights)."""
    import tensorflow as tf

    total = 0
    for node in graph_def.node:
        if node.op != "Const":
            continue
        tensor = node.attr["value"].tensor
        dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
        if dtype == tf.string:
            total += sum(len(s) for s in tensor.string_val)
            continue
        total += int(np.prod(_const_shape(node), dtype=np.int64)) * dtype.size
    return total
