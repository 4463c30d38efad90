"""Every Prometheus collector textserve exports, on an injected :class:`CollectorRegistry`.

Nothing here touches prometheus-client's global ``REGISTRY``: the app creates one
``Metrics(CollectorRegistry())`` at start-up and hands it to the parts that report (routes,
batcher, registry, memory monitor). Two instances on two registries are independent, so tests can
build as many servers in one process as they like.

Names follow the Prometheus conventions: the ``textserve_`` prefix, base units (seconds, bytes),
``_total`` for counters. Label values are bounded: ``route`` is the route *template*
(``/v1/models/{name}:classify``), never the raw path; ``model``/``version`` come from the
repository, ``status`` is the numeric HTTP status.

Multiprocess mode (several workers behind one port)
---------------------------------------------------
textserve's deployment unit is one process per container (``import tensorflow`` costs ~500 MiB of
private memory per process, so replicas scale out, not in), and Prometheus adds replicas up with
``sum by (model) (rate(textserve_texts_total[1m]))``. If several worker processes ever share one
port, prometheus-client's multiprocess mode aggregates them:

1. ``PROMETHEUS_MULTIPROC_DIR`` must name an empty directory (a tmpfs) **before** any worker
   starts: prometheus-client picks its file-backed value class when it is first imported. Every
   worker then writes its samples to ``<dir>/<kind>_<pid>.db`` (mmap'd files).
2. :meth:`Metrics.render` in any worker then ignores its own registry and merges every worker's
   files (:func:`render_multiprocess`): counters and histograms are summed; each gauge is merged
   as its ``multiprocess_mode`` below says (``livesum`` for queue depth and model memory, since
   every worker holds its own queue and its own sessions; ``liveall`` — one series per ``pid`` —
   for model state and process memory; ``livemax`` for load times and build info).
3. The supervisor calls ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker
   exits (drops its ``live*`` gauges), and wipes the directory on a fresh start.

In that mode one process should hold exactly one :class:`Metrics`: the files are keyed by metric
name and labels, not by registry.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

from server import __version__
from server.errors import ConfigError
from server.memory import ProcessMemory

if TYPE_CHECKING:
    from server.registry import ModelVersion

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Latency buckets for a CPU text classifier: 0.5 ms (one small batch) to 5 s (a deep queue).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: Texts per ``session.run``: powers of two up to the largest allowed batch (4096).
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = tuple(float(2**i) for i in range(13))

#: Model states the registry reports; :meth:`Metrics.set_model_state` also accepts others.
MODEL_STATES: Final[tuple[str, ...]] = ("loading", "ready", "failed", "unloading")
#: Process memory kinds (see :mod:`server.memory`).
PROCESS_MEMORY_KINDS: Final[tuple[str, ...]] = ("rss", "uss", "pss")

_MODEL: Final = ("model", "version")


_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def process_id() -> int:
    """``os.getpid()`` without the syscall: cached, and refreshed in the child of a fork."""
    return _pid


if values.ValueClass is not values.MutexValue:
    # Multiprocess mode. prometheus-client's default file-backed value calls os.getpid() — a
    # syscall — on every inc/set/observe to notice a fork; under single-text load that was ~7 %
    # of a worker's event loop (py-spy, docs/bench/README.md). The library takes the process
    # identifier as a parameter; this one is cached and kept right across fork() by the hook
    # above. Swapped at import, before any textserve metric exists.
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]


def multiprocess_dir_from_env(env: Mapping[str, str] = os.environ) -> Path | None:
    """The multiprocess directory named by ``PROMETHEUS_MULTIPROC_DIR``, or None."""
    value = env.get(MULTIPROC_ENV, "")
    return Path(value) if value else None


def render_multiprocess(path: Path) -> tuple[bytes, str]:
    """The exposition of every worker's samples under ``path``, merged."""
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(path))  # type: ignore[no-untyped-call]
    return generate_latest(merged), CONTENT_TYPE_LATEST


def _dist_version(names: Iterable[str]) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def tensorflow_version() -> str:
    """TensorFlow's installed version, read from package metadata (no ``import tensorflow``)."""
    return _dist_version(("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tf-nightly"))


class RequestRecord:
    """What the data plane learned while answering one HTTP request.

    The API layer puts a fresh record in :data:`current_request` around each request; the data
    plane (transport-free) notes which model versions the request resolved and how many texts
    each classified. Label values come only from the registry (never from the raw path), so
    an unknown model name in a URL cannot create a series.
    """

    __slots__ = ("models",)

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], int] = {}
        """``(model, version)`` → texts classified (version ``""``: the model, not ready)."""

    def resolved(self, model: str, version: str) -> None:
        """The request addressed ``model``/``version`` (known to the registry)."""
        self.models.setdefault((model, version), 0)

    def classified(self, model: str, version: str, texts: int) -> None:
        """``model``/``version`` classified ``texts`` texts for the request."""
        key = (model, version)
        if key not in self.models:
            # The request followed a hot reload from the version it resolved to this one.
            for other in [k for k, n in self.models.items() if k[0] == model and n == 0]:
                del self.models[other]
        self.models[key] = self.models.get(key, 0) + texts


