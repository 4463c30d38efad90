"""Runtimes over real TensorFlow: every format answers what the original graph answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.artifact import EMBEDDINGS_DIR, CnnSpec, EmbeddingRef, ModelFormat, TensorNames
from server.embeddings import EmbeddingStore
from server.errors import ArtifactError, BadRequest, ModelNotReady
from server.memory import process_memory
from server.runtime.loader import load_runtime
from server.runtime.session_runtime import SessionRuntime
from tests.server.tf_models import (
    TrainedCnn,
    embedding_ref,
    export_frozen_external,
    export_selfcontained,
    export_stripped,
    make_cnn,
    quantize_int8,
    random_matrix,
    sample_ids,
    sha256_of,
    weight_bytes,
    write_embedding,
    write_manifest,
    write_vocab,
)

ROWS, DIM = 400, 16
SPEC = CnnSpec(embedding_dim=DIM, filter_widths=(1, 2, 3), num_filters=8, num_classes=4)
MiB = 1024 * 1024


@dataclass
class SmallRepo:
    repo: Path
    emb_dir: Path
    ref: EmbeddingRef
    cnn: TrainedCnn
    matrix: np.ndarray

    def version(self, model: str, version: int = 1) -> Path:
        return self.repo / model / str(version)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallRepo]:
    repo = tmp_path_factory.mktemp("repo")
    matrix = random_matrix(ROWS, DIM, seed=3)
    emb_dir = write_embedding(repo, "demo", matrix)
    ref = embedding_ref(emb_dir)
    cnn = make_cnn(SPEC, matrix, seed=5)
    s = SmallRepo(repo, emb_dir, ref, cnn, matrix)
    export_stripped(cnn, s.version("stripped"))
    write_manifest(
        s.version("stripped"), name="stripped", fmt=ModelFormat.STRIPPED, spec=SPEC, embedding=ref
    )
    export_frozen_external(cnn, s.version("frozen"))
    write_manifest(
        s.version("frozen"), name="frozen", fmt=ModelFormat.FROZEN, spec=SPEC, embedding=ref
    )
    export_selfcontained(cnn, s.version("selfcontained"))
    write_vocab(s.version("selfcontained") / "vocab.txt", ROWS)
    write_manifest(
        s.version("selfcontained"),
        name="selfcontained",
        fmt=ModelFormat.FROZEN_SELFCONTAINED,
        spec=SPEC,
        vocab="vocab.txt",
    )
    yield s
    cnn.close()


def _load(path: Path, store: EmbeddingStore, embedding_dir: Path | None) -> SessionRuntime:
    runtime = load_runtime(
        path, store=store, embedding_dir=embedding_dir, intra_op_threads=1, inter_op_threads=1
    )
    assert isinstance(runtime, SessionRuntime)
    return runtime


@pytest.mark.parametrize(
    ("model", "external"),
    [("stripped", True), ("frozen", True), ("selfcontained", False)],
)
def test_runtime_matches_original_graph(small: SmallRepo, model: str, external: bool) -> None:
    store = EmbeddingStore()
    runtime = _load(small.version(model), store, small.emb_dir if external else None)
    try:
        for seed, (batch, length) in enumerate([(8, 12), (1, 1), (3, 40), (64, 5)]):
            ids = sample_ids(ROWS, seed=seed, batch=batch, length=length)
            expected = small.cnn.probs(np.maximum(ids, 0)) if length >= 3 else None
            got = runtime.predict(ids)
            assert got.dtype == np.float32
            assert got.shape == (batch, 4)
            if expected is not None:
                np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
            else:  # shorter than the widest filter: the runtime pads to min_len
                padded = np.zeros((batch, 3), np.int32)
                padded[:, :length] = ids
                np.testing.assert_allclose(got, small.cnn.probs(padded), atol=1e-5, rtol=0)
        assert np.allclose(runtime.predict(sample_ids(ROWS)).sum(axis=1), 1.0, atol=1e-5)
        assert runtime.embedding_key == sha256_of(small.matrix)
        own = weight_bytes(small.cnn)
        if model == "stripped":
            assert runtime.own_bytes == own
        else:  # frozen graphs also hold a few scalar constants (axes, shapes)
            assert own <= runtime.own_bytes < own + 4096
        assert runtime.tokenizer.encode("w5 w7 zzz") == [5, 7, 1]
    finally:
        runtime.close()
    assert len(store) == 0


def test_predict_on_text_through_tokenizer(small: SmallRepo) -> None:
    store = EmbeddingStore()
    runtime = _load(small.version("stripped"), store, small.emb_dir)
    try:
        ids = runtime.tokenizer.encode_batch(["w3 w4 w5 w9", "w12", "nothing known here"])
        np.testing.assert_allclose(runtime.predict(ids), small.cnn.probs(ids), atol=1e-5)
    finally:
        runtime.close()


def test_selfcontained_shares_the_artifact_and_drops_its_copy(small: SmallRepo) -> None:
    store = EmbeddingStore()
    a = _load(small.version("stripped"), store, small.emb_dir)
    b = _load(small.version("selfcontained"), store, None)
    c = _load(small.version("frozen"), store, small.emb_dir)
    try:
        assert a.embedding is b.embedding is c.embedding
        assert a.embedding is not None
        assert a.embedding.users == 3
        assert len(store) == 1
        assert isinstance(a.embedding.matrix.base, np.memmap)  # the artifact's mapping is kept
        ids = sample_ids(ROWS)
        expected = small.cnn.probs(ids)
        for r in (a, b, c):
            np.testing.assert_allclose(r.predict(ids), expected, atol=1e-5)
    finally:
        a.close()
        b.close()
        assert c.embedding is not None
        assert c.embedding.users == 1
        c.close()
    assert len(store) == 0
    c.close()  # idempotent
    with pytest.raises(ModelNotReady):
        c.predict(sample_ids(ROWS))


def test_selfcontained_with_int8_override(small: SmallRepo, tmp_path: Path) -> None:
    """An int8 copy made from the graph's matrix replaces the graph's own embedding."""
    q, scales = quantize_int8(small.matrix)
    int8_dir = write_embedding(
        tmp_path, "demo-int8", q, scales=scales, source_sha256=small.ref.sha256
    )
    store = EmbeddingStore()
    runtime = _load(small.version("selfcontained"), store, int8_dir)
    try:
        assert runtime.embedding is not None
        assert runtime.embedding.dtype.value == "int8"
        assert runtime.embedding.nbytes == q.nbytes + scales.nbytes
        ids = sample_ids(ROWS)
        dequantized = make_cnn(SPEC, q.astype(np.float32) * scales[:, None], seed=5)
        try:
            np.testing.assert_allclose(runtime.predict(ids), dequantized.probs(ids), atol=1e-5)
        finally:
            dequantized.close()
        # and it is close to the float32 model (quantisation error only)
        np.testing.assert_allclose(runtime.predict(ids), small.cnn.probs(ids), atol=0.02)
    finally:
        runtime.close()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_stripped_over_compressed_embedding(small: SmallRepo, tmp_path: Path, dtype: str) -> None:
    if dtype == "float16":
        half = small.matrix.astype(np.float16)
        emb_dir = write_embedding(tmp_path, "demo-f16", half, source_sha256=small.ref.sha256)
        effective = half.astype(np.float32)
    else:
        q, scales = quantize_int8(small.matrix)
        emb_dir = write_embedding(
            tmp_path, "demo-int8", q, scales=scales, source_sha256=small.ref.sha256
        )
        effective = q.astype(np.float32) * scales[:, None]
    store = EmbeddingStore()
    runtime = _load(small.version("stripped"), store, emb_dir)
    reference = make_cnn(SPEC, effective, seed=5)
    try:
        ids = sample_ids(ROWS, batch=16, length=20)
        np.testing.assert_allclose(runtime.predict(ids), reference.probs(ids), atol=1e-5)
    finally:
        reference.close()
        runtime.close()


def test_concurrent_predicts_from_threads(small: SmallRepo) -> None:
    store = EmbeddingStore()
    runtimes = [
        _load(small.version("stripped"), store, small.emb_dir),
        _load(small.version("selfcontained"), store, None),
    ]
    batches = [sample_ids(ROWS, seed=s, batch=4 + s % 5, length=5 + s) for s in range(12)]
    expected = [small.cnn.probs(b) for b in batches]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                for i, b in enumerate(batches):
                    got = runtimes[(i + k) % 2].predict(b)
                    np.testing.assert_allclose(got, expected[i], atol=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in runtimes:
        r.close()
    assert not errors, errors[0]


def test_bad_ids_are_bad_requests(small: SmallRepo) -> None:
    store = EmbeddingStore()
    runtime = _load(small.version("stripped"), store, small.emb_dir)
    try:
        with pytest.raises(BadRequest, match="outside"):
            runtime.predict(np.array([[2, ROWS]], dtype=np.int32))
        with pytest.raises(BadRequest, match="outside"):
            runtime.predict(np.array([[-1, 3]], dtype=np.int64))
        with pytest.raises(BadRequest, match=r"\[batch, length\]"):
            runtime.predict(np.array([2, 3], dtype=np.int32))
        assert runtime.predict(np.zeros((0, 5), np.int32)).shape == (0, 4)
    finally:
        runtime.close()


# -- one copy of a large embedding ---------------------------------------------------------------


def test_two_runtimes_hold_one_copy_of_a_large_embedding(small: SmallRepo, tmp_path: Path) -> None:
    """Two models over a 100k x 300 (120 MB) embedding: one buffer, RSS grows by far less."""
    rows, dim = 100_000, 300
    matrix = random_matrix(rows, dim, seed=11)
    emb_dir = write_embedding(tmp_path, "big", matrix)
    ref = embedding_ref(emb_dir)
    del matrix
    spec = CnnSpec(embedding_dim=dim, filter_widths=(1, 2, 3), num_filters=16, num_classes=4)
    weights_src = make_cnn(spec, random_matrix(ROWS, dim, seed=1), seed=2)
    for model in ("m1", "m2"):
        export_stripped(weights_src, tmp_path / model / "1")
        write_manifest(
            tmp_path / model / "1", name=model, fmt=ModelFormat.STRIPPED, spec=spec, embedding=ref
        )
    weights_src.close()

    store = EmbeddingStore()
    first = _load(tmp_path / "m1" / "1", store, emb_dir)
    ids = sample_ids(rows, batch=64, length=50)
    first.predict(ids)
    before = process_memory().rss
    second = _load(tmp_path / "m2" / "1", store, emb_dir)
    second.predict(ids)
    growth = process_memory().rss - before
    try:
        assert first.embedding is second.embedding
        assert first.embedding is not None
        assert second.embedding is not None
        assert np.shares_memory(first.embedding.matrix, second.embedding.matrix)
        size = first.embedding.nbytes
        assert size == rows * dim * 4
        print(f"\nRSS growth, 2nd model: {growth / MiB:.1f} MiB (embedding {size / MiB:.0f} MiB)")
        assert growth < size / 2, (
            f"RSS grew {growth / MiB:.0f} MiB for a {size / MiB:.0f} MiB embedding"
        )
    finally:
        first.close()
        second.close()
    assert len(store) == 0


# -- errors ----------------------------------------------------------------------------------------


def _copy_version(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_pb(small: SmallRepo, tmp_path: Path) -> None:
    for model, emb in (("frozen", small.emb_dir), ("selfcontained", None)):
        version = _copy_version(small.version(model), tmp_path / model / "1")
        pb = version / "model.pb"
        data = pb.read_bytes()
        pb.write_bytes(data[: len(data) // 2])
        store = EmbeddingStore()
        with pytest.raises(ArtifactError, match=r"model\.pb: not a valid binary GraphDef"):
            _load(version, store, emb)
        pb.write_bytes(b"\x00\xff" * 1000)
        with pytest.raises(ArtifactError, match=r"model\.pb"):
            _load(version, store, emb)
        pb.unlink()
        with pytest.raises(ArtifactError, match=r"model\.pb: graph file not found"):
            _load(version, store, emb)
        assert len(store) == 0, "a failed load must release the embedding"


def test_truncated_checkpoint(small: SmallRepo, tmp_path: Path) -> None:
    version = _copy_version(small.version("stripped"), tmp_path / "m" / "1")
    (data_file,) = version.glob("model.ckpt.data-*")
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) // 3])
    store = EmbeddingStore()
    with pytest.raises(ArtifactError, match=r"model\.ckpt: cannot restore checkpoint"):
        _load(version, store, small.emb_dir)
    assert len(store) == 0
    (version / "model.ckpt.index").unlink()
    with pytest.raises(ArtifactError, match=r"model\.ckpt\.index: checkpoint not found"):
        _load(version, store, small.emb_dir)


def test_checkpoint_for_another_architecture(small: SmallRepo, tmp_path: Path) -> None:
    version = _copy_version(small.version("stripped"), tmp_path / "m" / "1")
    other = SPEC.model_copy(update={"num_filters": 9})
    write_manifest(version, name="m", fmt=ModelFormat.STRIPPED, spec=other, embedding=small.ref)
    with pytest.raises(ArtifactError, match=r"has shape .* in the checkpoint"):
        _load(version, EmbeddingStore(), small.emb_dir)


def test_missing_embedding(small: SmallRepo, tmp_path: Path) -> None:
    store = EmbeddingStore()
    with pytest.raises(ArtifactError, match="reads a shared embedding, but none was given"):
        _load(small.version("stripped"), store, None)
    with pytest.raises(ArtifactError, match=r"embedding\.json: not found"):
        _load(small.version("stripped"), store, tmp_path / EMBEDDINGS_DIR / "nope")
    emb = _copy_version(small.emb_dir, tmp_path / "emb")
    (emb / "matrix.npy").unlink()
    with pytest.raises(ArtifactError, match=r"matrix\.npy: embedding matrix not found"):
        _load(small.version("frozen"), store, emb)
    assert len(store) == 0


def test_wrong_shape_embedding(small: SmallRepo, tmp_path: Path) -> None:
    emb = _copy_version(small.emb_dir, tmp_path / "emb")
    np.save(emb / "matrix.npy", small.matrix[:, :8].copy())
    with pytest.raises(
        ArtifactError, match=r"shape \(400, 8\) but embedding.json says \(400, 16\)"
    ):
        _load(small.version("stripped"), EmbeddingStore(), emb)


def test_incompatible_embedding(small: SmallRepo, tmp_path: Path) -> None:
    other = write_embedding(tmp_path, "other", random_matrix(ROWS, DIM, seed=99))
    with pytest.raises(ArtifactError, match="not made from it"):
        _load(small.version("stripped"), EmbeddingStore(), other)
    with pytest.raises(ArtifactError, match="is not the one embedding 'other' was made from"):
        _load(small.version("selfcontained"), EmbeddingStore(), other)


def test_labels_count_differs_from_output(small: SmallRepo, tmp_path: Path) -> None:
    for model, emb in (("stripped", small.emb_dir), ("selfcontained", None)):
        version = _copy_version(small.version(model), tmp_path / model / "1")
        write_manifest(
            version,
            name=model,
            fmt=ModelFormat.STRIPPED if model == "stripped" else ModelFormat.FROZEN_SELFCONTAINED,
            spec=SPEC,
            labels=("a", "b", "c"),
            embedding=small.ref if emb else None,
            vocab=None if emb else "vocab.txt",
        )
        store = EmbeddingStore()
        with pytest.raises(
            ArtifactError, match=r"outputs \(4,\) values per text but model\.json has 3 labels"
        ):
            _load(version, store, emb)
        assert len(store) == 0


def test_frozen_graph_missing_node(small: SmallRepo, tmp_path: Path) -> None:
    version = _copy_version(small.version("frozen"), tmp_path / "m" / "1")
    write_manifest(
        version,
        name="m",
        fmt=ModelFormat.FROZEN,
        spec=SPEC,
        embedding=small.ref,
        tensors=TensorNames(output="output/nope:0"),
    )
    with pytest.raises(ArtifactError, match="node 'output/nope' not found"):
        _load(version, EmbeddingStore(), small.emb_dir)
    write_manifest(
        version,
        name="m",
        fmt=ModelFormat.FROZEN,
        spec=SPEC,
        embedding=small.ref,
        tensors=TensorNames(output="output/probs:3"),
    )
    store = EmbeddingStore()
    with pytest.raises(ArtifactError, match="the graph has no tensor 'output/probs:3'"):
        _load(version, store, small.emb_dir)
    assert len(store) == 0


def test_unservable_format(small: SmallRepo, tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    write_manifest(version, name="m", fmt=ModelFormat.CHECKPOINT, spec=SPEC, embedding=small.ref)
    with pytest.raises(ArtifactError, match="not servable"):
        _load(version, EmbeddingStore(), small.emb_dir)


# -- a self-contained graph with a seed-scale embedding -----------------------------------------

BIG_ROWS, BIG_DIM = 220_000, 300
"""The seed's scale (265 MB float32). Loading it naively costs ~15-25 s of the test's ~50 s."""

_NAIVE = r"""
import json, statistics, sys, time
import numpy as np
import tensorflow as tf
from server.memory import process_memory

