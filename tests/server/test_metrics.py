"""server/metrics.py on real prometheus-client registries, linted by the real promtool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server import __version__
from server.batching import Batcher, BatchObserver
from server.errors import ConfigError
from server.memory import MemoryMonitor, process_memory
from server.metrics import (
    LATENCY_BUCKETS,
    MODEL_STATES,
    Metrics,
    RegistryMetrics,
    multiprocess_dir_from_env,
    render_multiprocess,
)
from server.registry import (
    BatchingSettings,
    LoadStats,
    ModelVersion,
    RegistryListener,
    VersionState,
)
from server.runtime.base import ProbArray
from server.text import IdArray

ROUTE = "/v1/models/{name}:classify"
EXPECTED_FAMILIES = {
    # family name as the parser reports it (counters without _total) → type
    "textserve_requests": "counter",
    "textserve_texts": "counter",
    "textserve_request_duration_seconds": "histogram",
    "textserve_queue_wait_seconds": "histogram",
    "textserve_inference_duration_seconds": "histogram",
    "textserve_batch_size": "histogram",
    "textserve_queue_depth": "gauge",
    "textserve_model_state": "gauge",
    "textserve_model_load_duration_seconds": "gauge",
    "textserve_model_warmup_duration_seconds": "gauge",
    "textserve_model_memory_bytes": "gauge",
    "textserve_process_memory_bytes": "gauge",
    "textserve_build_info": "gauge",
}


def exercise(m: Metrics, model: str = "topic", version: str = "1") -> None:
    """Touch every metric once, with realistic values."""
    m.observe_request(ROUTE, 200, 0.004, model=model, version=version, texts=3)
    m.observe_request("/v2/health/ready", 200, 0.0002)
    obs = m.batch_observer(model, version)
    obs.queue_wait(0.0015)
    obs.batch_done(3, 0.0021)
    obs.queue_depth(7)
    m.set_model_state(model, version, "READY")
    m.set_load_times(model, version, 0.8, 0.05)
    m.set_model_memory(model, version, {"weights": 1_234_567, "embedding": 40_000_000})
    m.set_memory(process_memory())


def families(m: Metrics) -> dict[str, str]:
    body, _ = m.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_every_metric_is_exposed_and_passes_promtool(tmp_path: Path) -> None:
    m = Metrics(CollectorRegistry())
    exercise(m)
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=")
    got = families(m)
    for name, kind in EXPECTED_FAMILIES.items():
        assert got.get(name) == kind, f"{name}: {got.get(name)}"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool absent (Debian package `prometheus`): exposition not linted")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_counters_and_histograms_move_when_observed() -> None:
    m = Metrics(CollectorRegistry())
    req = {"model": "topic", "version": "1", "route": ROUTE}
    assert value(m, "textserve_requests_total", status="200", **req) is None
    m.observe_request(ROUTE, 200, 0.003, model="topic", version="1", texts=5)
    m.observe_request(ROUTE, 200, 0.7, model="topic", version="1", texts=2)
    m.observe_request(ROUTE, 413, 0.001, model="topic", version="1", texts=4000)
    assert value(m, "textserve_requests_total", status="200", **req) == 2
    assert value(m, "textserve_requests_total", status="413", **req) == 1
    # texts count only on success
    assert value(m, "textserve_texts_total", model="topic", version="1") == 7
    assert value(m, "textserve_request_duration_seconds_count", **req) == 3
    assert value(m, "textserve_request_duration_seconds_bucket", le="0.005", **req) == 2
    assert value(m, "textserve_request_duration_seconds_bucket", le="0.5", **req) == 2
    assert value(m, "textserve_request_duration_seconds_bucket", le="1.0", **req) == 3

    obs = m.batch_observer("topic", "1")
    for size in (1, 64, 64, 4096):
        obs.batch_done(size, 0.01)
    mv = {"model": "topic", "version": "1"}
    assert value(m, "textserve_batch_size_count", **mv) == 4
    assert value(m, "textserve_batch_size_sum", **mv) == 1 + 64 + 64 + 4096
    assert value(m, "textserve_batch_size_bucket", le="1.0", **mv) == 1
    assert value(m, "textserve_batch_size_bucket", le="32.0", **mv) == 1
    assert value(m, "textserve_batch_size_bucket", le="64.0", **mv) == 3
    assert value(m, "textserve_batch_size_bucket", le="4096.0", **mv) == 4
    assert value(m, "textserve_inference_duration_seconds_count", **mv) == 4
    obs.queue_wait(0.0004)
    obs.queue_wait(6.0)  # beyond the largest bucket: only +Inf
    assert value(m, "textserve_queue_wait_seconds_bucket", le="0.0005", **mv) == 1
    assert value(m, "textserve_queue_wait_seconds_bucket", le="5.0", **mv) == 1
    assert value(m, "textserve_queue_wait_seconds_bucket", le="+Inf", **mv) == 2
    obs.queue_depth(12)
    assert value(m, "textserve_queue_depth", **mv) == 12
    obs.queue_depth(0)
    assert value(m, "textserve_queue_depth", **mv) == 0


def test_latency_buckets_span_half_a_millisecond_to_five_seconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.0005
    assert LATENCY_BUCKETS[-1] == 5.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_model_state_has_exactly_one_current_state() -> None:
    m = Metrics(CollectorRegistry())
    m.set_model_state("topic", "2", "loading")
    m.set_model_state("topic", "2", "READY")
    states = {
        s: value(m, "textserve_model_state", model="topic", version="2", state=s)
        for s in MODEL_STATES
    }
    assert states == {s: (1.0 if s == "ready" else 0.0) for s in MODEL_STATES}
    m.set_model_state("topic", "2", "draining")  # a state this module did not list
    assert value(m, "textserve_model_state", model="topic", version="2", state="draining") == 1
    assert value(m, "textserve_model_state", model="topic", version="2", state="ready") == 0


def test_load_times_memory_and_build_info() -> None:
    m = Metrics(CollectorRegistry(), tensorflow_version_="9.9.9")
    m.set_load_times("topic", "1", 1.25)
    assert value(m, "textserve_model_load_duration_seconds", model="topic", version="1") == 1.25
    assert value(m, "textserve_model_warmup_duration_seconds", model="topic", version="1") is None
    m.set_load_times("topic", "1", 0.5, 0.125)
    assert value(m, "textserve_model_warmup_duration_seconds", model="topic", version="1") == 0.125
    m.set_model_memory("topic", "1", {"weights": 4096})
    assert (
        value(m, "textserve_model_memory_bytes", model="topic", version="1", kind="weights") == 4096
    )

    mem = process_memory()
    m.set_memory(mem)
    assert value(m, "textserve_process_memory_bytes", kind="rss") == mem.rss
    assert value(m, "textserve_process_memory_bytes", kind="uss") == mem.uss
    assert value(m, "textserve_process_memory_bytes", kind="pss") == mem.pss
    assert mem.rss > 0

    info = {
        "version": __version__,
        "tensorflow_version": "9.9.9",
        "python_version": platform.python_version(),
    }
    assert value(m, "textserve_build_info", **info) == 1


def test_build_info_reads_the_installed_tensorflow_version_without_importing_it() -> None:
    from importlib import metadata

    m = Metrics(CollectorRegistry())
    fams = list(text_string_to_metric_families(m.render()[0].decode()))
    (info,) = [f for f in fams if f.name == "textserve_build_info"]
    (sample,) = info.samples
    assert sample.labels["tensorflow_version"] == metadata.version("tensorflow-cpu")
    # a fresh process: building Metrics must not pay for `import tensorflow` (~500 MiB)
    probe = (
        "import sys; from prometheus_client import CollectorRegistry; "
        "from server.metrics import Metrics; Metrics(CollectorRegistry()); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_remove_model_drops_its_gauges_but_keeps_counters() -> None:
    m = Metrics(CollectorRegistry())
    exercise(m, "gone", "3")
    exercise(m, "kept", "1")
    m.remove_model("gone", "3")
    m.remove_model("never-loaded", "1")  # harmless
    body = m.render()[0].decode()
    gone = [line for line in body.splitlines() if 'model="gone"' in line]
    assert gone, "request counters of a removed model stay"
    assert all(
        line.startswith(("textserve_requests_", "textserve_texts_", "textserve_request_duration"))
        for line in gone
    ), gone
    assert value(m, "textserve_queue_depth", model="kept", version="1") == 7
    assert value(m, "textserve_model_state", model="kept", version="1", state="ready") == 1


def test_two_instances_on_two_registries_are_independent() -> None:
    a = Metrics(CollectorRegistry())
    b = Metrics(CollectorRegistry())
    a.observe_request(ROUTE, 200, 0.01, model="topic", version="1", texts=1)
    a.batch_observer("topic", "1").queue_depth(3)
    labels = {"model": "topic", "version": "1", "route": ROUTE, "status": "200"}
    assert value(a, "textserve_requests_total", **labels) == 1
    assert value(b, "textserve_requests_total", **labels) is None
    assert value(b, "textserve_queue_depth", model="topic", version="1") is None
    assert b"topic" not in b.render()[0]
    # and neither touched the process-global registry
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("textserve_requests_total", labels) is None


def test_multiprocess_dir_must_be_set_before_the_process_starts(tmp_path: Path) -> None:
    assert multiprocess_dir_from_env({}) is None
    assert multiprocess_dir_from_env({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) == tmp_path
    # This test process imported prometheus_client without the variable: in-memory values.
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with pytest.raises(ConfigError, match="before the process starts"):
        Metrics(CollectorRegistry(), multiprocess_dir=tmp_path)


_WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from server.metrics import Metrics
    m = Metrics(CollectorRegistry())
    n = int(sys.argv[1])
    for _ in range(n):
        m.observe_request("/v1/models/{name}:classify", 200, 0.002, model="topic", version="1",
                          texts=2)
    obs = m.batch_observer("topic", "1")
    obs.batch_done(n, 0.003)
    obs.queue_depth(n)
    m.set_model_state("topic", "1", "ready")
    m.set_model_state("old", "1", "ready")
    m.batch_observer("old", "1").queue_depth(9)
    m.remove_model("old", "1")  # zeroed, not removed, in this mode (and no warning)
    body, _ = m.render()
    assert b"textserve_requests_total" in body
    """
)


