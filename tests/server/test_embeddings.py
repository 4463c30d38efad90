"""The process-wide embedding store: loading, validation, sharing, lookups, thread safety."""

from __future__ import annotations

import gc
import json
import statistics
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.artifact import CnnSpec
from server.embeddings import (
    ALIGNMENT,
    EmbeddingStore,
    SharedEmbedding,
    aligned_empty,
)
from server.errors import ArtifactError, BadRequest
from tests.server.tf_models import quantize_int8, random_matrix, sha256_of, write_embedding

ROWS, DIM = 300, 12


def _ids(rows: int = ROWS, shape: tuple[int, int] = (5, 7), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, rows, size=shape).astype(np.int32)


@pytest.fixture
def matrix() -> np.ndarray:
    return random_matrix(ROWS, DIM, seed=7)


def test_float32_artifact_is_mapped_and_looked_up(tmp_path: Path, matrix: np.ndarray) -> None:
    directory = write_embedding(tmp_path, "e32", matrix)
    store = EmbeddingStore()
    emb = store.acquire(directory)
    assert (emb.name, emb.rows, emb.dim, emb.dtype.value) == ("e32", ROWS, DIM, "float32")
    assert emb.sha256 == sha256_of(matrix)
    assert emb.nbytes == matrix.nbytes
    assert isinstance(emb.matrix.base, np.memmap)
    assert not emb.matrix.flags.writeable
    ids = _ids()
    rows = emb.lookup(ids)
    assert rows.dtype == np.float32
    assert rows.shape == (5, 7, DIM)
    assert rows.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(rows, matrix[ids])
    store.release(emb)


def test_float16_rows_are_cast_after_gathering(tmp_path: Path, matrix: np.ndarray) -> None:
    half = matrix.astype(np.float16)
    emb = EmbeddingStore().acquire(write_embedding(tmp_path, "e16", half))
    assert emb.dtype.value == "float16"
    assert emb.nbytes == half.nbytes
    ids = _ids()
    np.testing.assert_array_equal(emb.lookup(ids), half[ids].astype(np.float32))


def test_int8_rows_are_dequantized_with_row_scales(tmp_path: Path, matrix: np.ndarray) -> None:
    q, scales = quantize_int8(matrix)
    emb = EmbeddingStore().acquire(write_embedding(tmp_path, "e8", q, scales=scales))
    assert emb.dtype.value == "int8"
    assert emb.nbytes == q.nbytes + scales.nbytes
    assert emb.sha256 == sha256_of(q, scales)
    ids = _ids()
    expected = q[ids].astype(np.float32) * scales[ids][..., None]
    np.testing.assert_array_equal(emb.lookup(ids), expected)
    assert np.abs(emb.lookup(ids) - matrix[ids]).max() <= scales.max() / 2 + 1e-7


def test_reference_counting_frees_the_last_user(tmp_path: Path, matrix: np.ndarray) -> None:
    directory = write_embedding(tmp_path, "e", matrix)
    store = EmbeddingStore()
    a = store.acquire(directory)
    b = store.acquire(directory)
    assert a is b
    assert a.users == 2
    assert len(store) == 1
    assert a.sha256 in store
    store.release(a)
    assert b.users == 1
    assert store.get(b.sha256) is b
    store.release(b)
    assert len(store) == 0
    assert store.get(a.sha256) is None
    with pytest.raises(ValueError, match="not held"):
        store.release(a)
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None, "the store must not keep a released embedding alive"


def test_register_array_reuses_the_artifact_with_the_same_bytes(
    tmp_path: Path, matrix: np.ndarray
) -> None:
    store = EmbeddingStore()
    artifact = store.acquire(write_embedding(tmp_path, "e", matrix))
    from_graph = matrix.copy()
    shared = store.register_array(from_graph, name="graph/embedding/W")
    assert shared is artifact
    assert shared.users == 2
    assert not np.shares_memory(shared.matrix, from_graph), "the graph's copy is not kept"
    other = store.register_array(matrix + 1)
    assert other.name == f"graph-{other.sha256[:12]}"
    assert other is not artifact
    assert other.sha256 == sha256_of(matrix + 1)
    assert len(store) == 2
    assert store.nbytes == 2 * matrix.nbytes
    again = store.register_array(matrix + 1, name="other-again")
    assert again is other
    assert again.users == 2
    for emb in (shared, artifact, other, again):
        store.release(emb)
    assert len(store) == 0


