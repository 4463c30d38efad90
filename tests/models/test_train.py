"""Training: determinism, the frozen embedding, early stopping, initial weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.cnn import EMBEDDING_VAR, build_training_graph
from models.data import Dataset, load_wordnet
from models.embeddings import EmbeddingArtifact, write_glove
from models.export import FROZEN_PB, export, save_tuned_embedding
from models.frozen import read_frozen_weights
from models.train import TrainConfig, Trainer
from server.artifact import CnnSpec, ModelFormat
from server.errors import ArtifactError, UsageError
from server.text import tokenize

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, EmbeddingArtifact]:
    ds = load_wordnet("pos").subset(300, 80, 80)
    words = {w for s in (ds.train, ds.validation, ds.test) for t in s.texts for w in tokenize(t)}
    emb = write_glove(tmp_path_factory.mktemp("emb") / "e", "e", keep=words, top=500)
    return ds, emb


CONFIG = TrainConfig(num_filters=8, epochs=2, threads=1, seed=5)


def test_same_seed_same_weights_and_embedding_untouched(
    data: tuple[Dataset, EmbeddingArtifact],
) -> None:
    ds, emb = data
    runs = []
    for _ in range(2):
        with Trainer(emb, ds.labels, CONFIG) as trainer:
            model = trainer.fit(ds)
            runs.append(model)
            np.testing.assert_array_equal(trainer.embedding_matrix(), emb.matrix())
    for name, w in runs[0].weights.items():
        np.testing.assert_array_equal(w, runs[1].weights[name])
    assert runs[0].metrics == {k: v for k, v in runs[1].metrics.items() if k != "train_seconds"} | {
        "train_seconds": runs[0].metrics["train_seconds"]
    }
    assert runs[0].embedding_matrix is None
    with Trainer(emb, ds.labels, TrainConfig(num_filters=8, epochs=2, seed=6, threads=1)) as t:
        other = t.fit(ds)
    assert not np.array_equal(other.weights["output/W"], runs[0].weights["output/W"])


def test_training_learns(data: tuple[Dataset, EmbeddingArtifact]) -> None:
    ds, emb = data
    config = TrainConfig(num_filters=16, epochs=4, threads=1, learning_rate=3e-3, patience=4)
    with Trainer(emb, ds.labels, config) as trainer:
        before = trainer.accuracy(trainer.encode(ds.validation.texts), ds.validation.y)
        calls: list[tuple[str, int, int]] = []
        model = trainer.fit(ds, lambda what, done, total: calls.append((what, done, total)))
    # One progress call per batch; every epoch ran, so the bar ends exactly full.
    assert [done for _, done, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1] == ("epoch 4/4", len(calls), len(calls))
    losses = [h["loss"] for h in model.history]
    assert losses[-1] < losses[0]
    assert model.metrics["val_accuracy"] > max(before, 0.5)  # 4 classes; 'noun' is ~60%


def test_trainable_embedding_changes_and_is_saved(
    data: tuple[Dataset, EmbeddingArtifact], tmp_path: Path
) -> None:
    ds, emb = data
    config = TrainConfig(num_filters=8, epochs=1, threads=1, trainable_embedding=True)
    with Trainer(emb, ds.labels, config) as trainer:
        model = trainer.fit(ds)
        ids = trainer.tokenizer.encode_batch(list(ds.test.texts[:10]))
        ref = trainer.session.run(trainer.tg.cnn.probs, {trainer.tg.cnn.input_x: ids})
    tuned = model.embedding_matrix
    assert tuned is not None
    assert not np.array_equal(tuned, emb.matrix())
    with pytest.raises(ArtifactError, match="fine-tuned"):
        export(model, ModelFormat.STRIPPED, tmp_path / "never" / "1", "m", 1)
    art = save_tuned_embedding(model, tmp_path, "m-embedding")
    np.testing.assert_array_equal(art.matrix(), tuned)  # PAD/OOV rows too
    assert model.embedding is art
    exp = export(model, ModelFormat.FROZEN, tmp_path / "m" / "1", "m", 1)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((exp.path / FROZEN_PB).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        probs = sess.run(
            "output/probs:0", {"input_x:0": ids, "embedding/lookup:0": art.matrix()[ids]}
        )
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_early_stopping_keeps_the_best_epoch(data: tuple[Dataset, EmbeddingArtifact]) -> None:
    ds, emb = data
    # A huge learning rate makes validation accuracy bounce; patience 1 stops at the first dip.
    config = TrainConfig(num_filters=8, epochs=12, threads=1, learning_rate=0.5, patience=1)
    with Trainer(emb, ds.labels, config) as trainer:
        model = trainer.fit(ds)
        final = trainer.accuracy(trainer.encode(ds.validation.texts), ds.validation.y)
    accs = [h["val_accuracy"] for h in model.history]
    best = int(model.metrics["best_epoch"])
    assert model.metrics["val_accuracy"] == max(accs) == accs[best - 1]
    assert final == pytest.approx(model.metrics["val_accuracy"])
    assert len(accs) == 12 or len(accs) - best == 1


def test_embedding_is_fed_not_a_graph_constant() -> None:
    spec = CnnSpec(embedding_dim=50, num_filters=4, num_classes=3)
    tg = build_training_graph(spec, 400_002)
    graph_def = tg.graph.as_graph_def()
    assert graph_def.ByteSize() < 1_000_000  # the 80 MB matrix is nowhere in the graph
    with tg.graph.as_default():
        variables = {v.op.name for v in tf.compat.v1.global_variables()}
        trainable = {v.op.name for v in tf.compat.v1.trainable_variables()}
    assert EMBEDDING_VAR in variables
    assert EMBEDDING_VAR not in trainable


def test_init_from_frozen_graph(data: tuple[Dataset, EmbeddingArtifact], tmp_path: Path) -> None:
    ds, emb = data
    with Trainer(emb, ds.labels, CONFIG) as trainer:
        model = trainer.fit(ds)
        ids = trainer.tokenizer.encode_batch(list(ds.test.texts[:20]))
        ref = trainer.session.run(trainer.tg.cnn.probs, {trainer.tg.cnn.input_x: ids})
    for fmt in (ModelFormat.FROZEN, ModelFormat.FROZEN_SELFCONTAINED):
        exp = export(model, fmt, tmp_path / fmt.value / "1", "m", 1)
        frozen = read_frozen_weights(exp.path / FROZEN_PB)
        assert frozen.spec == model.spec
        assert (frozen.embedding is not None) == (fmt == ModelFormat.FROZEN_SELFCONTAINED)
        for name, w in model.weights.items():
            np.testing.assert_array_equal(frozen.weights[name], w)
        with Trainer(emb, ds.labels, CONFIG, frozen.weights) as again:
            probs = again.session.run(again.tg.cnn.probs, {again.tg.cnn.input_x: ids})
        np.testing.assert_allclose(probs, ref, atol=1e-6)
    bad = dict(frozen.weights)
    bad["output/b"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(UsageError, match="shape"):
        Trainer(emb, ds.labels, CONFIG, bad).close()
    (tmp_path / "junk.pb").write_bytes(b"\x00not a graph")
    with pytest.raises(ArtifactError):
        read_frozen_weights(tmp_path / "junk.pb")
