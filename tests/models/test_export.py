"""Train a tiny model on real glosses, export every format, reload each in a fresh session.

Every format must give the trained graph's probabilities (to 1e-5) for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.cnn import model_variable_names
from models.data import Dataset, load_wordnet
from models.embeddings import EmbeddingArtifact, FloatMatrix, write_glove
from models.export import CKPT_PREFIX, FROZEN_PB, Exported, export
from models.train import TrainConfig, TrainedModel, Trainer
from server.artifact import (
    EMBEDDED,
    INPUT_IDS,
    PROBS,
    CnnSpec,
    ModelFormat,
    TokenizerSpec,
    load_model_manifest,
)
from server.graph import build_cnn
from server.text import IdArray, tokenize

tf = pytest.importorskip("tensorflow")
v1 = tf.compat.v1

TEXTS = [
    "a large domesticated carnivorous mammal",
    "the act of running quickly",
    "zzqx unknownword flibbertigibbet",  # all out of vocabulary
    "a",  # shorter than the widest filter
    "a person who writes computer programs for a living and also enjoys long walks " * 3,
]


@dataclass
class Trained:
    dataset: Dataset
    embedding: EmbeddingArtifact
    model: TrainedModel
    ids: IdArray
    reference: FloatMatrix
    exports: dict[ModelFormat, Exported]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("export")
    ds = load_wordnet("noun").subset(400, 100, 100)
    words = {w for t in ds.train.texts + ds.validation.texts + tuple(TEXTS) for w in tokenize(t)}
    words.discard("flibbertigibbet")
    emb = write_glove(root / "emb", "glove-test", keep=words, top=1000)
    config = TrainConfig(num_filters=16, epochs=1, threads=1, seed=3)
    with Trainer(emb, ds.labels, config) as trainer:
        model = trainer.fit(ds)
        ids = trainer.tokenizer.encode_batch(TEXTS)
        reference = trainer.session.run(trainer.tg.cnn.probs, {trainer.tg.cnn.input_x: ids})
        exports = {
            fmt: export(model, fmt, root / fmt.value / "1", "noun-tiny", 1, trainer=trainer)
            for fmt in (
                ModelFormat.CHECKPOINT,
                ModelFormat.STRIPPED,
                ModelFormat.FROZEN,
                ModelFormat.FROZEN_SELFCONTAINED,
                ModelFormat.SAVEDMODEL,
            )
        }
    return Trained(ds, emb, model, ids, reference, exports)


def _session(graph: Any) -> Any:
    return v1.Session(graph=graph)


def _import_pb(path: Path) -> Any:
    graph_def = v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph


def test_reference_is_a_distribution(trained: Trained) -> None:
    assert trained.reference.shape == (len(TEXTS), 26)
    np.testing.assert_allclose(trained.reference.sum(axis=1), 1.0, rtol=1e-5)
    assert trained.ids.dtype == np.int32
    assert trained.ids[2, :3].tolist() == [1, 1, 1]  # OOV words are id 1


def test_full_checkpoint(trained: Trained) -> None:
    exp = trained.exports[ModelFormat.CHECKPOINT]
    prefix = exp.path / CKPT_PREFIX
    assert (exp.path / "model.ckpt.meta").is_file()
    names = {n for n, _ in tf.train.list_variables(str(prefix))}
    assert any("Adam" in n for n in names), names
    assert "embedding/W" in names
    graph = tf.Graph()
    with graph.as_default():
        saver = v1.train.import_meta_graph(str(prefix) + ".meta")
    with _session(graph) as sess, graph.as_default():
        saver.restore(sess, str(prefix))
        probs = sess.run(PROBS, {INPUT_IDS: trained.ids})
    np.testing.assert_allclose(probs, trained.reference, atol=1e-5)


def test_stripped_checkpoint(trained: Trained) -> None:
    exp = trained.exports[ModelFormat.STRIPPED]
    prefix = exp.path / CKPT_PREFIX
    manifest = load_model_manifest(exp.path)
    assert manifest.format == ModelFormat.STRIPPED
    assert manifest.architecture is not None
    assert not list(exp.path.glob("*.meta"))
    assert not (exp.path / "checkpoint").exists()
    names = {n for n, _ in tf.train.list_variables(str(prefix))}
    assert names == set(model_variable_names(manifest.architecture))
    own = sum(w.nbytes for w in trained.model.weights.values())
    on_disk = sum(p.stat().st_size for p in exp.path.glob("model.ckpt.*"))
    assert own <= on_disk <= own * 1.05, (own, on_disk)

    # Rebuild the graph from model.json alone, restore, feed gathered embedding rows.
    graph = tf.Graph()
    with graph.as_default():
        build_cnn(manifest.architecture, lookup=None)
        saver = v1.train.Saver()
    matrix = trained.embedding.matrix()
    with _session(graph) as sess, graph.as_default():
        saver.restore(sess, str(prefix))
        probs = sess.run(PROBS, {INPUT_IDS: trained.ids, EMBEDDED: matrix[trained.ids]})
    np.testing.assert_allclose(probs, trained.reference, atol=1e-5)


def test_frozen_embedding_external(trained: Trained) -> None:
    exp = trained.exports[ModelFormat.FROZEN]
    manifest = load_model_manifest(exp.path)
    assert manifest.embedding is not None
    assert manifest.embedding.sha256 == trained.embedding.manifest.sha256
    graph = _import_pb(exp.path / FROZEN_PB)
    ops = {op.type for op in graph.get_operations()}
    assert not ops & {"VariableV2", "VarHandleOp", "ResourceGather"}
    const_bytes = sum(
        op.get_attr("value").ByteSize() for op in graph.get_operations() if op.type == "Const"
    )
    assert const_bytes < 2 * sum(w.nbytes for w in trained.model.weights.values())
    with _session(graph) as sess:
        matrix = trained.embedding.matrix()
        probs = sess.run(PROBS, {INPUT_IDS: trained.ids, EMBEDDED: matrix[trained.ids]})
    np.testing.assert_allclose(probs, trained.reference, atol=1e-5)


def test_frozen_selfcontained(trained: Trained) -> None:
    exp = trained.exports[ModelFormat.FROZEN_SELFCONTAINED]
    manifest = load_model_manifest(exp.path)
    assert manifest.vocab == "vocab.txt"
    assert (exp.path / "vocab.txt").read_text() == (
        trained.embedding.path / "vocab.txt"
    ).read_text()
    graph = _import_pb(exp.path / FROZEN_PB)
    with _session(graph) as sess:
        probs = sess.run(PROBS, {INPUT_IDS: trained.ids})
    np.testing.assert_allclose(probs, trained.reference, atol=1e-5)


def test_savedmodel(trained: Trained) -> None:
    exp = trained.exports[ModelFormat.SAVEDMODEL]
    assert (exp.path / "saved_model.pb").is_file()
    graph = tf.Graph()
    with _session(graph) as sess, graph.as_default():
        meta = v1.saved_model.loader.load(sess, ["serve"], str(exp.path))
        sig = meta.signature_def["serving_default"]
        probs = sess.run(sig.outputs["probs"].name, {sig.inputs["input_x"].name: trained.ids})
    np.testing.assert_allclose(probs, trained.reference, atol=1e-5)


def test_export_refuses_existing_version(trained: Trained) -> None:
    from server.errors import ArtifactError

    exp = trained.exports[ModelFormat.FROZEN]
    with pytest.raises(ArtifactError, match="already exists"):
        export(trained.model, ModelFormat.FROZEN, exp.path, "noun-tiny", 1)


def test_external_frozen_graph_is_tiny_next_to_selfcontained_with_full_glove(
    tmp_path: Path,
) -> None:
    """With the real 400k x 50 GloVe matrix the embedding-external .pb is < 5% of the other."""
    emb = write_glove(tmp_path / "glove")
    assert emb.manifest.rows == 400_002
    spec = CnnSpec(embedding_dim=50, num_filters=128, num_classes=26)
    rng = np.random.default_rng(0)
    shapes = {n: s for n, s in _shapes(spec).items()}
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    model = TrainedModel(spec, TokenizerSpec(), tuple(f"l{i}" for i in range(26)), weights, emb)
    ext = export(model, ModelFormat.FROZEN, tmp_path / "ext" / "1", "m", 1)
    sc = export(model, ModelFormat.FROZEN_SELFCONTAINED, tmp_path / "sc" / "1", "m", 1)
    ext_pb = (ext.path / FROZEN_PB).stat().st_size
    sc_pb = (sc.path / FROZEN_PB).stat().st_size
    assert sc_pb > 400_002 * 50 * 4
    assert ext_pb < 0.05 * sc_pb, (ext_pb, sc_pb)


def _shapes(spec: CnnSpec) -> dict[str, tuple[int, ...]]:
    from models.cnn import model_variable_shapes

    return model_variable_shapes(spec)
