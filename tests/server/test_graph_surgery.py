"""Cutting the embedding out of frozen GraphDefs (textserve's own and TF1 RefVariable graphs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.artifact import CnnSpec
from server.errors import ArtifactError
from server.graph_surgery import (
    constant_bytes,
    cut_embedding,
    find_embedding,
    input_length,
    matrix_of,
    node_name,
    read_graph_def,
    tensor_name,
)
from tests.server.tf_models import make_cnn, random_matrix, sample_ids

ROWS, DIM = 200, 10
SPEC = CnnSpec(embedding_dim=DIM, filter_widths=(2, 3), num_filters=6, num_classes=3)


def _freeze(session: Any, outputs: list[str]) -> Any:
    import tensorflow as tf

    return tf.compat.v1.graph_util.convert_variables_to_constants(
        session, session.graph.as_graph_def(), outputs
    )


def _run(graph_def: Any, fetch: str, feeds: dict[str, Any]) -> np.ndarray:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        out: np.ndarray = session.run(fetch, feeds)
    return out


@pytest.fixture(scope="module")
def textserve_frozen() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """(frozen self-contained GraphDef bytes, matrix, ids, probs of the original graph)."""
    matrix = random_matrix(ROWS, DIM, seed=1)
    cnn = make_cnn(SPEC, matrix, seed=2)
    ids = sample_ids(ROWS, batch=6, length=9)
    probs = cnn.probs(ids)
    data = _freeze(cnn.session, ["output/probs"]).SerializeToString()
    cnn.close()
    return data, matrix, ids, probs


def _parse(data: bytes) -> Any:
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(data)
    return gd


def test_cut_textserve_graph_at_embedding_lookup(textserve_frozen: Any) -> None:
    data, matrix, ids, probs = textserve_frozen
    gd = _parse(data)
    site = find_embedding(gd, "embedding/lookup:0")
    assert (site.cut, site.const, site.rows, site.dim, site.ids) == (
        "embedding/lookup",
        "embedding/W",
        ROWS,
        DIM,
        "input_x",
    )
    cut = cut_embedding(gd, ["input_x", "output/probs:0", "dropout_keep_prob"], "embedding/lookup")
    np.testing.assert_array_equal(cut.matrix, matrix)
    assert cut.matrix.dtype == np.float32
    assert cut.placeholder == "embedding/lookup:0"
    nodes = {n.name: n for n in cut.graph_def.node}
    assert "embedding/W" not in nodes
    assert site.gather not in nodes
    lookup = nodes["embedding/lookup"]
    assert lookup.op == "Placeholder"
    assert [d.size for d in lookup.attr["shape"].shape.dim] == [-1, -1, DIM]
    assert constant_bytes(cut.graph_def) < 4096 + 4 * (2 + 3) * DIM * 6
    got = _run(
        cut.graph_def, "output/probs:0", {"input_x:0": ids, "embedding/lookup:0": matrix[ids]}
    )
    np.testing.assert_allclose(got, probs, atol=1e-6)


def test_auto_detect_cuts_the_gather(textserve_frozen: Any) -> None:
    data, matrix, ids, probs = textserve_frozen
    gd = _parse(data)
    site = find_embedding(gd)
    assert site.cut == site.gather
    cut = cut_embedding(gd, ["input_x", "output/probs"])
    assert cut.placeholder == f"{site.gather}:0"
    got = _run(cut.graph_def, "output/probs:0", {"input_x:0": ids, cut.placeholder: matrix[ids]})
    np.testing.assert_allclose(got, probs, atol=1e-6)


def _refvariable_textcnn(rows: int, dim: int, length: int) -> tuple[Any, np.ndarray]:
    """TF1 TextCNN-style: RefVariable ``embedding/W`` (+ ``W/read``), embedding_lookup."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.int32, [None, length], name="input_x")
        with tf.name_scope("embedding"):
            w = v1.Variable(
                v1.random_uniform([rows, dim], -1.0, 1.0, seed=3), name="W", use_resource=False
            )
            chars = tf.nn.embedding_lookup(w, x)
        pooled = tf.reduce_max(chars, axis=1)
        logits = tf.matmul(pooled, tf.ones([dim, 2]), name="scores")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            matrix = session.run(w)
            frozen = _freeze(session, ["scores"])
    del logits
    return frozen, matrix