def test_register_array_rejects_non_matrices() -> None:
    store = EmbeddingStore()
    with pytest.raises(ArtifactError, match="2-D float32"):
        store.register_array(np.zeros((3, 4), np.int32), name="x")
    with pytest.raises(ArtifactError, match="2-D float32"):
        store.register_array(np.zeros(4, np.float32), name="x")


def test_lookup_checks_ids_and_out(tmp_path: Path, matrix: np.ndarray) -> None:
    emb = EmbeddingStore().acquire(write_embedding(tmp_path, "e", matrix))
    with pytest.raises(BadRequest, match=f"token id {ROWS} outside"):
        emb.lookup(np.array([[1, ROWS]]))
    with pytest.raises(BadRequest, match="token id -3 outside"):
        emb.lookup(np.array([[-3, 1]]))
    with pytest.raises(BadRequest, match="integers"):
        emb.lookup(np.array([[1.0]]))
    with pytest.raises(ValueError, match="out must be"):
        emb.lookup(np.array([[1, 2]]), out=np.empty((1, 2, DIM + 1), np.float32))
    assert emb.lookup(np.zeros((0, 4), np.int32)).shape == (0, 4, DIM)
    out = aligned_empty((2, 3, DIM))
    ids = _ids(shape=(2, 3))
    assert emb.lookup(ids, out=out) is out
    np.testing.assert_array_equal(out, matrix[ids])
    np.testing.assert_array_equal(emb.lookup(ids.astype(np.int64)), matrix[ids])


def test_shared_embedding_rejects_inconsistent_parts(matrix: np.ndarray) -> None:
    with pytest.raises(ArtifactError, match="go with int8"):
        SharedEmbedding(name="x", sha256="0", matrix=matrix, scales=np.ones(ROWS, np.float32))
    q, _ = quantize_int8(matrix)
    with pytest.raises(ArtifactError, match="go with int8"):
        SharedEmbedding(name="x", sha256="0", matrix=q)


# -- validation -----------------------------------------------------------------------------------


