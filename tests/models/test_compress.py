"""Compression strategies: float16 / int8 / vocabulary-pruned embeddings, magnitude pruning."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from models import compress
from server.artifact import (
    EMBEDDINGS_DIR,
    MATRIX_NPY,
    OOV_ID,
    PAD_ID,
    SCALES_NPY,
    VOCAB_TXT,
    CnnSpec,
    EmbeddingConfig,
    EmbeddingDtype,
    EmbeddingManifest,
    EmbeddingRef,
    ModelConfig,
    ModelFormat,
    ModelManifest,
    RepositoryConfig,
    TokenizerSpec,
    load_embedding_manifest,
    load_model_manifest,
    load_repository_config,
    write_embedding_manifest,
    write_model_manifest,
    write_repository_config,
)
from server.cli import main
from server.errors import ArtifactError, UsageError
from server.text import Vocabulary, tokenize

F32 = npt.NDArray[np.float32]


def write_f32_embedding(repo: Path, name: str, matrix: F32, words: list[str]) -> EmbeddingManifest:
    """A float32 artifact written the plain way (np.save + sha256 of the C-order bytes)."""
    d = repo / EMBEDDINGS_DIR / name
    d.mkdir(parents=True)
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    np.save(d / MATRIX_NPY, matrix, allow_pickle=False)
    Vocabulary.from_words(words).save(d / VOCAB_TXT)
    manifest = EmbeddingManifest(
        name=name,
        rows=matrix.shape[0],
        dim=matrix.shape[1],
        dtype=EmbeddingDtype.FLOAT32,
        sha256=hashlib.sha256(matrix.tobytes()).hexdigest(),
        source="test",
    )
    write_embedding_manifest(d, manifest)
    return manifest


def sample_matrix(rows: int = 203, dim: int = 24, seed: int = 0) -> F32:
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal((rows, dim)) * rng.uniform(0.01, 3.0, (rows, 1))).astype(np.float32)
    m[0] = 0.0  # PAD: an all-zero row
    m[5] = 0.0
    m[6, 3] = -40.0  # one large outlier in a row
    m[7] = 1e-30  # tiny but non-zero (scale underflow territory)
    return m


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    matrix = sample_matrix()
    write_f32_embedding(r, "base", matrix, [f"w{i}" for i in range(matrix.shape[0] - 2)])
    write_repository_config(
        r,
        RepositoryConfig(
            models=(ModelConfig(name="m", base_path="m"),),
            embeddings=(EmbeddingConfig(name="base", path="embeddings/base"),),
        ),
    )
    return r


def load_npy(path: Path) -> npt.NDArray[Any]:
    a: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    return a


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_dequantization_within_half_a_step(repo: Path) -> None:
    src = load_npy(repo / "embeddings/base/matrix.npy")
    result = compress.to_int8(repo, "base", chunk_rows=16)
    q = load_npy(result.path / MATRIX_NPY)
    scales = load_npy(result.path / SCALES_NPY)
    assert q.dtype == np.int8
    assert scales.dtype == np.float32
    assert scales.shape == (src.shape[0],)
    assert np.all(np.abs(q.astype(np.int16)) <= 127)
    deq = compress.dequantize_int8(q, scales)
    err = np.abs(deq.astype(np.float64) - src.astype(np.float64))
    bound = scales.astype(np.float64)[:, None] / 2
    # float32 arithmetic adds a few ulps of the value itself on top of the half step.
    assert np.all(err <= bound * (1 + 1e-5) + np.abs(src) * 1e-6)
    # Every non-zero row uses the full range: its largest element maps to ±127.
    nonzero = np.any(src != 0, axis=1)
    assert np.all(np.max(np.abs(q[nonzero].astype(np.int16)), axis=1) == 127)
    # And the error is not trivially zero: quantization really happened.
    assert err.max() > 0


def test_int8_all_zero_row_is_safe() -> None:
    rows = np.zeros((3, 5), dtype=np.float32)
    rows[2] = [1, -2, 0.5, 0, 3]
    q, scales = compress.quantize_rows_int8(rows)
    assert scales[0] == 0.0
    assert scales[1] == 0.0
    assert np.all(q[:2] == 0)
    deq = compress.dequantize_int8(q, scales)
    assert np.all(np.isfinite(deq))
    assert np.all(deq[:2] == 0.0)
    assert scales[2] == pytest.approx(3 / 127)
    assert q[2].tolist() == [42, -85, 21, 0, 127]


def test_int8_manifest_and_hash(repo: Path) -> None:
    src = load_embedding_manifest(repo / "embeddings/base")
    result = compress.to_int8(repo, "base")
    manifest = load_embedding_manifest(result.path)  # validates
    assert manifest == result.manifest
    assert manifest.dtype is EmbeddingDtype.INT8
    q = load_npy(result.path / MATRIX_NPY)
    scales = load_npy(result.path / SCALES_NPY)
    expected = hashlib.sha256(q.tobytes() + scales.tobytes()).hexdigest()
    assert manifest.sha256 == expected
    assert manifest.source_sha256 == src.sha256
    assert manifest.compatible_with(EmbeddingRef(name="base", sha256=src.sha256))
    assert not manifest.compatible_with(EmbeddingRef(name="x", sha256="0" * 64))
    assert manifest.files == {
        MATRIX_NPY: (result.path / MATRIX_NPY).stat().st_size,
        SCALES_NPY: (result.path / SCALES_NPY).stat().st_size,
        VOCAB_TXT: (result.path / VOCAB_TXT).stat().st_size,
    }
    assert (result.path / VOCAB_TXT).read_bytes() == (
        repo / "embeddings/base/vocab.txt"
    ).read_bytes()
    assert result.ram_bytes == q.nbytes + scales.nbytes
    assert result.source_ram_bytes == src.rows * src.dim * 4


def test_chunking_does_not_change_the_result(repo: Path) -> None:
    a = compress.to_int8(repo, "base", "a", chunk_rows=7, register=False)
    b = compress.to_int8(repo, "base", "b", chunk_rows=100_000, register=False)
    assert a.manifest.sha256 == b.manifest.sha256
    c = compress.to_float16(repo, "base", "c", chunk_rows=3, register=False)
    d = compress.to_float16(repo, "base", "d", register=False)
    assert c.manifest.sha256 == d.manifest.sha256


# ---------------------------------------------------------------------------------------------
# float16


def test_float16_within_float16_rounding(repo: Path) -> None:
    src = load_npy(repo / "embeddings/base/matrix.npy")
    result = compress.to_float16(repo, "base", chunk_rows=10)
    half = load_npy(result.path / MATRIX_NPY)
    assert half.dtype == np.float16
    assert half.shape == src.shape
    # Round-to-nearest: at most half a float16 ulp away (subnormals: half the smallest step).
    ulp = np.spacing(np.abs(half).astype(np.float16)).astype(np.float64)
    err = np.abs(half.astype(np.float64) - src.astype(np.float64))
    assert np.all(err <= ulp / 2 * (1 + 1e-6))
    normal = np.abs(src) >= np.finfo(np.float16).tiny
    assert np.all(err[normal] <= np.abs(src[normal]) * 2.0**-11)
    manifest = load_embedding_manifest(result.path)
    assert manifest.dtype is EmbeddingDtype.FLOAT16
    assert manifest.sha256 == hashlib.sha256(half.tobytes()).hexdigest()
    assert manifest.source_sha256 == load_embedding_manifest(repo / "embeddings/base").sha256
    assert result.ram_bytes * 2 == result.source_ram_bytes


def test_float16_overflow_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    m = np.ones((4, 3), dtype=np.float32)
    m[3, 1] = 1e6
    write_f32_embedding(tmp_path, "big", m, ["a", "b"])
    with pytest.raises(ArtifactError, match="overflow float16"):
        compress.to_float16(tmp_path, "big")
    assert sorted(p.name for p in (tmp_path / EMBEDDINGS_DIR).iterdir()) == ["big"]


def test_corrupt_source_is_detected(repo: Path) -> None:
    path = repo / "embeddings/base/matrix.npy"
    m = load_npy(path)
    m[100, 0] += 1.0
    np.save(path, m)
    with pytest.raises(ArtifactError, match="sha256"):
        compress.to_int8(repo, "base")
    assert not (repo / "embeddings/base-int8").exists()
    assert load_repository_config(repo).embedding("base-int8") is None


def test_non_float32_source_is_refused(repo: Path) -> None:
    compress.to_int8(repo, "base")
    with pytest.raises(ArtifactError, match="float32 source"):
        compress.to_float16(repo, "base-int8")


def test_existing_artifact_needs_overwrite(repo: Path) -> None:
    compress.to_float16(repo, "base")
    with pytest.raises(ArtifactError, match="already exists"):
        compress.to_float16(repo, "base")
    again = compress.to_float16(repo, "base", overwrite=True)
    assert load_embedding_manifest(again.path) == again.manifest


# ---------------------------------------------------------------------------------------------
# models.yaml


def test_registration_and_override(repo: Path) -> None:
    result = compress.to_int8(repo, "base", "base-q", use_for=["m"])
    config = load_repository_config(repo)
    entry = config.embedding("base-q")
    assert entry is not None
    assert entry.dtype is EmbeddingDtype.INT8
    assert load_embedding_manifest(repo / entry.path) == result.manifest
    model = config.model("m")
    assert model is not None
    assert model.embedding == "base-q"
    assert config.embedding("base") is not None  # the source entry stays
    with pytest.raises(ArtifactError, match="no model"):
        compress.to_float16(repo, "base", use_for=["nope"])


# ---------------------------------------------------------------------------------------------
# vocabulary pruning


def test_vocab_pruning_keeps_top_n_and_maps_the_rest_to_oov(repo: Path) -> None:
    src_vocab = Vocabulary.load(repo / "embeddings/base/vocab.txt")
    src = load_npy(repo / "embeddings/base/matrix.npy")
    # w10 x5, w3 x4, w50 x4 (tie: lower id first), w7 x2, w99 x1, unknown words ignored.
    texts = [
        "w10 w10 w3 w50 zzz",
        "W10 w3 w50 w7 qqq qqq qqq",
        "w10 w10 w3 w3 w50 w50 w7 w99",
    ]
    result = compress.prune_vocabulary(repo, "base", texts, keep=3, chunk_rows=2)
    vocab = Vocabulary.load(result.path / VOCAB_TXT)
    kept = ["w3", "w10", "w50"]  # in original id order
    assert vocab.tokens == ["<pad>", "<unk>", *kept]
    matrix = load_npy(result.path / MATRIX_NPY)
    assert matrix.dtype == np.float32
    for new_id, token in enumerate(vocab.tokens):
        assert np.array_equal(matrix[new_id], src[src_vocab.tokens.index(token)])
    for word in ["w7", "w99", "zzz", "w0"]:
        assert vocab.id(word) == OOV_ID
    assert vocab.id("<pad>") == PAD_ID
    manifest = load_embedding_manifest(result.path)
    assert manifest.rows == 5
    assert manifest.sha256 == hashlib.sha256(matrix.tobytes()).hexdigest()
    assert manifest.source_sha256 == load_embedding_manifest(repo / "embeddings/base").sha256
    rec = result.record()
    assert rec["corpus_tokens"] == 20
    assert rec["coverage_before"] == pytest.approx(16 / 20)
    assert rec["coverage_after"] == pytest.approx(13 / 20)
    # w3 and w50 tie at 4: the lower original id wins.
    tie = compress.prune_vocabulary(repo, "base", texts, keep=2, register=False)
    assert Vocabulary.load(tie.path / VOCAB_TXT).tokens[2:] == ["w3", "w10"]


def test_vocab_pruning_fills_from_lowest_ids_when_corpus_is_small(repo: Path) -> None:
    result = compress.prune_vocabulary(repo, "base", ["w40 w40 w2"], keep=4, register=False)
    vocab = Vocabulary.load(result.path / VOCAB_TXT)
    assert vocab.tokens == ["<pad>", "<unk>", "w0", "w1", "w2", "w40"]


def test_vocab_pruning_of_int8_keeps_scales(repo: Path) -> None:
    base = compress.to_int8(repo, "base")
    q_src = load_npy(base.path / MATRIX_NPY)
    s_src = load_npy(base.path / SCALES_NPY)
    result = compress.prune_vocabulary(repo, "base-int8", ["w5 w5 w1"], keep=2)
    q = load_npy(result.path / MATRIX_NPY)
    s = load_npy(result.path / SCALES_NPY)
    order = [0, 1, 3, 7]  # PAD, OOV, w1 (id 3), w5 (id 7)
    assert np.array_equal(q, q_src[order])
    assert np.array_equal(s, s_src[order])
    manifest = load_embedding_manifest(result.path)
    assert manifest.dtype is EmbeddingDtype.INT8
    assert manifest.sha256 == hashlib.sha256(q.tobytes() + s.tobytes()).hexdigest()
    # The chain's root: the float32 matrix the models were trained with.
    assert manifest.source_sha256 == load_embedding_manifest(repo / "embeddings/base").sha256


def test_vocab_pruning_rejects_bad_keep(repo: Path) -> None:
    with pytest.raises(UsageError):
        compress.prune_vocabulary(repo, "base", ["w1"], keep=0)


# ---------------------------------------------------------------------------------------------
# magnitude pruning

SPEC = CnnSpec(embedding_dim=16, filter_widths=(1, 2, 3), num_filters=64, num_classes=4)
KERNELS = ("conv-maxpool-1/W", "conv-maxpool-2/W", "conv-maxpool-3/W", "output/W")
BIASES = ("conv-maxpool-1/b", "conv-maxpool-2/b", "conv-maxpool-3/b", "output/b")


def _cnn_version(repo: Path, version: int, fmt: ModelFormat) -> Path:
    """A real CNN (server.graph) saved as a stripped checkpoint or a frozen GraphDef."""
    import tensorflow as tf

    from server.graph import build_cnn

    v1 = tf.compat.v1
    d = repo / "m" / str(version)
    d.mkdir(parents=True)
    graph = tf.Graph()
    with graph.as_default():
        cnn = build_cnn(SPEC, seed=3)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            if fmt is ModelFormat.STRIPPED:
                v1.train.Saver(var_list=v1.trainable_variables()).save(
                    sess, str(d / "model.ckpt"), write_meta_graph=False, write_state=False
                )
            else:
                frozen = v1.graph_util.convert_variables_to_constants(
                    sess, graph.as_graph_def(), [cnn.probs.op.name]
                )
                (d / "model.pb").write_bytes(frozen.SerializeToString())
    (d / "notes.txt").write_text("copied as is\n")
    write_model_manifest(
        d,
        ModelManifest(
            name="m",
            version=version,
            format=fmt,
            labels=("a", "b", "c", "d"),
            tokenizer=TokenizerSpec(),
            architecture=SPEC,
            metrics={"accuracy": 0.9},
        ),
    )
    return d


def _read_ckpt(d: Path) -> dict[str, npt.NDArray[Any]]:
    return compress.read_checkpoint(d / "model.ckpt")


def _read_frozen(d: Path) -> dict[str, npt.NDArray[Any]]:
    import tensorflow as tf

    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString((d / "model.pb").read_bytes())
    return {n.name: tf.make_ndarray(n.attr["value"].tensor) for n in gd.node if n.op == "Const"}


def test_prune_array_exact_count_with_ties() -> None:
    w = np.array([[0.5, -0.5, 0.5], [0.1, -0.5, 0.5]], dtype=np.float32)
    out = compress.prune_array(w, 0.5)
    assert np.count_nonzero(out == 0) == 3
    assert out[1, 0] == 0  # the smallest goes first
    assert np.count_nonzero(w == 0) == 0  # input untouched
    with pytest.raises(UsageError):
        compress.prune_array(w, 1.0)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_prune_stripped_checkpoint(tmp_path: Path, sparsity: float) -> None:
    src_dir = _cnn_version(tmp_path, 1, ModelFormat.STRIPPED)
    before = _read_ckpt(src_dir)
    result = compress.prune_model(tmp_path, "m", sparsity)
    assert result.version == 2
    after = _read_ckpt(result.path)
    assert sorted(after) == sorted(before)
    for name in KERNELS:
        w0, w1 = before[name], after[name]
        zeros = int(np.count_nonzero(w1 == 0))
        assert abs(zeros - sparsity * w0.size) <= 1, name
        kept = w1 != 0
        assert np.array_equal(w1[kept], w0[kept])  # survivors unchanged
        # Every zeroed entry is no larger in magnitude than every survivor.
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
        assert result.tensors[name] == (zeros, w0.size)
    for name in BIASES:
        assert np.array_equal(after[name], before[name])
    total = sum(before[n].size for n in KERNELS)
    assert result.sparsity == pytest.approx(sparsity, abs=len(KERNELS) / total)
    # The zip experiment: same raw size, smaller once compressed.
    assert result.sizes.raw == pytest.approx(result.source_sizes.raw, rel=0.01)
    assert result.sizes.gzip < result.source_sizes.gzip * (1 - sparsity / 2)
    assert result.sizes.zip < result.source_sizes.zip
    data = next(result.path.glob("model.ckpt.data-*"))
    assert result.sizes.gzip < result.source_sizes.gzip
    assert len(gzip.compress(data.read_bytes())) < len(
        gzip.compress(next(src_dir.glob("model.ckpt.data-*")).read_bytes())
    )
    manifest = load_model_manifest(result.path)
    assert manifest.version == 2
    assert manifest.format is ModelFormat.STRIPPED
    assert manifest.architecture == SPEC
    assert "accuracy" not in manifest.metrics
    assert manifest.metrics["prune_sparsity"] == result.sparsity
    assert manifest.metrics["disk_bytes_gzip"] == result.sizes.gzip
    assert manifest.metrics["source_disk_bytes_gzip"] == result.source_sizes.gzip
    assert manifest.files == {
        p.name: p.stat().st_size for p in result.path.iterdir() if p.name != "model.json"
    }
    assert (result.path / "notes.txt").read_text() == "copied as is\n"
    assert load_model_manifest(src_dir).version == 1  # source untouched


def test_pruned_checkpoint_restores_into_the_serving_graph(tmp_path: Path) -> None:
    import tensorflow as tf

    from server.graph import build_cnn

    _cnn_version(tmp_path, 1, ModelFormat.STRIPPED)
    result = compress.prune_model(tmp_path, "m", 0.8)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        cnn = build_cnn(SPEC)
        with v1.Session(graph=graph) as sess:
            v1.train.Saver(var_list=v1.trainable_variables()).restore(
                sess, str(result.path / "model.ckpt")
            )
            (w_out,) = [v for v in v1.trainable_variables() if v.op.name == "output/W"]
            kernel = sess.run(w_out)
            ids = np.array([[2, 3, 4, 0]], dtype=np.int32)
            emb = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
            probs = sess.run(cnn.probs, {cnn.input_x: ids, cnn.embedded: emb})
    assert np.count_nonzero(kernel == 0) == round(0.8 * kernel.size)
    assert probs.shape == (1, 4)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_prune_frozen_graph_global_scope(tmp_path: Path) -> None:
    src_dir = _cnn_version(tmp_path, 3, ModelFormat.FROZEN)
    before = _read_frozen(src_dir)
    result = compress.prune_model(tmp_path, "m", 0.9, scope="global")
    assert result.version == 4
    after = _read_frozen(result.path)
    total = sum(before[n].size for n in KERNELS)
    zeros = sum(int(np.count_nonzero(after[n] == 0)) for n in KERNELS)
    assert abs(zeros - 0.9 * total) <= 1
    # One threshold across layers (a layer may lose all its weights: that is global pruning).
    zeroed = np.concatenate([np.abs(before[n][after[n] == 0]) for n in KERNELS])
    kept = np.concatenate([np.abs(before[n][after[n] != 0]) for n in KERNELS])
    assert zeroed.max() <= kept.min()
    per_layer = [np.count_nonzero(after[n] == 0) / after[n].size for n in KERNELS]
    assert max(per_layer) - min(per_layer) > 0.05  # really global, not per layer
    for name in BIASES:
        assert np.array_equal(after[name], before[name])
    assert result.sizes.gzip < result.source_sizes.gzip
    assert load_model_manifest(result.path).format is ModelFormat.FROZEN


def test_prune_errors(tmp_path: Path) -> None:
    _cnn_version(tmp_path, 1, ModelFormat.STRIPPED)
    with pytest.raises(ArtifactError, match="no version 7"):
        compress.prune_model(tmp_path, "m", 0.5, version=7)
    with pytest.raises(ArtifactError, match="already has version 1"):
        compress.prune_model(tmp_path, "m", 0.5, new_version=1)
    with pytest.raises(UsageError):
        compress.prune_model(tmp_path, "m", 1.5)
    with pytest.raises(ArtifactError, match="no directory"):
        compress.prune_model(tmp_path, "ghost", 0.5)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_embedding_strategies(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = repo.parent / "corpus.txt"
    corpus.write_text("w1 w2 w2\nw3 w3 w3\n")
    assert main(["compress", "--repo", str(repo), "--json", "int8", "--embedding", "base"]) == 0
    assert main(["compress", "--repo", str(repo), "--json", "float16", "--embedding", "base"]) == 0
    argv = ["compress", "--repo", str(repo), "--json", "vocab", "--embedding", "base"]
    assert main([*argv, "--keep", "2", "--corpus", str(corpus), "--use-for", "m"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == ["base-int8", "base-float16", "base-top2"]
    assert [r["dtype"] for r in records] == ["int8", "float16", "float32"]
    config = load_repository_config(repo)
    assert {e.name for e in config.embeddings} == {"base", "base-int8", "base-float16", "base-top2"}
    model = config.model("m")
    assert model is not None
    assert model.embedding == "base-top2"
    assert Vocabulary.load(repo / "embeddings/base-top2/vocab.txt").tokens[2:] == ["w2", "w3"]


def test_cli_prune_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _cnn_version(tmp_path, 1, ModelFormat.STRIPPED)
    argv = ["compress", "--repo", str(tmp_path), "--json", "prune", "--model", "m"]
    assert main([*argv, "--sparsity", "0.5", "0.9"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["source_version"], r["version"]) for r in records] == [(1, 2), (1, 3)]
    assert records[1]["disk_bytes"]["gzip"] < records[0]["disk_bytes"]["gzip"]
    assert main([*argv, "--sparsity", "2"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["compress", "--repo", str(tmp_path), "int8"]) == 2  # --embedding missing


# ---------------------------------------------------------------------------------------------
# Round trips through the serving side: EmbeddingStore lookups and load_runtime predictions


def test_store_lookup_of_each_strategy_matches_float32(repo: Path) -> None:
    from server.embeddings import EmbeddingStore

    store = EmbeddingStore()
    base = store.acquire(repo / "embeddings/base")
    ids = np.array([[0, 1, 2, 5, 6, 7], [200, 150, 100, 50, 8, 9]], dtype=np.int32)
    exact = base.lookup(ids)
    src = load_npy(repo / "embeddings/base/matrix.npy")
    assert np.array_equal(exact, src[ids])

    half = store.acquire(compress.to_float16(repo, "base").path)
    got = half.lookup(ids)
    assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0**-11 + 2.0**-24)

    q = store.acquire(compress.to_int8(repo, "base").path)
    assert q.matrix.dtype == np.int8  # kept int8 in RAM; only gathered rows dequantized
    assert q.nbytes == q.matrix.nbytes + src.shape[0] * 4
    got = q.lookup(ids)
    assert q.scales is not None
    bound = q.scales[ids][..., None] / 2
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-5) + np.abs(exact) * 1e-6)

    result = compress.prune_vocabulary(repo, "base", ["w3 w100 w3"], keep=2)
    pruned = store.acquire(result.path)
    vocab = Vocabulary.load(result.path / VOCAB_TXT)
    src_vocab = Vocabulary.load(repo / "embeddings/base/vocab.txt")
    words = ["w3", "w100", "w7", "<pad>"]
    new_rows = pruned.lookup(np.array([vocab.ids(words)], dtype=np.int32))[0]
    old_rows = base.lookup(np.array([src_vocab.ids(words)], dtype=np.int32))[0]
    assert np.array_equal(new_rows[[0, 1, 3]], old_rows[[0, 1, 3]])
    assert np.array_equal(new_rows[2], src[OOV_ID])  # w7 was not kept: the OOV row


@pytest.fixture(scope="module")
def demo_repo(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared small_repo (compression writes into it)."""
    import shutil

    repo = tmp_path_factory.mktemp("compress") / "repo"
    shutil.copytree(small_repo, repo)
    return repo