def test_refvariable_graph_through_identity() -> None:
    gd, matrix = _refvariable_textcnn(50, 4, 7)
    assert any(n.name == "embedding/W/read" and n.op == "Identity" for n in gd.node)
    ids = np.random.default_rng(0).integers(0, 50, size=(3, 7)).astype(np.int32)
    expected = _run(gd, "scores:0", {"input_x:0": ids})
    assert input_length(gd, "input_x:0") == 7
    site = find_embedding(gd)
    assert site.gather == "embedding/embedding_lookup"
    assert site.const == "embedding/W"
    cut = cut_embedding(gd, ["input_x", "scores"])
    shape = [
        d.size for d in {n.name: n for n in cut.graph_def.node}[site.cut].attr["shape"].shape.dim
    ]
    assert shape == [-1, 7, 4]
    assert not any(n.name in ("embedding/W", "embedding/W/read") for n in cut.graph_def.node)
    np.testing.assert_array_equal(cut.matrix, matrix)
    got = _run(cut.graph_def, "scores:0", {cut.placeholder: matrix[ids], "input_x:0": ids})
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_errors_name_the_problem(textserve_frozen: Any) -> None:
    data, *_ = textserve_frozen
    with pytest.raises(ArtifactError, match="embedding node 'nope' not found"):
        find_embedding(_parse(data), "nope:0")
    with pytest.raises(
        ArtifactError, match=r"'output/logits' \(BiasAdd\) is not an embedding lookup"
    ):
        find_embedding(_parse(data), "output/logits")
    with pytest.raises(ArtifactError, match="node 'output/nope' not found"):
        cut_embedding(_parse(data), ["input_x", "output/nope"])


def test_graph_without_or_with_two_lookups() -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.int32, [None, None], name="input_x")
        e = v1.placeholder(tf.float32, [None, None, 3], name="embedding/lookup")
        tf.identity(tf.reduce_sum(e) + tf.cast(tf.reduce_sum(x), tf.float32), name="out")
    with pytest.raises(ArtifactError, match="no embedding lookup found"):
        find_embedding(graph.as_graph_def())

    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.int32, [None, None], name="input_x")
        a = tf.constant(np.ones((5, 3), np.float32), name="A")
        b = tf.constant(np.ones((6, 3), np.float32), name="B")
        tf.identity(tf.reduce_sum(tf.gather(a, x)) + tf.reduce_sum(tf.gather(b, x)), name="out")
    with pytest.raises(ArtifactError, match="several embedding lookups found"):
        find_embedding(graph.as_graph_def())


def test_constant_used_elsewhere_cannot_be_shared() -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.int32, [None, None], name="input_x")
        w = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3), name="W")
        tf.identity(tf.reduce_sum(tf.gather(w, x)) + tf.reduce_sum(w), name="out")
    with pytest.raises(ArtifactError, match="'W' is also used by"):
        cut_embedding(graph.as_graph_def(), ["input_x", "out"])


def test_matrix_from_float_val_and_constant_bytes() -> None:
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    node = gd.node.add()
    node.name, node.op = "W", "Const"
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    tensor = node.attr["value"].tensor
    tensor.dtype = tf.float32.as_datatype_enum
    tensor.tensor_shape.CopyFrom(tf.TensorShape([3, 2]).as_proto())
    tensor.float_val.append(0.5)  # one value broadcast to the whole shape
    np.testing.assert_array_equal(matrix_of(node), np.full((3, 2), 0.5, np.float32))
    assert constant_bytes(gd) == 3 * 2 * 4
    other = gd.node.add()
    other.CopyFrom(node)
    other.name = "W2"
    other.attr["dtype"].type = tf.int64.as_datatype_enum
    assert constant_bytes(gd) == 3 * 2 * 4 + 3 * 2 * 8


def test_read_graph_def_errors(tmp_path: Path, textserve_frozen: Any) -> None:
    with pytest.raises(ArtifactError, match="graph file not found"):
        read_graph_def(tmp_path / "none.pb")
    bad = tmp_path / "bad.pb"
    bad.write_bytes(textserve_frozen[0][:1000])
    with pytest.raises(ArtifactError, match="not a valid binary GraphDef"):
        read_graph_def(bad)
    bad.write_bytes(b"")
    with pytest.raises(ArtifactError, match="no nodes"):
        read_graph_def(bad)
    good = tmp_path / "good.pb"
    good.write_bytes(textserve_frozen[0])
    assert any(n.name == "embedding/W" for n in read_graph_def(good).node)


def test_names() -> None:
    assert node_name("a/b:0") == "a/b"
    assert node_name("^a/b") == "a/b"
    assert node_name("a/b") == "a/b"
    assert node_name("a:b") == "a:b"
    assert tensor_name("a/b") == "a/b:0"
    assert tensor_name("a/b:1") == "a/b:1"
