"""The memory monitor: growth at load, exact tensor attribution, sharing, the sampler."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.artifact import (
    CnnSpec,
    ModelFormat,
    ModelManifest,
    TokenizerSpec,
    load_repository_config,
)
from server.memory import MemoryMonitor, ProcessMemory, process_memory
from server.metrics import Metrics
from server.runtime.base import ProbArray, Runtime
from server.text import IdArray, Tokenizer, Vocabulary

MiB = 2**20


class TinySessionRuntime(Runtime):
    """A real TF session of the textserve CNN, fed rows gathered from a shared numpy matrix."""

    def __init__(self, spec: CnnSpec, embedding: npt.NDArray[np.float32], key: str) -> None:
        import tensorflow as tf

        from server.graph import build_cnn

        v1 = tf.compat.v1
        self.manifest = ModelManifest(
            name="tiny",
            version=1,
            format=ModelFormat.STRIPPED,
            labels=tuple(f"l{i}" for i in range(spec.num_classes)),
            tokenizer=TokenizerSpec(),
            architecture=spec,
        )
        self.tokenizer = Tokenizer(
            Vocabulary.from_words(f"w{i}" for i in range(embedding.shape[0] - 2)),
            self.manifest.tokenizer,
        )
        self._embedding = embedding
        self._key = key
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._cnn = build_cnn(spec, seed=1)
            variables = v1.trainable_variables()
            self._own = int(sum(v.shape.num_elements() * v.dtype.size for v in variables))
            self._session = v1.Session(graph=self._graph)
            self._session.run(v1.global_variables_initializer())

    def predict(self, ids: IdArray) -> ProbArray:
        rows = np.take(self._embedding, ids, axis=0)
        out: ProbArray = self._session.run(
            self._cnn.probs, {self._cnn.input_x: ids, self._cnn.embedded: rows}
        )
        return out

    @property
    def own_bytes(self) -> int:
        return self._own

    @property
    def embedding_key(self) -> str | None:
        return self._key

    def close(self) -> None:
        self._session.close()


def test_process_memory_figures() -> None:
    mem = process_memory()
    assert mem.rss > 0
    assert 0 < mem.uss <= mem.rss
    assert 0 < mem.pss <= mem.rss


def test_growth_is_measured_around_a_load() -> None:
    monitor = MemoryMonitor()
    kept: list[npt.NDArray[Any]] = []
    gc.collect()  # earlier tests' garbage must not be freed inside the window
    gc.disable()
    try:
        with monitor.track("big", 1) as tracking:
            kept.append(np.ones(256 * MiB, dtype=np.uint8))  # touched: resident and private
            tracking.attach_figures(own_bytes=kept[0].nbytes, embedding_key=None)
    finally:
        gc.enable()
    entry = monitor.get("big", 1)
    assert entry is not None
    assert entry.growth is not None
    assert 240 * MiB <= entry.growth.rss <= 280 * MiB
    # USS also moves when other processes map or unmap the libraries this one uses (on a shared
    # machine, by tens of MiB), so only its order of magnitude is checked.
    assert entry.growth.uss >= 128 * MiB
    assert entry.growth.seconds >= 0
    assert entry.own_bytes == 256 * MiB
    assert entry.attributed_bytes == 256 * MiB
    assert entry.kinds()["rss_growth"] == entry.growth.rss
    assert monitor.samples == 2  # before and after
    del kept


def test_failed_or_unattached_load_is_not_registered() -> None:
    monitor = MemoryMonitor()

    def failing_load() -> None:
        with monitor.track("m", 1) as tracking:
            tracking.attach_figures(own_bytes=10, embedding_key=None)
            raise RuntimeError("load failed")

    with pytest.raises(RuntimeError, match="load failed"):
        failing_load()
    with monitor.track("m", 2):
        pass
    assert monitor.models() == []


def test_real_tf_session_exact_tensor_bytes_and_shared_embedding() -> None:
    spec = CnnSpec(embedding_dim=32, filter_widths=(1, 2, 3), num_filters=16, num_classes=5)
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((5_000, 32)).astype(np.float32)
    key = hashlib.sha256(embedding.tobytes()).hexdigest()
    sizes = {key: embedding.nbytes}
    monitor = MemoryMonitor(embedding_sizer=sizes.get)
    runtimes = []
    try:
        for version in (1, 2):
            with monitor.track("tiny", version) as tracking:
                rt = TinySessionRuntime(spec, embedding, key)
                probs = rt.predict(rt.tokenizer.encode_batch(["w1 w2 w3", "w4"]))
                tracking.attach(rt, embedding_name="gen")
            runtimes.append(rt)
            assert probs.shape == (2, 5)
        d, f, c = 32, 16, 5
        expected_own = 4 * ((1 + 2 + 3) * d * f + 3 * f + 3 * f * c + c)
        models = monitor.models()
        assert [m.version for m in models] == [1, 2]
        for m in models:
            assert m.own_bytes == expected_own
            assert m.embedding_bytes == embedding.nbytes
            assert m.sharers == 2
            assert m.growth is not None
        assert sum(m.embedding_share for m in models) == embedding.nbytes
        report = monitor.report()
        assert report["totals"]["embedding_bytes"] == embedding.nbytes  # counted once
        assert report["totals"]["attributed_bytes"] == 2 * expected_own + embedding.nbytes
        assert report["embeddings"] == [
            {
                "key": key,
                "name": "gen",
                "bytes": embedding.nbytes,
                "models": [{"model": "tiny", "version": 1}, {"model": "tiny", "version": 2}],
            }
        ]
    finally:
        for rt in runtimes:
            rt.close()


def test_attributed_totals_add_up_and_unregister() -> None:
    monitor = MemoryMonitor()
    monitor.register("a", 1, own_bytes=100, embedding_key="E", embedding_bytes=1001)
    monitor.register("b", 1, own_bytes=200, embedding_key="E", embedding_bytes=1001)
    monitor.register("b", 2, own_bytes=250, embedding_key="E", embedding_bytes=1001)
    monitor.register("c", 3, own_bytes=300, embedding_key="F", embedding_bytes=500)
    monitor.register("d", 1, own_bytes=7, embedding_key=None)

    def check(expected_embeddings: int) -> dict[str, Any]:
        models = monitor.models()
        total = sum(m.attributed_bytes for m in models)
        assert total == sum(m.own_bytes for m in models) + expected_embeddings
        report = monitor.report()
        assert report["totals"]["attributed_bytes"] == total
        assert report["totals"]["embedding_bytes"] == expected_embeddings
        assert report["totals"]["tensor_bytes"] == total
        return {f"{m.model}:{m.version}": m for m in models}

    by = check(1001 + 500)
    assert [by[k].embedding_share for k in ("a:1", "b:1", "b:2")] == [334, 334, 333]
    assert by["a:1"].sharers == 3
    assert by["c:3"].embedding_share == 500
    assert by["d:1"].sharers == 0
    assert by["d:1"].attributed_bytes == 7

    assert monitor.unregister("b", 1)
    assert not monitor.unregister("b", 1)
    by = check(1001 + 500)
    assert [by[k].embedding_share for k in ("a:1", "b:2")] == [501, 500]
    assert by["a:1"].sharers == 2

    assert monitor.unregister("c", 3)
    by = check(1001)
    assert "c:3" not in by
    assert monitor.report()["embeddings"][0]["key"] == "E"
    assert len(monitor.report()["embeddings"]) == 1

    # A version registered again replaces its entry rather than adding a sharer.
    monitor.register("a", 1, own_bytes=1, embedding_key="E", embedding_bytes=1001)
    assert check(1001)["a:1"].sharers == 2


def test_inconsistent_or_unknown_embedding_sizes_are_refused() -> None:
    monitor = MemoryMonitor(embedding_sizer={"E": 10}.get)
    monitor.register("a", 1, own_bytes=1, embedding_key="E")
    assert monitor.models()[0].embedding_bytes == 10
    with pytest.raises(ValueError, match="registered with 10 bytes"):
        monitor.register("b", 1, own_bytes=1, embedding_key="E", embedding_bytes=11)
    with pytest.raises(ValueError, match="unknown"):
        monitor.register("c", 1, own_bytes=1, embedding_key="G")
    with pytest.raises(ValueError, match="negative"):
        monitor.register("d", 1, own_bytes=-1, embedding_key=None)
    assert [m.model for m in monitor.models()] == ["a"]


def test_track_never_fails_a_load_over_accounting(caplog: pytest.LogCaptureFixture) -> None:
    monitor = MemoryMonitor()  # no sizer: the embedding's bytes are unknown
    with monitor.track("m", 1) as tracking:
        tracking.attach_figures(own_bytes=5, embedding_key="E")
    assert monitor.models() == []
    assert "m:1 not tracked" in caplog.text


def test_sampler_runs_and_stops() -> None:
    seen: list[ProcessMemory] = []
    threads: set[str] = set()
    enough = threading.Event()

    def on_sample(monitor: MemoryMonitor, mem: ProcessMemory) -> None:
        seen.append(mem)
        threads.add(threading.current_thread().name)
        if len(seen) >= 3:
            enough.set()

    monitor = MemoryMonitor(interval_s=0.01, on_sample=on_sample)
    assert monitor.latest() is None
    assert list(monitor.process_memory()) == []
    assert monitor.report()["process"] is None
    monitor.start()
    monitor.start()  # idempotent: still one thread
    assert monitor.running
    assert enough.wait(10)
    monitor.stop()
    assert not monitor.running
    assert threads == {"textserve-memory"}
    count = monitor.samples
    time.sleep(0.1)
    assert monitor.samples == count  # really stopped
    latest = monitor.latest()
    assert latest is not None
    assert dict(monitor.process_memory()) == {
        "rss": latest.rss,
        "uss": latest.uss,
        "pss": latest.pss,
    }
    process = monitor.report()["process"]
    assert process["samples"] == count
    assert process["peak_rss_bytes"] >= process["rss_bytes"] > 0
    assert process["age_seconds"] >= 0


def test_sampler_survives_a_failing_callback_and_context_manager_stops_it() -> None:
    calls = threading.Event()

    def boom(monitor: MemoryMonitor, mem: ProcessMemory) -> None:
        calls.set()
        raise RuntimeError("callback broke")

    with MemoryMonitor(interval_s=0.01, on_sample=boom) as monitor:
        assert calls.wait(10)
        before = monitor.samples
        deadline = time.monotonic() + 10
        while monitor.samples < before + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert monitor.samples >= before + 2  # still sampling after the exception
    assert not monitor.running


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        MemoryMonitor(interval_s=0)


def test_figures_feed_the_prometheus_gauges() -> None:
    metrics = Metrics(CollectorRegistry(), tensorflow_version_="test")
    monitor = MemoryMonitor()
    monitor.register("a", 1, own_bytes=100, embedding_key="E", embedding_bytes=1000)
    monitor.register("b", 2, own_bytes=50, embedding_key="E", embedding_bytes=1000)
    monitor.sample()
    for model, version, kinds in monitor.model_memory():
        metrics.set_model_memory(model, version, kinds)
    latest = monitor.latest()
    assert latest is not None
    metrics.set_memory(latest)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        for sample in family.samples
    }
    model = "textserve_model_memory_bytes"
    assert samples[(model, (("kind", "attributed"), ("model", "a"), ("version", "1")))] == 600
    assert samples[(model, (("kind", "embedding_share"), ("model", "b"), ("version", "2")))] == 500
    assert samples[(model, (("kind", "own"), ("model", "b"), ("version", "2")))] == 50
    process = "textserve_process_memory_bytes"
    assert samples[(process, (("kind", "rss"),))] == latest.rss
    assert samples[(process, (("kind", "uss"),))] == latest.uss


def test_real_runtimes_share_one_store_embedding(small_repo: Path) -> None:
    from server.embeddings import EmbeddingStore
    from server.runtime.loader import load_runtime

    gc.collect()  # no earlier garbage freed while the first load is measured
    store = EmbeddingStore()

    def sizer(key: str) -> int | None:
        held = store.get(key)
        return None if held is None else held.nbytes

    monitor = MemoryMonitor(embedding_sizer=sizer)
    config = load_repository_config(small_repo)
    (emb,) = config.embeddings
    runtimes = []
    try:
        for model, version in (("noun-topic", 1), ("verb-topic", 2), ("pos", 1)):
            with monitor.track(model, version) as tracking:
                rt = load_runtime(
                    small_repo / model / str(version),
                    store=store,
                    embedding_dir=small_repo / emb.path,
                    intra_op_threads=1,
                    inter_op_threads=1,
                )
                runtimes.append(rt)
                rt.predict(rt.tokenizer.encode_batch(["a small test", "of memory"]))
                tracking.attach(rt, embedding_name=emb.name)
        (held,) = store.embeddings()
        models = monitor.models()
        assert [m.sharers for m in models] == [3, 3, 3]
        assert {m.embedding_bytes for m in models} == {held.nbytes}
        for m, rt in zip(models, sorted(runtimes, key=lambda r: r.manifest.name), strict=True):
            assert m.own_bytes == rt.own_bytes > 0
        totals = monitor.report()["totals"]
        assert totals["embedding_bytes"] == held.nbytes
        assert totals["attributed_bytes"] == sum(rt.own_bytes for rt in runtimes) + held.nbytes
        # The first load mapped and hashed the embedding file: its pages became resident. Read
        # from the mapping itself: the process total also moves with unrelated frees (glibc
        # handing heap back during the load), which made a growth >= size check flaky.
        first = monitor.get("noun-topic", 1)
        assert first is not None
        assert first.growth is not None
        assert held.source is not None
        source = held.source.resolve()
        resident = sum(
            m.rss
            for m in psutil.Process().memory_maps(grouped=True)
            if Path(m.path).parent == source
        )
        assert resident >= 0.9 * held.nbytes
        runtimes.pop().close()
        assert monitor.unregister("pos", 1)
        assert [m.sharers for m in monitor.models()] == [2, 2]
    finally:
        for rt in runtimes:
            rt.close()