v1 = tf.compat.v1
pb, rows = sys.argv[1], int(sys.argv[2])
ids = np.random.default_rng(1).integers(2, rows, size=(64, 50)).astype(np.int32)
before = process_memory().rss
graph_def = v1.GraphDef()
with open(pb, "rb") as f:
    graph_def.ParseFromString(f.read())
graph = tf.Graph()
with graph.as_default():
    v1.import_graph_def(graph_def, name="")
del graph_def
config = v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
session = v1.Session(graph=graph, config=config)
loaded = process_memory().rss
t = time.perf_counter()
session.run("output/probs:0", {"input_x:0": ids})
first = time.perf_counter() - t
after_first = process_memory().rss
runs = []
for _ in range(15):
    t = time.perf_counter()
    session.run("output/probs:0", {"input_x:0": ids})
    runs.append(time.perf_counter() - t)
print(json.dumps({"first_s": first, "steady_s": statistics.median(runs),
                  "load_growth": loaded - before, "growth": after_first - before}))
"""

_TEXTSERVE = r"""
import json, statistics, sys, time
from pathlib import Path
import numpy as np
import tensorflow as tf
from server.embeddings import EmbeddingStore
from server.memory import process_memory
from server.runtime.loader import load_runtime

version_dir, emb_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
store = EmbeddingStore()
held = store.acquire(emb_dir) if mode == "shared" else None
ids = np.random.default_rng(1).integers(2, 1000, size=(64, 50)).astype(np.int32)
before = process_memory().rss
firsts = []
for attempt in range(3):  # load, first predict; twice more after closing (noise on 2 cores)
    t = time.perf_counter()
    runtime = load_runtime(version_dir, store=store, embedding_dir=None,
                           intra_op_threads=2, inter_op_threads=1)
    load_s = time.perf_counter() - t
    loaded = process_memory().rss
    t = time.perf_counter()
    runtime.predict(ids)
    firsts.append(time.perf_counter() - t)
    if attempt == 0:
        result = {"load_s": load_s, "load_growth": loaded - before,
                  "growth": process_memory().rss - before, "own_bytes": runtime.own_bytes,
                  "embedding_bytes": runtime.embedding.nbytes,
                  "shared": runtime.embedding is held, "store_size": len(store)}
        runs = []
        for _ in range(15):
            t = time.perf_counter()
            runtime.predict(ids)
            runs.append(time.perf_counter() - t)
        result["steady_s"] = statistics.median(runs)
    runtime.close()