def _manifest(directory: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((directory / "embedding.json").read_text())
    return data


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    data = _manifest(directory)
    data.update(changes)
    (directory / "embedding.json").write_text(json.dumps(data))


def test_missing_files(tmp_path: Path, matrix: np.ndarray) -> None:
    store = EmbeddingStore()
    with pytest.raises(ArtifactError, match=r"embedding\.json: not found"):
        store.acquire(tmp_path / "nowhere")
    directory = write_embedding(tmp_path, "e", matrix)
    (directory / "matrix.npy").unlink()
    with pytest.raises(ArtifactError, match=r"matrix\.npy: embedding matrix not found"):
        store.acquire(directory)
    q, scales = quantize_int8(matrix)
    d8 = write_embedding(tmp_path, "e8", q, scales=scales)
    (d8 / "scales.npy").unlink()
    with pytest.raises(ArtifactError, match=r"scales\.npy: int8 scales not found"):
        store.acquire(d8)
    assert len(store) == 0


def test_wrong_shape_and_dtype(tmp_path: Path, matrix: np.ndarray) -> None:
    store = EmbeddingStore()
    directory = write_embedding(tmp_path, "e", matrix)
    np.save(directory / "matrix.npy", matrix[:-1])
    with pytest.raises(
        ArtifactError, match=r"shape \(299, 12\) but embedding\.json says \(300, 12\)"
    ):
        store.acquire(directory)
    np.save(directory / "matrix.npy", matrix.astype(np.float64))
    with pytest.raises(ArtifactError, match=r"dtype float64 but embedding\.json says float32"):
        store.acquire(directory)
    np.save(directory / "matrix.npy", matrix)
    _rewrite_manifest(directory, dtype="float16")
    with pytest.raises(ArtifactError, match=r"dtype float32 but embedding\.json says float16"):
        store.acquire(directory)
    q, scales = quantize_int8(matrix)
    d8 = write_embedding(tmp_path, "e8", q, scales=scales)
    np.save(d8 / "scales.npy", scales[:10])
    with pytest.raises(ArtifactError, match=r"expected float32 \(300,\), got float32 \(10,\)"):
        store.acquire(d8)
    assert len(store) == 0


def test_corrupt_npy_files(tmp_path: Path, matrix: np.ndarray) -> None:
    store = EmbeddingStore()
    directory = write_embedding(tmp_path, "e", matrix)
    path = directory / "matrix.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"matrix\.npy: not a readable \.npy"):
        store.acquire(directory)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match=r"matrix\.npy: not a readable \.npy"):
        store.acquire(directory)
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ArtifactError, match=r"matrix\.npy: not a readable \.npy"):
        store.acquire(directory)
    np.save(path, np.asfortranarray(matrix))
    with pytest.raises(ArtifactError, match="C order"):
        store.acquire(directory)
    (directory / "embedding.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        store.acquire(directory)


def test_hash_is_verified_unless_turned_off(tmp_path: Path, matrix: np.ndarray) -> None:
    directory = write_embedding(tmp_path, "e", matrix)
    tampered = matrix.copy()
    tampered[17, 3] += 1.0
    np.save(directory / "matrix.npy", tampered)
    with pytest.raises(ArtifactError, match=r"does not match embedding\.json"):
        EmbeddingStore().acquire(directory)
    emb = EmbeddingStore(verify=False).acquire(directory)
    assert emb.lookup(np.array([[17]]))[0, 0, 3] == tampered[17, 3]
    emb2 = EmbeddingStore().acquire(directory, verify=False)
    assert emb2.rows == ROWS
    q, scales = quantize_int8(matrix)
    d8 = write_embedding(tmp_path, "e8", q, scales=scales)
    np.save(d8 / "scales.npy", scales * 2)
    with pytest.raises(ArtifactError, match="does not match"):
        EmbeddingStore().acquire(d8)


def test_same_sha_with_other_shape_is_refused(tmp_path: Path, matrix: np.ndarray) -> None:
    store = EmbeddingStore()
    store.acquire(write_embedding(tmp_path / "a", "e", matrix))
    other = write_embedding(tmp_path / "b", "e", matrix.reshape(ROWS // 2, DIM * 2).copy())
    _rewrite_manifest(other, sha256=sha256_of(matrix))
    with pytest.raises(ArtifactError, match="same sha256 as loaded embedding"):
        store.acquire(other, verify=False)


# -- threads ---------------------------------------------------------------------------------------


def test_concurrent_acquire_release_and_lookup(tmp_path: Path, matrix: np.ndarray) -> None:
    dirs = [write_embedding(tmp_path, f"e{i}", matrix + i) for i in range(3)]
    store = EmbeddingStore()
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work(k: int) -> None:
        try:
            barrier.wait()
            for n in range(40):
                i = (k + n) % 3
                emb = store.acquire(dirs[i])
                ids = _ids(seed=k * 100 + n)
                np.testing.assert_array_equal(emb.lookup(ids), matrix[ids] + i)
                store.release(emb)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert len(store) == 0


def test_held_matrices_are_aligned_without_copying_mapped_files(tmp_path: Path) -> None:
    matrix = random_matrix(ROWS, DIM, seed=3)
    raw = np.empty(matrix.nbytes + 8, dtype=np.uint8)
    start = 4 if (raw.ctypes.data + 4) % ALIGNMENT else 8
    unaligned = raw[start : start + matrix.nbytes].view(np.float32).reshape(matrix.shape)
    unaligned[...] = matrix
    assert unaligned.ctypes.data % ALIGNMENT != 0
    store = EmbeddingStore(verify=False)
    emb = store.register_array(unaligned, name="cut")
    assert emb.matrix.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(emb.matrix, matrix)
    store.release(emb)

    emb = store.acquire(write_embedding(tmp_path, "file", matrix))
    assert emb.matrix.ctypes.data % ALIGNMENT == 0
    assert isinstance(emb.matrix.base, np.memmap), "a mapped artifact is used in place"
    store.release(emb)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_in_session_lookup_matches_the_numpy_reference(tmp_path: Path, dtype: str) -> None:
    import tensorflow as tf

    from server.runtime.lookup import add_lookup

    matrix = random_matrix(ROWS, DIM, seed=4)
    store = EmbeddingStore()
    if dtype == "int8":
        q, scales = quantize_int8(matrix)
        directory = write_embedding(tmp_path, "m", q, scales=scales)
    else:
        directory = write_embedding(tmp_path, "m", matrix.astype(dtype))
    emb = store.acquire(directory)
    assert emb.dtype.value == dtype
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.compat.v1.placeholder(tf.int32, [None, None])
        lookup = add_lookup(emb, ids)
    with tf.compat.v1.Session(graph=graph) as sess:
        x = np.random.default_rng(1).integers(0, ROWS, size=(5, 7)).astype(np.int32)
        got = sess.run(lookup.rows, {ids: x, **dict(lookup.feeds)})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb.lookup(x))
    store.release(emb)


# -- speed: fed rows vs an in-graph gather --------------------------------------------------------


def test_fed_matrix_is_not_copied_per_run_at_seed_scale() -> None:
    """220k x 300 embedding, batch 64 x 50, 2 intra threads: the runtime's lookup (the whole
    shared matrix fed each run) against a gather from a variable the session owns. Measured
    interleaved; medians. TensorFlow copying the fed 252 MiB (an unaligned or non-contiguous
    array) would cost tens of ms per run and fail this by far."""
    import tensorflow as tf

    from server.graph import build_cnn
    from server.runtime.lookup import Lookup, add_lookup

    v1 = tf.compat.v1
    rows, dim = 220_000, 300
    big = random_matrix(rows, dim, seed=5)
    store = EmbeddingStore(verify=False)
    emb = store.register_array(big, name="seed")
    spec = CnnSpec(embedding_dim=dim, filter_widths=(1, 2, 3), num_filters=128, num_classes=4)
    config = v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)

    in_graph = tf.Graph()
    with in_graph.as_default():
        init_value = v1.placeholder(tf.float32, big.shape)
        table = v1.get_variable("embedding/W", initializer=init_value, trainable=False)
        net_a = build_cnn(spec, lookup=lambda x: tf.gather(table, x), seed=1)
        init_a = v1.global_variables_initializer()
    fed = tf.Graph()
    lookups: list[Lookup] = []

    def remember(lookup: Lookup) -> Any:
        lookups.append(lookup)
        return lookup.rows

    with fed.as_default():
        net_b = build_cnn(spec, lookup=lambda x: remember(add_lookup(emb, x)), seed=1)
        init_b = v1.global_variables_initializer()
    sess_a = v1.Session(graph=in_graph, config=config)
    sess_b = v1.Session(graph=fed, config=config)
    sess_a.run(init_a, {init_value: big})
    sess_b.run(init_b)
    del big
    run_a = sess_a.make_callable(net_a.probs, [net_a.input_x])
    ((placeholder, matrix),) = lookups[0].feeds
    run_b = sess_b.make_callable(net_b.probs, [net_b.input_x, placeholder])
    ids = np.random.default_rng(2).integers(2, rows, size=(64, 50)).astype(np.int32)

    def graph_gather() -> np.ndarray:
        out: np.ndarray = run_a(ids)
        return out

    def fed_matrix() -> np.ndarray:
        out: np.ndarray = run_b(ids, matrix)
        return out

    np.testing.assert_allclose(graph_gather(), fed_matrix(), atol=1e-5)
    times: dict[str, list[float]] = {"variable": [], "fed matrix": []}
    for _ in range(40):
        for name, fn in (("variable", graph_gather), ("fed matrix", fed_matrix)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        "\nbatch 64x50 over 220k x 300, 2 intra threads (median ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
    )
    sess_a.close()
    sess_b.close()
    store.release(emb)
    assert med["fed matrix"] < 1.5 * med["variable"]