def test_multiprocess_workers_aggregate(tmp_path: Path) -> None:
    """Two real worker processes write their samples; any process renders their sum."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (3, 5):
        subprocess.run(
            [sys.executable, "-W", "error::UserWarning", "-c", _WORKER, str(n)],
            env=env,
            check=True,
            timeout=120,
        )
    body, _ = render_multiprocess(tmp_path)
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    req = {s.name: s.value for s in fams["textserve_requests"].samples if s.name.endswith("_total")}
    assert req == {"textserve_requests_total": 8}
    (texts,) = [s.value for s in fams["textserve_texts"].samples if s.name.endswith("_total")]
    assert texts == 16
    depth = {s.labels["model"]: s.value for s in fams["textserve_queue_depth"].samples}
    # livesum: the workers have exited but nobody marked them dead, so both still count
    assert depth == {"topic": 8, "old": 0}
    old = [s.value for s in fams["textserve_model_state"].samples if s.labels["model"] == "old"]
    assert len(old) == 2 * len(MODEL_STATES)
    assert set(old) == {0.0}
    states = [
        s
        for s in fams["textserve_model_state"].samples
        if s.labels["state"] == "ready" and s.labels["model"] == "topic"
    ]
    assert len({s.labels["pid"] for s in states}) == 2  # liveall: one series per worker
    assert all(s.value == 1 for s in states)
    batch_count = {
        s.labels["model"]: s.value
        for s in fams["textserve_batch_size"].samples
        if s.name.endswith("_count")
    }
    assert batch_count == {"topic": 2, "old": 0}  # histograms of a removed model stay at 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool absent (Debian package `prometheus`): merged output not linted")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


_FORKING_WORKER = textwrap.dedent(
    """
    import os
    from prometheus_client import CollectorRegistry
    from server.metrics import Metrics, process_id
    m = Metrics(CollectorRegistry())
    m.count_texts("topic", "1", 2)
    assert process_id() == os.getpid()
    child = os.fork()
    if child == 0:
        m.count_texts("topic", "1", 3)
        os._exit(0 if process_id() == os.getpid() else 3)
    assert os.waitpid(child, 0)[1] == 0
    m.count_texts("topic", "1", 4)
    print(os.getpid(), child)
    """
)


def test_multiprocess_values_follow_a_fork(tmp_path: Path) -> None:
    """textserve gives prometheus-client a cached process id (no getpid syscall per sample);
    a forked child still writes to files of its own pid, as with the library's default."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _FORKING_WORKER],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    ).stdout.split()
    parent, child = (int(x) for x in out[-2:])
    assert {p.name for p in tmp_path.glob("counter_*.db")} == {
        f"counter_{parent}.db",
        f"counter_{child}.db",
    }
    body, _ = render_multiprocess(tmp_path)
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (texts,) = [s.value for s in fams["textserve_texts"].samples if s.name.endswith("_total")]
    assert texts == 2 + 3 + 4