@pytest.fixture(scope="module")
def test_texts() -> dict[str, tuple[str, ...]]:
    from models.demo import load_demo_datasets

    return {name: ds.test.texts for name, ds in load_demo_datasets(quick=True).items()}


def _predict(
    repo: Path, model: str, version: int, embedding: str, texts: tuple[str, ...]
) -> npt.NDArray[np.float32]:
    from server.embeddings import EmbeddingStore
    from server.runtime.loader import load_runtime

    runtime = load_runtime(
        repo / model / str(version),
        store=EmbeddingStore(),
        embedding_dir=repo / EMBEDDINGS_DIR / embedding,
        intra_op_threads=1,
        inter_op_threads=1,
    )
    try:
        return runtime.predict(runtime.tokenizer.encode_batch(list(texts)))
    finally:
        runtime.close()


def test_each_embedding_strategy_serves_the_exported_models(
    demo_repo: Path, test_texts: dict[str, tuple[str, ...]]
) -> None:
    from models.demo import QUICK_EMBEDDING

    names = list(test_texts)
    f16 = compress.to_float16(demo_repo, QUICK_EMBEDDING, use_for=names)
    i8 = compress.to_int8(demo_repo, QUICK_EMBEDDING)
    everything = [t for texts in test_texts.values() for t in texts]
    vocab = Vocabulary.load(demo_repo / EMBEDDINGS_DIR / QUICK_EMBEDDING / VOCAB_TXT)
    known = {i for t in everything for i in vocab.ids(tokenize(t))} - {OOV_ID}
    full_vocab = compress.prune_vocabulary(
        demo_repo, QUICK_EMBEDDING, everything, keep=len(known), name="test-vocab"
    )
    small_vocab = compress.prune_vocabulary(demo_repo, QUICK_EMBEDDING, everything, keep=300)
    assert full_vocab.manifest.rows == len(known) + 2
    assert full_vocab.manifest.rows < 0.5 * full_vocab.source.rows
    for model, texts in test_texts.items():
        for version in (1, 2):  # stripped and frozen
            ref = _predict(demo_repo, model, version, QUICK_EMBEDDING, texts)
            top = ref.argmax(axis=1)
            p16 = _predict(demo_repo, model, version, f16.name, texts)
            assert np.abs(p16 - ref).max() < 2e-3, model
            assert np.mean(p16.argmax(axis=1) == top) >= 0.99
            p8 = _predict(demo_repo, model, version, i8.name, texts)
            assert np.abs(p8 - ref).max() < 0.05, model
            assert np.mean(p8.argmax(axis=1) == top) >= 0.95  # near-ties of a weak model
            # Every word of these texts kept: bit-identical rows, identical probabilities.
            pv = _predict(demo_repo, model, version, full_vocab.name, texts)
            np.testing.assert_allclose(pv, ref, rtol=0, atol=1e-6)
            ps = _predict(demo_repo, model, version, small_vocab.name, texts)
            assert ps.shape == ref.shape
            assert np.allclose(ps.sum(axis=1), 1.0, atol=1e-5)
    config = load_repository_config(demo_repo)
    assert all(m.embedding == f16.name for m in config.models)