result["first_s"] = firsts[0]
result["median_first_s"] = statistics.median(firsts)
print(json.dumps(result))
"""


def _run_script(script: str, *args: str) -> dict[str, float]:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _write_big_selfcontained(version_dir: Path, matrix: np.ndarray, spec: CnnSpec) -> None:
    """model.pb with ``matrix`` frozen in as the ``embedding/W`` constant, the seed's way.

    The small graph is frozen by TensorFlow; the big constant's NodeDef is serialized on its
    own and appended (concatenated GraphDefs merge their repeated ``node`` field), so the
    test process never holds the graph twice.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        table = v1.placeholder(tf.float32, matrix.shape, name="embedding/W")
        build_cnn_with_table(spec, table)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            small_gd = v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["output/probs", "output/predictions"]
            )
    kept = v1.GraphDef()
    kept.versions.CopyFrom(small_gd.versions)
    for node in small_gd.node:
        if node.name != "embedding/W":
            kept.node.add().CopyFrom(node)
    const = v1.GraphDef()
    node = const.node.add()
    node.name = "embedding/W"
    node.op = "Const"
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    node.attr["value"].tensor.dtype = tf.float32.as_datatype_enum
    node.attr["value"].tensor.tensor_shape.CopyFrom(tf.TensorShape(matrix.shape).as_proto())
    node.attr["value"].tensor.tensor_content = matrix.tobytes()
    version_dir.mkdir(parents=True)
    with open(version_dir / "model.pb", "wb") as f:
        f.write(kept.SerializeToString())
        f.write(const.SerializeToString())


