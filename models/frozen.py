"""Read a frozen GraphDef's weights back (``textserve train --init-from model.pb``).

``convert_variables_to_constants`` turns each variable into a ``Const`` node of the same name,
so ``conv-maxpool-{w}/W``, ``conv-maxpool-{w}/b``, ``output/W`` and ``output/b`` are found by
name in any textserve or seed-style frozen graph. The architecture follows from their shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.train import Weights
from server.artifact import CnnSpec
from server.errors import ArtifactError

_CONV = re.compile(r"^conv-maxpool-(\d+)/([Wb])$")


@dataclass(frozen=True)
class FrozenWeights:
    spec: CnnSpec
    weights: Weights
    embedding: np.ndarray | None
    """``embedding/W`` if the graph is self-contained (the seed's way), else None."""


def read_frozen_weights(path: Path) -> FrozenWeights:
    import tensorflow as tf

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: frozen graph not found") from exc
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ArtifactError(f"{path}: not a GraphDef ({exc})") from exc
    consts = {}
    for node in graph_def.node:
        if node.op != "Const":
            continue
        if _CONV.match(node.name) or node.name in ("output/W", "output/b", "embedding/W"):
            value = tf.make_ndarray(node.attr["value"].tensor)
            consts[node.name] = np.ascontiguousarray(value, dtype=np.float32)
    widths = sorted({int(m.group(1)) for n in consts if (m := _CONV.match(n))})
    needed = [f"conv-maxpool-{w}/{p}" for w in widths for p in ("W", "b")] + [
        "output/W",
        "output/b",
    ]
    missing = [n for n in needed if n not in consts]
    if not widths or missing:
        raise ArtifactError(
            f"{path}: not a textserve CNN graph (missing constants: "
            f"{', '.join(missing) or 'conv-maxpool-*/W'})"
        )
    first = consts[f"conv-maxpool-{widths[0]}/W"]
    if first.ndim != 3:
        raise ArtifactError(f"{path}: conv-maxpool-{widths[0]}/W has shape {first.shape}")
    try:
        spec = CnnSpec(
            embedding_dim=int(first.shape[1]),
            filter_widths=tuple(widths),
            num_filters=int(first.shape[2]),
            num_classes=int(consts["output/W"].shape[-1]),
        )
    except ValueError as exc:
        raise ArtifactError(f"{path}: unusable architecture: {exc}") from exc
    weights = {n: consts[n] for n in needed}
    return FrozenWeights(spec, weights, consts.get("embedding/W"))