# -- the core's interfaces, with the real classes ---------------------------------------------
def test_a_real_batcher_reports_to_its_observer() -> None:
    m = Metrics(CollectorRegistry())
    observer: BatchObserver = m.batch_observer("topic", "1")  # mypy: satisfies the Protocol
    calls: list[int] = []

    def predict(ids: IdArray) -> ProbArray:
        calls.append(len(ids))
        return np.full((len(ids), 2), 0.5, dtype=np.float32)

    def pad(rows: Sequence[Sequence[int]]) -> IdArray:
        width = max(len(r) for r in rows)
        return np.array([list(r) + [0] * (width - len(r)) for r in rows], dtype=np.int32)

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                predict,
                pad,
                max_batch_size=4,
                max_wait_ms=1.0,
                max_queue=100,
                executor=pool,
                name="topic",
                observer=observer,
            )
            batcher.start()
            sizes = (1, 3, 2, 5, 1)
            outs = await asyncio.gather(*(batcher.submit([[2, 3, 4]] * n) for n in sizes))
            assert [len(o) for o in outs] == list(sizes)
            await batcher.close(5.0)

    asyncio.run(main())
    mv = {"model": "topic", "version": "1"}
    assert value(m, "textserve_batch_size_count", **mv) == len(calls)
    assert value(m, "textserve_batch_size_sum", **mv) == sum(calls) == 12
    assert value(m, "textserve_batch_size_bucket", le="4.0", **mv) == len(calls)  # max batch 4
    assert value(m, "textserve_inference_duration_seconds_count", **mv) == len(calls)
    assert value(m, "textserve_queue_wait_seconds_count", **mv) == 5  # one per request
    assert value(m, "textserve_queue_depth", **mv) == 0  # drained