def build_cnn_with_table(spec: CnnSpec, table: object) -> None:
    import tensorflow as tf

    from server.graph import build_cnn

    build_cnn(spec, lookup=lambda x: tf.gather(table, x), seed=4)


def test_large_selfcontained_graph_naive_vs_textserve(tmp_path: Path) -> None:
    """(a) naive import: slow, huge first run; (b) textserve: fast first predict, small growth."""
    spec = CnnSpec(embedding_dim=BIG_DIM, filter_widths=(1, 2, 3), num_filters=128, num_classes=4)
    matrix = random_matrix(BIG_ROWS, BIG_DIM, seed=21)
    emb_dir = write_embedding(tmp_path, "seed", matrix)
    version = tmp_path / "seed-model" / "1"
    _write_big_selfcontained(version, matrix, spec)
    del matrix
    write_vocab(version / "vocab.txt", 1000)
    write_manifest(
        version,
        name="seed-model",
        fmt=ModelFormat.FROZEN_SELFCONTAINED,
        spec=spec,
        vocab="vocab.txt",
    )
    emb_bytes = BIG_ROWS * BIG_DIM * 4

    import time

    t = time.perf_counter()
    naive = _run_script(_NAIVE, str(version / "model.pb"), str(BIG_ROWS))
    t_naive = time.perf_counter() - t
    shared = _run_script(_TEXTSERVE, str(version), str(emb_dir), "shared")
    alone = _run_script(_TEXTSERVE, str(version), str(emb_dir), "alone")
    t_ts = time.perf_counter() - t - t_naive
    print(f"\nnaive subprocess {t_naive:.1f} s, two textserve subprocesses {t_ts:.1f} s")

    def line(what: str, r: dict[str, float]) -> str:
        return (
            f"\n{what}: first {r['first_s'] * 1e3:.1f} ms"
            + (f" (median of 3 loads {r['median_first_s'] * 1e3:.1f})" if "load_s" in r else "")
            + f", steady {r['steady_s'] * 1e3:.1f} ms, "
            f"RSS +{r['growth'] / MiB:.1f} MiB (+{r['load_growth'] / MiB:.1f} MiB after load)"
            + (f", load {r['load_s']:.2f} s" if "load_s" in r else "")
        )

    print(
        line("naive import_graph_def + Session", naive)
        + line("textserve, embedding already in the store", shared)
        + line("textserve, embedding not in the store", alone)
        + f"\nembedding {emb_bytes / MiB:.0f} MiB, own weights {shared['own_bytes'] / MiB:.2f} MiB"
    )
    # (a) the effect exists: a first run many times slower than steady state, and a lot of RSS
    assert naive["first_s"] > 10 * naive["steady_s"]
    assert naive["growth"] > 2 * emb_bytes
    # (b) textserve: the first predict is an ordinary one, and no second copy of the matrix
    for result in (shared, alone):
        # The first predict after each of 3 loads, median: one sample is at the mercy of the
        # other processes on 2 cores (quiet: first 17.0 ms vs steady 15.9 ms; under a load
        # average of 12 single first predicts measured 2-10x). The very first predict of the
        # process gets a loose bound that still fails the naive way (~1000x).
        assert result["median_first_s"] <= 3 * result["steady_s"]
        assert result["first_s"] <= 20 * result["steady_s"]
        assert result["embedding_bytes"] == emb_bytes
        assert result["store_size"] == 1
    assert shared["shared"] is True
    own = shared["own_bytes"]
    assert 0 < own < 4 * MiB
    # growth = own weights + TensorFlow's first session in a process (~35 MiB measured; a
    # further model costs ~3 MiB): far from the 252 MiB a copy of the embedding would add
    assert shared["growth"] < own + 64 * MiB
    assert alone["growth"] < emb_bytes + own + 64 * MiB