current_request: ContextVar[RequestRecord | None] = ContextVar(
    "textserve_current_request", default=None
)
"""The :class:`RequestRecord` of the request being answered (None outside a request)."""


class MemorySource(Protocol):
    """What :meth:`Metrics.set_memory_from` reads (``server.memory.MemoryMonitor``)."""

    def latest(self) -> ProcessMemory | None: ...

    def model_memory(self) -> Iterable[tuple[str, str, dict[str, int]]]: ...


class BatchMetrics:
    """The batcher's view of one model version (implements ``server.batching.BatchObserver``).

    Label children are bound once here, so each call on the hot path is one lock + one add.
    """

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._batch_size = metrics.batch_size.labels(model, version)
        self._inference = metrics.inference_duration.labels(model, version)
        self._queue_wait = metrics.queue_wait.labels(model, version)
        self._queue_depth = metrics.queue_depth.labels(model, version)

    def batch_done(self, size: int, inference_s: float) -> None:
        """One ``session.run`` of ``size`` texts took ``inference_s`` seconds."""
        self._batch_size.observe(size)
        self._inference.observe(inference_s)

    def queue_wait(self, seconds: float) -> None:
        """A request waited ``seconds`` between enqueue and the start of its batch."""
        self._queue_wait.observe(seconds)

    def queue_depth(self, n: int) -> None:
        """``n`` texts are queued now."""
        self._queue_depth.set(n)