def test_registry_listener_follows_a_version_through_its_states(tmp_path: Path) -> None:
    m = Metrics(CollectorRegistry())
    listener: RegistryListener = RegistryMetrics(m)  # mypy: satisfies the Protocol
    mv = ModelVersion(name="topic", version=3, path=tmp_path, batching=BatchingSettings(8, 1.0, 64))
    listener.version_changed(mv)
    labels = {"model": "topic", "version": "3"}
    assert value(m, "textserve_model_state", state="loading", **labels) == 1
    assert value(m, "textserve_model_load_duration_seconds", **labels) is None
    mem = process_memory()
    mv.state = VersionState.READY
    mv.stats = LoadStats(0.75, 0.25, mem, mem)
    listener.version_changed(mv)
    assert value(m, "textserve_model_state", state="loading", **labels) == 0
    assert value(m, "textserve_model_state", state="ready", **labels) == 1
    assert value(m, "textserve_model_load_duration_seconds", **labels) == 0.75
    assert value(m, "textserve_model_warmup_duration_seconds", **labels) == 0.25
    observer = listener.batch_observer(mv)
    assert observer is not None
    observer.queue_depth(2)
    assert value(m, "textserve_queue_depth", **labels) == 2
    listener.version_removed(mv)
    assert value(m, "textserve_model_state", state="ready", **labels) is None
    assert value(m, "textserve_queue_depth", **labels) is None


def test_memory_monitor_feeds_the_memory_gauges() -> None:
    m = Metrics(CollectorRegistry())
    monitor = MemoryMonitor(60.0)
    m.set_memory_from(monitor)  # nothing sampled yet: nothing set
    assert value(m, "textserve_process_memory_bytes", kind="rss") is None
    monitor.register("topic", 1, own_bytes=1000, embedding_key="e", embedding_bytes=600)
    monitor.register("verbs", 2, own_bytes=10, embedding_key="e", embedding_bytes=600)
    sample = monitor.sample()
    m.set_memory_from(monitor)
    assert value(m, "textserve_process_memory_bytes", kind="uss") == sample.uss
    own = value(m, "textserve_model_memory_bytes", model="topic", version="1", kind="own")
    assert own == 1000
    shares = [
        value(m, "textserve_model_memory_bytes", model=n, version=v, kind="embedding_share")
        for n, v in (("topic", "1"), ("verbs", "2"))
    ]
    assert sum(s or 0 for s in shares) == 600  # one shared embedding, counted once