# -- the toolchain's repository -------------------------------------------------------------------


def test_small_repo_every_format_one_embedding(small_repo: Path) -> None:
    """The demo repository (toolchain exporters): stripped, frozen and self-contained versions
    of one model agree with the self-contained graph run naively, over one shared embedding."""
    import tensorflow as tf

    from server.artifact import load_repository_config

    config = load_repository_config(small_repo)
    (emb_config,) = config.embeddings
    emb_dir = small_repo / emb_config.path
    store = EmbeddingStore()
    runtimes: dict[str, SessionRuntime] = {}
    try:
        for model in config.models:
            for version in (1, 2):
                path = small_repo / model.base_path / str(version)
                runtimes[f"{model.name}/{version}"] = _load(path, store, emb_dir)
        selfcontained = small_repo / "unlisted" / "noun-topic-selfcontained" / "1"
        runtimes["selfcontained"] = _load(selfcontained, store, None)
        assert len(store) == 1
        shared = runtimes["selfcontained"].embedding
        assert shared is not None
        assert shared.users == len(runtimes)
        assert all(r.embedding is shared for r in runtimes.values())

        texts = [
            "a domesticated carnivorous mammal with a long snout",
            "move fast by using one's feet",
            "the act of running",
            "zzzz qqqq",
        ]
        noun = runtimes["noun-topic/1"]
        ids = noun.tokenizer.encode_batch(texts)
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((selfcontained / "model.pb").read_bytes())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            naive = session.run("output/probs:0", {"input_x:0": ids})
        for key in ("noun-topic/1", "noun-topic/2", "selfcontained"):
            np.testing.assert_allclose(runtimes[key].predict(ids), naive, atol=1e-5)
        for model in config.models:
            a = runtimes[f"{model.name}/1"]
            b = runtimes[f"{model.name}/2"]
            model_ids = a.tokenizer.encode_batch(texts)
            np.testing.assert_allclose(a.predict(model_ids), b.predict(model_ids), atol=1e-5)
            assert a.own_bytes > 0
            assert a.own_bytes <= b.own_bytes < a.own_bytes + 4096
    finally:
        for r in runtimes.values():
            r.close()
    assert len(store) == 0