def test_pruned_versions_serve_and_agree_across_formats(
    demo_repo: Path, test_texts: dict[str, tuple[str, ...]]
) -> None:
    from models.demo import QUICK_EMBEDDING

    model = "pos"
    texts = test_texts[model]
    ref = _predict(demo_repo, model, 1, QUICK_EMBEDDING, texts)
    same = compress.prune_model(demo_repo, model, 0.0, version=1)
    np.testing.assert_allclose(
        _predict(demo_repo, model, same.version, QUICK_EMBEDDING, texts), ref, rtol=0, atol=1e-6
    )
    from_stripped = compress.prune_model(demo_repo, model, 0.5, version=1)
    from_frozen = compress.prune_model(demo_repo, model, 0.5, version=2)
    assert from_stripped.format is ModelFormat.STRIPPED
    assert from_frozen.format is ModelFormat.FROZEN
    a = _predict(demo_repo, model, from_stripped.version, QUICK_EMBEDDING, texts)
    b = _predict(demo_repo, model, from_frozen.version, QUICK_EMBEDDING, texts)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # same weights, same zeros
    assert not np.allclose(a, ref, atol=1e-3)  # pruning really changed the model
    assert from_stripped.sizes.gzip < from_stripped.source_sizes.gzip
    assert from_frozen.sizes.gzip < from_frozen.source_sizes.gzip