class Metrics:
    """textserve's collectors on ``registry``; see the module docstring for multiprocess mode.

    ``multiprocess_dir`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``. When it is set,
    :meth:`render` merges every worker's samples instead of reading ``registry``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        multiprocess_dir: Path | None = None,
        tensorflow_version_: str | None = None,
    ) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir or multiprocess_dir_from_env()
        if self.multiprocess_dir is not None:
            if values.ValueClass is values.MutexValue:
                raise ConfigError(
                    f"multiprocess metrics need {MULTIPROC_ENV} set before the process starts "
                    "(prometheus_client chose in-memory values at import)"
                )
            if not self.multiprocess_dir.is_dir():
                raise ConfigError(f"{MULTIPROC_ENV}={self.multiprocess_dir} is not a directory")
        r = registry

        self.requests = Counter(
            "textserve_requests",
            "HTTP requests answered, by route template and status code.",
            ("model", "version", "route", "status"),
            registry=r,
        )
        self.texts = Counter(
            "textserve_texts",
            "Texts classified in successful requests.",
            _MODEL,
            registry=r,
        )
        self.request_duration = Histogram(
            "textserve_request_duration_seconds",
            "Time from request received to response ready, by route template.",
            ("model", "version", "route"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "textserve_queue_wait_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            _MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "textserve_inference_duration_seconds",
            "Duration of one session.run (one batch).",
            _MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "textserve_batch_size",
            "Texts per session.run.",
            _MODEL,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "textserve_queue_depth",
            "Texts waiting in the model version's batcher queue.",
            _MODEL,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_state = Gauge(
            "textserve_model_state",
            "1 for the model version's current state, 0 for the others.",
            ("model", "version", "state"),
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_load_duration = Gauge(
            "textserve_model_load_duration_seconds",
            "Time the last load of the model version took (files to session, before warm-up).",
            _MODEL,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_warmup_duration = Gauge(
            "textserve_model_warmup_duration_seconds",
            "Time the last warm-up of the model version took.",
            _MODEL,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_memory = Gauge(
            "textserve_model_memory_bytes",
            "Memory attributed to the model version, by kind (e.g. own weights, embedding share).",
            ("model", "version", "kind"),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.process_memory = Gauge(
            "textserve_process_memory_bytes",
            "Memory of the serving process: rss, uss (private) and pss (proportional share).",
            ("kind",),
            registry=r,
            multiprocess_mode="liveall",
        )
        self.build_info = Gauge(
            "textserve_build_info",
            "Always 1; the labels say which textserve, TensorFlow and Python are running.",
            ("version", "tensorflow_version", "python_version"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(
            __version__,
            tensorflow_version_ if tensorflow_version_ is not None else tensorflow_version(),
            platform.python_version(),
        ).set(1)
        self._states: dict[tuple[str, str], set[str]] = {}
        self._memory_kinds: dict[tuple[str, str], set[str]] = {}
        # Label children of the per-request series, bound once (``labels()`` costs ~4 us a
        # call; a cached child ~1 us). Safe because these series are never removed.
        self._request_children: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self._text_children: dict[tuple[str, str], Counter] = {}

    # -- requests ---------------------------------------------------------------------------
    def observe_request(
        self,
        route: str,
        status: int,
        duration_s: float,
        *,
        model: str = "",
        version: str = "",
        texts: int = 0,
    ) -> None:
        """One answered request. ``route`` is the route template; ``texts`` counts only on 2xx."""
        key = (model, version, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, version, route, str(status)),
                self.request_duration.labels(model, version, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(duration_s)
        if texts and model and 200 <= status < 300:
            self.count_texts(model, version, texts)

    def count_texts(self, model: str, version: str, texts: int) -> None:
        """``texts`` more texts classified by ``model``/``version``."""
        child = self._text_children.get((model, version))
        if child is None:
            child = self._text_children[(model, version)] = self.texts.labels(model, version)
        child.inc(texts)

    def observe_record(
        self, route: str, status: int, duration_s: float, record: RequestRecord
    ) -> None:
        """One answered request with what the data plane recorded about it.

        A request that addressed exactly one model version is labelled with it; a request
        over several models (``/v1/classify``) is counted once with empty model/version
        labels, and its texts per model version. Texts count only on 2xx.
        """
        models = record.models
        if len(models) == 1:
            ((model, version), texts) = next(iter(models.items()))
            self.observe_request(
                route, status, duration_s, model=model, version=version, texts=texts
            )
            return
        self.observe_request(route, status, duration_s)
        if 200 <= status < 300:
            for (model, version), texts in models.items():
                if texts and model:
                    self.count_texts(model, version, texts)

    # -- batcher ----------------------------------------------------------------------------
    def batch_observer(self, model: str, version: str) -> BatchMetrics:
        """The observer to hand to the batcher of ``model``/``version``."""
        return BatchMetrics(self, model, version)

    # -- registry ---------------------------------------------------------------------------
    def set_model_state(self, model: str, version: str, state: str) -> None:
        """Mark ``state`` (case-insensitive) current: its gauge 1, every other known state 0."""
        current = state.lower()
        key = (model, version)
        known = self._states.setdefault(key, set(MODEL_STATES))
        known.add(current)
        for s in known:
            self.model_state.labels(model, version, s).set(1 if s == current else 0)

    def set_load_times(
        self, model: str, version: str, load_s: float, warmup_s: float | None = None
    ) -> None:
        """Durations of the last load (and warm-up, when one ran) of ``model``/``version``."""
        self.model_load_duration.labels(model, version).set(load_s)
        if warmup_s is not None:
            self.model_warmup_duration.labels(model, version).set(warmup_s)

    def set_model_memory(self, model: str, version: str, kinds: Mapping[str, int]) -> None:
        """Bytes attributed to ``model``/``version`` by kind (e.g. ``weights``, ``embedding``)."""
        self._memory_kinds.setdefault((model, version), set()).update(kinds)
        for kind, value in kinds.items():
            self.model_memory.labels(model, version, kind).set(value)

    def remove_model(self, model: str, version: str) -> None:
        """Drop the gauges and batch histograms of an unloaded version (counters stay).

        Multiprocess mode cannot remove series (prometheus-client keeps them in the workers'
        files): there the version's gauges are zeroed instead.
        """
        key = (model, version)
        states = self._states.pop(key, set())
        kinds = self._memory_kinds.pop(key, set())
        if self.multiprocess_dir is not None:
            for s in states:
                self.model_state.labels(model, version, s).set(0)
            for kind in kinds:
                self.model_memory.labels(model, version, kind).set(0)
            self.queue_depth.labels(model, version).set(0)
            return
        for s in states:
            self.model_state.remove(model, version, s)
        for kind in kinds:
            self.model_memory.remove(model, version, kind)
        for metric in (
            self.queue_depth,
            self.queue_wait,
            self.inference_duration,
            self.batch_size,
            self.model_load_duration,
            self.model_warmup_duration,
        ):
            with contextlib.suppress(KeyError):  # prometheus-client < 0.21 raises on absent
                metric.remove(model, version)

    # -- memory monitor ---------------------------------------------------------------------
    def set_memory(self, process: ProcessMemory) -> None:
        """The process's RSS/USS/PSS, from :func:`server.memory.process_memory`."""
        self.process_memory.labels("rss").set(process.rss)
        self.process_memory.labels("uss").set(process.uss)
        self.process_memory.labels("pss").set(process.pss)

    def set_memory_from(self, monitor: MemorySource) -> None:
        """Copy the monitor's latest process sample and every model's figures (per scrape)."""
        latest = monitor.latest()
        if latest is not None:
            self.set_memory(latest)
        for model, version, kinds in monitor.model_memory():
            self.set_model_memory(model, version, kinds)

    # -- exposition -------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics``."""
        if self.multiprocess_dir is not None:
            return render_multiprocess(self.multiprocess_dir)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RegistryMetrics:
    """``server.registry.RegistryListener`` on :class:`Metrics`: states, load times, batchers.

    ``Registry(settings, listener=RegistryMetrics(metrics))``. Every method is cheap and cannot
    raise on a well-formed ``ModelVersion``.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def version_changed(self, mv: ModelVersion) -> None:
        version = str(mv.version)
        self.metrics.set_model_state(mv.name, version, str(mv.state))
        if mv.stats is not None:
            self.metrics.set_load_times(
                mv.name, version, mv.stats.load_seconds, mv.stats.warmup_seconds
            )

    def version_removed(self, mv: ModelVersion) -> None:
        self.metrics.remove_model(mv.name, str(mv.version))

    def batch_observer(self, mv: ModelVersion) -> BatchMetrics:
        return self.metrics.batch_observer(mv.name, str(mv.version))
