"""``textserve import-graph`` on a TextCNN written the way dennybritz/cnn-text-classification-tf
writes it (TF1 code: RefVariable embedding, conv2d over expand_dims, dropout placeholder without
a default, ``output/scores`` logits, no softmax), then served by the imported runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from server.artifact import ModelFormat, load_model_manifest, load_repository_config
from server.cli import main
from server.embeddings import EmbeddingStore
from server.runtime.loader import load_runtime
from server.runtime.session_runtime import SessionRuntime, softmax
from server.text import tokenize

SEQ_LEN = 56
VOCAB_WORDS = [f"word{i}" for i in range(1, 300)] + ["good", "bad", "movie", "plot"]
EMBED = 24


class TextCNN:
    """text_cnn.py, TF1 style (tf.compat.v1), as users wrote it."""

    def __init__(
        self,
        sequence_length: int,
        num_classes: int,
        vocab_size: int,
        embedding_size: int,
        filter_sizes: list[int],
        num_filters: int,
        softmax_output: bool = False,
        ids_dtype: str = "int32",
    ) -> None:
        import tensorflow as tf

        v1 = tf.compat.v1
        self.input_x = v1.placeholder(ids_dtype, [None, sequence_length], name="input_x")
        self.input_y = v1.placeholder(tf.float32, [None, num_classes], name="input_y")
        self.dropout_keep_prob = v1.placeholder(tf.float32, name="dropout_keep_prob")
        with tf.device("/cpu:0"), tf.name_scope("embedding"):
            self.W = v1.Variable(
                v1.random_uniform([vocab_size, embedding_size], -1.0, 1.0, seed=1),
                name="W",
                use_resource=False,
            )
            self.embedded_chars = tf.nn.embedding_lookup(self.W, self.input_x)
            self.embedded_chars_expanded = tf.expand_dims(self.embedded_chars, -1)
        pooled_outputs = []
        for i, filter_size in enumerate(filter_sizes):
            with tf.name_scope(f"conv-maxpool-{filter_size}"):
                filter_shape = [filter_size, embedding_size, 1, num_filters]
                w = v1.Variable(
                    v1.truncated_normal(filter_shape, stddev=0.1, seed=2 + i),
                    name="W",
                    use_resource=False,
                )
                b = v1.Variable(tf.constant(0.1, shape=[num_filters]), name="b", use_resource=False)
                conv = tf.nn.conv2d(
                    self.embedded_chars_expanded,
                    w,
                    strides=[1, 1, 1, 1],
                    padding="VALID",
                    name="conv",
                )
                h = tf.nn.relu(tf.nn.bias_add(conv, b), name="relu")
                pooled = tf.nn.max_pool2d(
                    h,
                    ksize=[1, sequence_length - filter_size + 1, 1, 1],
                    strides=[1, 1, 1, 1],
                    padding="VALID",
                    name="pool",
                )
                pooled_outputs.append(pooled)
        num_filters_total = num_filters * len(filter_sizes)
        self.h_pool = tf.concat(pooled_outputs, 3)
        self.h_pool_flat = tf.reshape(self.h_pool, [-1, num_filters_total])
        with tf.name_scope("dropout"):
            self.h_drop = v1.nn.dropout(self.h_pool_flat, keep_prob=self.dropout_keep_prob, seed=7)
        with tf.name_scope("output"):
            w_out = v1.get_variable(
                "W",
                shape=[num_filters_total, num_classes],
                initializer=v1.glorot_uniform_initializer(seed=9),
            )
            b_out = v1.Variable(tf.constant(0.1, shape=[num_classes]), name="b", use_resource=False)
            self.scores = v1.nn.xw_plus_b(self.h_drop, w_out, b_out, name="scores")
            self.predictions = tf.argmax(self.scores, 1, name="predictions")
            if softmax_output:
                self.probs = tf.nn.softmax(self.scores, name="probs")
        with tf.name_scope("loss"):
            losses = tf.nn.softmax_cross_entropy_with_logits(
                logits=self.scores, labels=self.input_y
            )
            self.loss = tf.reduce_mean(losses)


@dataclass
class Original:
    """The user's trained graph, frozen, with the user's own way of encoding text."""

    pb: Path
    vocab: Path
    words: list[str]  # line i = id i (VocabularyProcessor style: id 0 = padding and unknown)
    session: Any
    cnn: TextCNN

    def encode(self, texts: list[str]) -> np.ndarray:
        index = {w: i for i, w in enumerate(self.words)}
        ids = np.zeros((len(texts), SEQ_LEN), np.int32)
        for row, text in enumerate(texts):
            tokens = [index.get(t, 0) for t in tokenize(text)][:SEQ_LEN]
            ids[row, : len(tokens)] = tokens
        return ids

    def logits(self, texts: list[str]) -> np.ndarray:
        out: np.ndarray = self.session.run(
            self.cnn.scores,
            {self.cnn.input_x: self.encode(texts), self.cnn.dropout_keep_prob: 1.0},
        )
        return out


def _train_and_freeze(
    directory: Path, num_classes: int = 2, softmax_output: bool = False, ids_dtype: str = "int32"
) -> Original:
    import tensorflow as tf

    v1 = tf.compat.v1
    words = ["<UNK>", *VOCAB_WORDS]
    graph = tf.Graph()
    with graph.as_default():
        cnn = TextCNN(
            SEQ_LEN, num_classes, len(words), EMBED, [3, 4, 5], 8, softmax_output, ids_dtype
        )
        train = v1.train.AdamOptimizer(1e-2).minimize(cnn.loss)
        session = v1.Session(graph=graph)
        session.run(v1.global_variables_initializer())
        rng = np.random.default_rng(0)
        for _ in range(5):  # a few real training steps with dropout on
            x = rng.integers(0, len(words), size=(16, SEQ_LEN)).astype(np.int32)
            y = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, 16)]
            session.run(train, {cnn.input_x: x, cnn.input_y: y, cnn.dropout_keep_prob: 0.5})
        outputs = ["output/scores", "output/predictions"] + (
            ["output/probs"] if softmax_output else []
        )
        frozen = v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(), outputs
        )
    directory.mkdir(parents=True, exist_ok=True)
    pb = directory / "textcnn.pb"
    pb.write_bytes(frozen.SerializeToString())
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    return Original(pb, vocab, words, session, cnn)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Original]:
    o = _train_and_freeze(tmp_path_factory.mktemp("user"))
    yield o
    o.session.close()


TEXTS = [
    "good movie",
    "bad plot , bad movie",
    "word1 word2 word3 unknownword word250 " * 20,  # longer than 56 tokens: truncated
    "",
    "Good MOVIE word7",
]


def _load(version_dir: Path) -> SessionRuntime:
    runtime = load_runtime(
        version_dir,
        store=EmbeddingStore(),
        embedding_dir=None,
        intra_op_threads=1,
        inter_op_threads=1,
    )
    assert isinstance(runtime, SessionRuntime)
    return runtime


def _import(repo: Path, original: Original, *extra: str, name: str = "textcnn") -> int:
    return main(
        [
            "import-graph",
            "--repo",
            str(repo),
            "--name",
            name,
            "--graph",
            str(original.pb),
            "--vocab",
            str(original.vocab),
            "--labels",
            "negative,positive",
            *extra,
        ]
    )


def test_import_textcnn_and_serve_softmax_of_original_logits(
    original: Original, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert _import(repo, original) == 0
    out = capsys.readouterr().out
    assert "imported textcnn version 1" in out
    assert "fixed length 56" in out

    version_dir = repo / "textcnn" / "1"
    manifest = load_model_manifest(version_dir)
    assert manifest.format is ModelFormat.IMPORTED
    assert manifest.labels == ("negative", "positive")
    assert manifest.tokenizer.fixed_len == SEQ_LEN
    assert manifest.apply_softmax is True
    assert manifest.tensors.input_ids == "input_x:0"
    assert manifest.tensors.output == "output/scores:0"
    assert manifest.tensors.dropout == "dropout_keep_prob:0"
    assert manifest.tensors.embedded == "embedding/embedding_lookup:0"
    assert manifest.vocab == "vocab.txt"
    assert set(manifest.files) == {"model.pb", "vocab.txt", "labels.txt"}
    vocab = (version_dir / "vocab.txt").read_text().splitlines()
    assert vocab[:3] == ["<pad>", "<unk>", "<UNK>"]
    assert vocab[3] == "word1"
    config = load_repository_config(repo)
    entry = config.model("textcnn")
    assert entry is not None
    assert entry.format is ModelFormat.IMPORTED
    assert entry.base_path == "textcnn"

    runtime = _load(version_dir)
    try:
        ids = runtime.tokenizer.encode_batch(TEXTS)
        assert ids.shape == (len(TEXTS), SEQ_LEN)
        got = runtime.predict(ids)
        expected = softmax(original.logits(TEXTS))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert not np.allclose(got[0], got[1]), "different texts, different answers"
        # any batch length is fitted to the graph's fixed length
        np.testing.assert_allclose(
            runtime.predict(ids[:, :10]),
            runtime.predict(np.pad(ids[:, :10], ((0, 0), (0, SEQ_LEN - 10)))),
            atol=1e-6,
        )
        assert runtime.embedding is not None
        assert runtime.embedding.rows == len(original.words) + 2
        assert runtime.own_bytes < 64 * 1024
    finally:
        runtime.close()

    # a second import is version 2; models.yaml keeps one entry
    assert _import(repo, original) == 0
    assert (repo / "textcnn" / "2" / "model.json").is_file()
    assert [m.name for m in load_repository_config(repo).models] == ["textcnn"]


def test_import_with_textserve_vocab_header_copies_the_graph(
    original: Original, tmp_path: Path
) -> None:
    vocab = tmp_path / "vocab.txt"
    header_vocab = ["<pad>", "<unk>", *VOCAB_WORDS[1:]]  # as many tokens as embedding rows
    vocab.write_text("\n".join(header_vocab) + "\n")
    repo = tmp_path / "repo"
    code = main(
        [
            "import-graph", "--repo", str(repo), "--name", "tc", "--graph", str(original.pb),
            "--vocab", str(vocab), "--labels", "neg,pos", "--version", "3",
        ]
    )  # fmt: skip
    assert code == 0
    version_dir = repo / "tc" / "3"
    assert (version_dir / "model.pb").read_bytes() == original.pb.read_bytes()
    runtime = _load(version_dir)
    try:
        # the header is taken at its word: line i is the graph's id i, no rows are added
        ids = runtime.tokenizer.encode_batch(["good movie"])
        index = {w: i for i, w in enumerate(header_vocab)}
        assert ids[0, 0] == index["good"]
        assert runtime.embedding is not None
        assert runtime.embedding.rows == len(header_vocab)
        direct = np.zeros((1, SEQ_LEN), np.int32)
        direct[0, :2] = [index["good"], index["movie"]]
        logits = original.session.run(
            original.cnn.scores, {original.cnn.input_x: direct, original.cnn.dropout_keep_prob: 1.0}
        )
        np.testing.assert_allclose(runtime.predict(ids), softmax(logits), atol=1e-5)
    finally:
        runtime.close()


def test_softmax_output_is_detected_int64_ids(tmp_path: Path) -> None:
    """A graph ending in Softmax (no numpy softmax) whose ids placeholder is int64."""
    o = _train_and_freeze(tmp_path / "user", num_classes=3, softmax_output=True, ids_dtype="int64")
    try:
        repo = tmp_path / "repo"
        code = main(
            [
                "import-graph", "--repo", str(repo), "--name", "sm", "--graph", str(o.pb),
                "--vocab", str(o.vocab), "--labels", "a,b,c", "--output", "output/probs:0",
                "--no-lowercase",
            ]
        )  # fmt: skip
        assert code == 0
        manifest = load_model_manifest(repo / "sm" / "1")
        assert manifest.apply_softmax is False
        assert manifest.tokenizer.lowercase is False
        runtime = _load(repo / "sm" / "1")
        try:
            texts = ["good movie", "bad plot word3"]
            got = runtime.predict(runtime.tokenizer.encode_batch(texts))
            probs = o.session.run(
                "output/probs:0",
                {o.cnn.input_x: o.encode(texts), o.cnn.dropout_keep_prob: 1.0},
            )
            np.testing.assert_allclose(got, probs, atol=1e-5)
        finally:
            runtime.close()
    finally:
        o.session.close()


def test_labels_from_file_and_existing_models_yaml(original: Original, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "models.yaml").write_text(
        yaml.safe_dump({"models": [{"name": "other", "base_path": "other"}]})
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("neg\npos\n\n")
    assert _import(repo, original, "--labels", str(labels), name="tc2") == 0
    config = load_repository_config(repo)
    assert [m.name for m in config.models] == ["other", "tc2"]
    assert load_model_manifest(repo / "tc2" / "1").labels == ("neg", "pos")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "a,b,c"], "3 labels given, but 'output/scores' has 2 values per text"),
        (["--output", "output/nope"], "--output node 'output/nope' not found in the graph"),
        (["--input", "nope:0"], "--input node 'nope' not found in the graph"),
        (["--dropout", "dropout/nope"], "--dropout node 'dropout/nope' not found"),
        (["--embedding-node", "output/scores"], "is not an embedding lookup"),
        (["--fixed-len", "40"], "--fixed-len 40, but 'input_x' has a fixed length of 56"),
        (["--name", "bad name!"], "--name 'bad name!'"),
        (["--labels", "a"], "need at least two labels"),
    ],
)
def test_validation_errors_are_one_line(
    original: Original,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    repo = tmp_path / "repo"
    code = _import(repo, original, *extra)
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert err.count("\n") == 1, err
    assert not (repo / "textcnn").exists() or not any((repo / "textcnn").iterdir())
    assert not (repo / "models.yaml").exists()


def test_vocab_larger_than_embedding_and_corrupt_graph(
    original: Original, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab = tmp_path / "big.txt"
    vocab.write_text("\n".join(f"t{i}" for i in range(1000)) + "\n")
    code = main(
        [
            "import-graph", "--repo", str(tmp_path / "r"), "--name", "x", "--graph",
            str(original.pb), "--vocab", str(vocab), "--labels", "a,b",
        ]
    )  # fmt: skip
    assert code == 1
    assert "1000 tokens but the graph's embedding has 304 rows" in capsys.readouterr().err
    bad = tmp_path / "bad.pb"
    bad.write_bytes(original.pb.read_bytes()[:5000])
    code = main(
        [
            "import-graph", "--repo", str(tmp_path / "r"), "--name", "x", "--graph", str(bad),
            "--vocab", str(original.vocab), "--labels", "a,b",
        ]
    )  # fmt: skip
    assert code == 1
    assert "not a valid binary GraphDef" in capsys.readouterr().err


def test_graph_tensorflow_cannot_import_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GraphDef that parses but that TensorFlow refuses to import (a MatMul without its
    ``T`` attr) is an error line, not a traceback."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        ids = v1.placeholder(tf.int32, [None, 5], name="input_x")
        table = tf.constant(np.ones((10, 4), np.float32), name="embedding/W")
        pooled = tf.reduce_mean(tf.gather(table, ids, name="embedding/lookup"), axis=1)
        tf.matmul(pooled, tf.constant(np.ones((4, 3), np.float32)), name="output/scores")
    graph_def = graph.as_graph_def()
    del next(n for n in graph_def.node if n.name == "output/scores").attr["T"]
    pb = tmp_path / "broken.pb"
    pb.write_bytes(graph_def.SerializeToString())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"w{i}" for i in range(8)) + "\n", encoding="utf-8")
    repo = tmp_path / "repo"
    code = main(
        [
            "import-graph", "--repo", str(repo), "--name", "x", "--graph", str(pb),
            "--vocab", str(vocab), "--labels", "a,b,c",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"{pb}: cannot import the graph: NodeDef missing attr 'T'" in err
    assert err.count("\n") == 1, err
    assert not (repo / "models.yaml").exists()


def test_cli_process_exit_status(original: Original, tmp_path: Path) -> None:
    """The real console command: one line on stderr, non-zero exit status."""
    textserve = Path(sys.executable).with_name("textserve")
    proc = subprocess.run(
        [
            str(textserve), "import-graph", "--repo", str(tmp_path / "r"), "--name", "x",
            "--graph", str(original.pb), "--vocab", str(original.vocab), "--labels", "a,b",
            "--output", "output/missing",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("textserve:")]
    assert errors == [
        f"textserve: error: {original.pb}: --output node 'output/missing' not found in the graph"
    ]


def test_variable_length_graph_with_min_len(tmp_path: Path) -> None:
    """input_x [None, None]: no fixed length; --min-len pads short batches for a width-4 filter."""
    import tensorflow as tf

    v1 = tf.compat.v1
    words = ["<pad>", "<unk>", *VOCAB_WORDS]
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.int32, [None, None], name="input_x")
        with tf.name_scope("embedding"):
            w = v1.Variable(v1.random_uniform([len(words), 8], -1.0, 1.0, seed=4), name="W")
            e = tf.nn.embedding_lookup(w, x)
        k = v1.Variable(v1.truncated_normal([4, 8, 5], stddev=0.3, seed=5), name="conv_W")
        h = tf.nn.relu(tf.nn.conv1d(e, k, stride=1, padding="VALID"))
        d = v1.Variable(v1.truncated_normal([5, 2], stddev=0.5, seed=6), name="dense_W")
        tf.matmul(tf.reduce_max(h, axis=1), d, name="logits")
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            frozen = v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["logits"]
            )
            index = {t: i for i, t in enumerate(words)}
            ids = np.zeros((2, 5), np.int32)
            ids[0, :1] = [index["good"]]
            ids[1, :5] = [index[t] for t in ["bad", "movie", "plot", "good", "word9"]]
            expected = softmax(session.run("logits:0", {x: ids}))
    pb = tmp_path / "var.pb"
    pb.write_bytes(frozen.SerializeToString())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    repo = tmp_path / "repo"
    code = main(
        [
            "import-graph", "--repo", str(repo), "--name", "var", "--graph", str(pb),
            "--vocab", str(vocab), "--labels", "x,y", "--output", "logits", "--min-len", "4",
        ]
    )  # fmt: skip
    assert code == 0
    manifest = load_model_manifest(repo / "var" / "1")
    assert manifest.tokenizer.fixed_len is None
    assert manifest.tokenizer.min_len == 4
    assert manifest.tensors.dropout is None
    runtime = _load(repo / "var" / "1")
    try:
        got = runtime.predict(runtime.tokenizer.encode_batch(["good", "bad movie plot good word9"]))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        alone = runtime.tokenizer.encode_batch(["good"])
        assert alone.shape == (1, 4)  # padded to --min-len, so the width-4 filter fits
        assert runtime.predict(alone).shape == (1, 2)
    finally:
        runtime.close()
