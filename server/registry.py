"""The model registry: which model versions are loaded, in what state, and how to reach them.

The registry reads ``REPO/models.yaml`` and, for every configured model, loads the version
directories its ``version_policy`` selects. Each loaded version owns one
:class:`~server.runtime.base.Runtime` (a TensorFlow session) and one
:class:`~server.batching.Batcher`.

States of a model version::

    LOADING ──► READY ──► UNLOADING ──► (removed)
        └─────► FAILED (reason)

Loading is serial, on one background thread, so the HTTP server answers ``/v2/health/live``
while TensorFlow is imported and sessions are built, and the memory figures recorded around
each load (RSS/USS before and after load + warm-up) belong to that load alone. A version that
fails to load is recorded as FAILED with a one-line reason and never stops the others.

Serving rules:

* ``get(name)`` returns the newest READY version; ``get(name, version)`` that exact version.
* A new version (``poll()``/``load()``) is loaded and warmed up *before* it replaces the old
  one; if it fails, the old version keeps serving.
* **Readiness** (``ready``): the first load pass has finished, no model is still loading its
  first version, and at least one model is READY (or the repository configures no models).
  A model whose every version FAILED does not hold readiness back: it is reported in
  ``/v1/models`` with its reason, and requests to it answer 503.

The registry knows nothing about HTTP: it raises :mod:`server.errors` exceptions that carry
their status. Batchers live on the event loop the registry was started on; the loader thread
hands finished runtimes to that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from server import allocator
from server.artifact import (
    SERVABLE_FORMATS,
    ModelConfig,
    ModelManifest,
    RepositoryConfig,
    list_versions,
    load_embedding_manifest,
    load_model_manifest,
    load_repository_config,
    resolve_inside,
    select_versions,
)
from server.errors import (
    ArtifactError,
    ModelNotFound,
    ModelNotReady,
    ShuttingDown,
    TextserveError,
    VersionNotFound,
)
from server.memory import MemoryMonitor, ProcessMemory
from server.priority import lower_this_thread
from server.settings import Settings
from server.token_hash import NATIVE

if TYPE_CHECKING:
    from server.batching import Batcher, BatchObserver
    from server.embeddings import EmbeddingStore
    from server.runtime.base import Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")

WARMUP_TOKEN_BUDGET = 8192
"""Upper bound on ``batch * length`` of one warm-up run (a long ``max_len`` stays cheap)."""
WARMUP_SHORT_LEN = 8
WARMUP_LONG_LEN = 128


class VersionState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


class ModelState(StrEnum):
    """A model's summary state over its versions."""

    LOADING = "LOADING"
    """No version READY yet, one is loading."""
    READY = "READY"
    """At least one version serves."""
    FAILED = "FAILED"
    """Nothing serves and the last attempt failed (see ``reason``)."""
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"
    """Nothing loaded and nothing failed (e.g. after ``unload``)."""


@dataclass(frozen=True)
class BatchingSettings:
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_in_flight: int = 1


@dataclass(frozen=True)
class LoadStats:
    load_seconds: float
    warmup_seconds: float
    memory_before: ProcessMemory
    memory_after: ProcessMemory

    @property
    def rss_delta(self) -> int:
        return self.memory_after.rss - self.memory_before.rss

    @property
    def uss_delta(self) -> int:
        return self.memory_after.uss - self.memory_before.uss


@dataclass
class ModelVersion:
    """One version of one model. Fields change only on the loader thread or the event loop."""

    name: str
    version: int
    path: Path
    batching: BatchingSettings
    state: VersionState = VersionState.LOADING
    reason: str = ""
    manifest: ModelManifest | None = None
    embedding: str | None = None
    """Name of the embedding (in models.yaml) this version reads; None if self-contained."""
    runtime: Runtime | None = None
    batcher: Batcher[str] | None = None
    stats: LoadStats | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels if self.manifest is not None else ()


@dataclass
class ModelEntry:
    """A configured model and its versions."""

    config: ModelConfig
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    reason: str = ""
    """A model-level problem (bad base_path, no version directories)."""
    loaded_once: bool = False
    """At least one load attempt of this model finished (readiness)."""

    @property
    def name(self) -> str:
        return self.config.name

    def newest_ready(self) -> ModelVersion | None:
        # tuple(): one atomic copy; the loader thread may add a version meanwhile.
        ready = [v for v in tuple(self.versions.values()) if v.state is VersionState.READY]
        return max(ready, key=lambda v: v.version) if ready else None

    @property
    def state(self) -> ModelState:
        states = {v.state for v in tuple(self.versions.values())}
        if VersionState.READY in states:
            return ModelState.READY
        if VersionState.LOADING in states:
            return ModelState.LOADING
        if VersionState.UNLOADING in states:
            return ModelState.UNLOADING
        if self.reason or VersionState.FAILED in states:
            return ModelState.FAILED
        if not self.loaded_once:
            return ModelState.LOADING  # not reached by the first load pass yet
        return ModelState.UNAVAILABLE

    @property
    def state_reason(self) -> str:
        if self.reason:
            return self.reason
        if self.state is ModelState.FAILED:
            failed = max(
                (v for v in tuple(self.versions.values()) if v.state is VersionState.FAILED),
                key=lambda v: v.version,
                default=None,
            )
            if failed is None:
                return ""
            return f"version {failed.version}: {failed.reason}"
        return ""


class RegistryListener(Protocol):
    """Hooks for observers (metrics). Called on the loader thread or the event loop; must be
    thread-safe, cheap, and must not raise."""

    def version_changed(self, mv: ModelVersion) -> None:
        """``mv.state`` changed (LOADING, READY, FAILED or UNLOADING)."""

    def version_removed(self, mv: ModelVersion) -> None:
        """``mv`` left the registry (unloaded, or replaced by a retry)."""

    def batch_observer(self, mv: ModelVersion) -> BatchObserver | None:
        """The observer for ``mv``'s batcher (None: no observer)."""


def warm_up(runtime: Runtime, max_batch_size: int) -> int:
    """Run ``runtime`` on a few batch shapes so no request pays TensorFlow's first-call cost.

    Batch sizes 1, a middle size and ``max_batch_size``; a short and a long length (at most
    ``WARMUP_LONG_LEN`` tokens, and ``batch * length <= WARMUP_TOKEN_BUDGET``). Checks every
    answer has one finite row per text and one column per label. Returns the number of runs.
    """
    tokenizer = runtime.tokenizer
    spec = tokenizer.spec
    num_labels = len(runtime.labels)
    words = max(len(tokenizer.vocab) - 2, 1)
    sizes = sorted({1, max(1, (max_batch_size + 1) // 2), max_batch_size})
    long_len = min(max(spec.max_len, spec.min_len), WARMUP_LONG_LEN)
    lengths = sorted({min(WARMUP_SHORT_LEN, long_len), long_len})
    runs = 0
    for size in sizes:
        for length in lengths:
            n = max(1, min(length, WARMUP_TOKEN_BUDGET // size))
            encoded = [[2 + (row * 31 + col) % words for col in range(n)] for row in range(size)]
            probs = runtime.predict(tokenizer.pad(encoded))
            runs += 1
            if probs.shape != (size, num_labels):
                raise ArtifactError(
                    f"warm-up: the model answered shape {list(probs.shape)} for {size} texts; "
                    f"expected [{size}, {num_labels}] ({num_labels} labels in model.json)"
                )
            if not bool(np.isfinite(probs).all()):
                raise ArtifactError("warm-up: the model produced non-finite probabilities")
    return runs


def _reason(exc: BaseException, limit: int = 500) -> str:
    """A one-line FAILED reason (TensorFlow errors can be pages long)."""
    text = exc.message if isinstance(exc, TextserveError) else f"{type(exc).__name__}: {exc}"
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_files_inside(root: Path, directory: Path) -> None:
    """Every entry under ``directory`` must resolve inside ``root`` and be a regular file or a
    directory: a symlink pointing out of the repository (or a FIFO/device, which would hang or
    feed the loader) fails the load with a one-line reason before anything is read."""
    root_real = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            target = entry.resolve()
            if target != root_real and root_real not in target.parents:
                raise ArtifactError(f"{entry}: resolves outside the repository root ({target})")
            if not (target.is_file() or target.is_dir()):
                raise ArtifactError(f"{entry}: not a regular file or directory")


class Registry:
    """Loads and serves the model set of one repository. See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        listener: RegistryListener | None = None,
        memory: MemoryMonitor | None = None,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.memory = (
            memory if memory is not None else MemoryMonitor(settings.memory_sample_interval_s)
        )
        """Each load + warm-up runs inside ``memory.track``; READY versions are registered
        there with their exact tensor bytes, and unregistered when their runtime closes."""
        self.repo = Path(settings.repo)
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._default: dict[str, ModelVersion] = {}
        """name → newest READY version; replaced (never mutated) under the lock."""
        self._config: RepositoryConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader: concurrent.futures.ThreadPoolExecutor | None = None
        self._inference: concurrent.futures.ThreadPoolExecutor | None = None
        self._threads = settings.thread_layout()
        """TensorFlow's thread counts and the idle split, resolved once for the process."""
        if not NATIVE:
            log.warning(
                "server.native_tokenizer is not built (no C compiler at install): batches are "
                "tokenized in numpy, ~4x slower; reinstall with gcc and Python's headers"
            )
        self._split: concurrent.futures.ThreadPoolExecutor | None = None
        """Threads for the extra slices of idle splits (``idle_split`` > 1)."""
        self._store: EmbeddingStore | None = None
        self._initial: concurrent.futures.Future[None] | None = None
        self._closing = False
        self._started_at = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read models.yaml (a broken file fails here), then load every model in the background.

        Call on the event loop that will serve requests; batchers run on it.
        """
        if self._loop is not None:
            raise RuntimeError("registry already started")
        config = load_repository_config(self.repo)
        from server.embeddings import EmbeddingStore

        self._loop = asyncio.get_running_loop()
        if self.settings.lean_tensorflow:
            allocator.lean_tensorflow()
        self._store = EmbeddingStore()
        # TensorFlow's threads below the event loop's priority; its pools, created by the first
        # session on the loader thread, inherit the loader's (server.priority).
        lower = functools.partial(lower_this_thread, self._threads.inference_nice)
        self._inference = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.inference_threads,
            thread_name_prefix="textserve-infer",
            initializer=lower,
        )
        if self._threads.idle_split > 1:
            self._split = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._threads.idle_split - 1,
                thread_name_prefix="textserve-split",
                initializer=lower,
            )
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="textserve-loader", initializer=lower
        )
        with self._lock:
            self._config = config
            for mc in config.models:
                self._entries[mc.name] = ModelEntry(config=mc)
        self._initial = self._submit(self._sync, None, False, config)

    async def wait_loaded(self) -> None:
        """Wait for the first load pass (all configured models READY or FAILED)."""
        if self._initial is None:
            raise RuntimeError("registry not started")
        await asyncio.wrap_future(self._initial)

    async def close(self, drain_s: float | None = None) -> None:
        """Stop loading, drain every batcher (up to ``drain_s``), close every session."""
        if self._closing:
            return
        self._closing = True
        drain = self.settings.drain_timeout_s if drain_s is None else drain_s
        loader = self._loader
        if loader is not None:
            # The running job may be waiting on this loop: shut down without blocking it.
            await asyncio.to_thread(loader.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            versions = [v for e in self._entries.values() for v in e.versions.values()]
            for v in versions:
                if v.state is VersionState.READY:
                    v.state = VersionState.UNLOADING
            self._default = {}
        for v in versions:
            self._notify(v)
        await asyncio.gather(
            *(v.batcher.close(drain) for v in versions if v.batcher is not None),
            return_exceptions=True,
        )
        for v in versions:
            self._close_runtime(v)
            self._notify(v, removed=True)
        with self._lock:
            self._entries.clear()
        if self._inference is not None:
            self._inference.shutdown(wait=True, cancel_futures=True)
        if self._split is not None:  # after: an inference thread waits for its slices
            self._split.shutdown(wait=True)

    # -- operations (run on the loader thread, one at a time) ------------------------------

    def poll(self) -> concurrent.futures.Future[None]:
        """Re-read models.yaml; load new version directories, retire superseded versions.

        Models added to models.yaml are loaded, removed ones unloaded. FAILED versions are not
        retried (use :meth:`load`).
        """
        return self._submit(self._sync, None, False, None)

    def load(self, name: str) -> concurrent.futures.Future[None]:
        """(Re)load ``name`` from models.yaml: missing and FAILED versions are loaded again."""
        return self._submit(self._sync, name, True, None)

    def unload(self, name: str) -> concurrent.futures.Future[None]:
        """Unload every version of ``name``; the model stays configured (UNAVAILABLE)."""
        with self._lock:
            if name not in self._entries:
                raise ModelNotFound(f"model {name!r} not found")
        return self._submit(self._unload_model, name)

    # -- lookups (event loop) ---------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The READY version that serves ``name`` (newest, or exactly ``version``)."""
        if version is None:
            mv = self._default.get(name)
            if mv is not None:
                return mv
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} not found")
            if version is None:
                mv = entry.newest_ready()
                if mv is not None:
                    return mv
                state, reason = entry.state, entry.state_reason
                detail = f": {reason}" if reason else ""
                raise ModelNotReady(f"model {name!r} is not ready ({state}{detail})")
            mv = entry.versions.get(version)
            if mv is None:
                raise VersionNotFound(f"model {name!r} has no version {version}")
            if mv.state is not VersionState.READY:
                detail = f": {mv.reason}" if mv.reason else ""
                raise ModelNotReady(
                    f"model {name!r} version {version} is not ready ({mv.state}{detail})"
                )
            return mv

    def entry(self, name: str) -> ModelEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found")
        return entry

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name`` the registry knows (any state), ascending."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} not found")
            return sorted(entry.versions.values(), key=lambda v: v.version)

    def ready_models(self) -> list[str]:
        """Names of the models with a READY version, in models.yaml order."""
        return list(self._default)

    @property
    def live(self) -> bool:
        return not self._closing

    @property
    def loaded(self) -> bool:
        """The first load pass has finished."""
        return self._initial is not None and self._initial.done()

    @property
    def ready(self) -> bool:
        if self._closing or not self.loaded:
            return False
        with self._lock:
            entries = list(self._entries.values())
            if any(e.state is ModelState.LOADING and not e.loaded_once for e in entries):
                return False
            return not entries or bool(self._default)

    @property
    def store(self) -> EmbeddingStore | None:
        """The process-wide embedding store (None before :meth:`start`)."""
        return self._store

    @property
    def queue_depth(self) -> int:
        return sum(mv.batcher.queue_depth for mv in self._default.values() if mv.batcher)

    # -- internals --------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        if self._loader is None:
            raise RuntimeError("registry not started")
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        return self._loader.submit(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except Exception:
            log.exception("registry operation %s failed", getattr(fn, "__name__", fn))
            raise

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the registry's event loop and wait for it (loader thread only)."""
        loop = self._loop
        assert loop is not None
        if loop.is_closed():
            coro.close()
            raise ShuttingDown("the event loop is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if loop.is_closed() or not loop.is_running():
                    future.cancel()
                    raise ShuttingDown("the event loop stopped") from None

    def _notify(self, mv: ModelVersion, removed: bool = False) -> None:
        if self.listener is None:
            return
        try:
            if removed:
                self.listener.version_removed(mv)
            else:
                self.listener.version_changed(mv)
        except Exception:
            log.exception("registry listener failed")

    def _publish(self) -> None:
        """Recompute the name → newest READY version table. Call with the lock held."""
        table: dict[str, ModelVersion] = {}
        for name, entry in self._entries.items():
            mv = entry.newest_ready()
            if mv is not None:
                table[name] = mv
        self._default = table

    def _sync(self, only: str | None, retry_failed: bool, config: RepositoryConfig | None) -> None:
        if config is None:
            config = load_repository_config(self.repo)
        with self._lock:
            self._config = config
            if only is not None and config.model(only) is None:
                raise ModelNotFound(f"model {only!r} is not in {self.repo / 'models.yaml'}")
            for mc in config.models:
                if only is None or mc.name == only:
                    entry = self._entries.setdefault(mc.name, ModelEntry(config=mc))
                    entry.config = mc
            removed = (
                [] if only is not None else [n for n in self._entries if config.model(n) is None]
            )
        for mc in config.models:
            if only is not None and mc.name != only:
                continue
            if self._closing:
                return
            self._sync_model(config, self._entries[mc.name], retry_failed)
        for name in removed:
            self._unload_model(name)
            with self._lock:
                self._entries.pop(name, None)

    def _sync_model(self, config: RepositoryConfig, entry: ModelEntry, retry_failed: bool) -> None:
        mc = entry.config
        try:
            base = resolve_inside(self.repo, mc.base_path)
            available = list_versions(base)
            if not available:
                raise ArtifactError(f"no numbered version directories under {mc.base_path!r}")
            wanted = select_versions(available, mc.version_policy)
            if not wanted:
                raise ArtifactError(
                    f"none of versions {available} match the version policy {mc.version_policy}"
                )
        except TextserveError as exc:
            with self._lock:
                entry.reason = exc.message
                entry.loaded_once = True
            log.warning("model %s: %s", mc.name, exc.message)
            return
        with self._lock:
            entry.reason = ""
        for number in sorted(wanted, reverse=True):  # newest first: it is the one that serves
            if self._closing:
                return
            current = entry.versions.get(number)
            if current is not None and not (retry_failed and current.state is VersionState.FAILED):
                continue
            self._load_version(config, entry, number)
        with self._lock:
            entry.loaded_once = True
            serving = any(
                entry.versions[n].state is VersionState.READY for n in wanted if n in entry.versions
            )
            stale = [
                v
                for n, v in entry.versions.items()
                if n not in wanted and (serving or v.state is VersionState.FAILED)
            ]
        for mv in stale:
            self._unload_version(entry, mv)

    def _version_dir(self, mc: ModelConfig, number: int) -> Path:
        base = resolve_inside(self.repo, mc.base_path)
        name = next(
            (
                p.name
                for p in base.iterdir()
                if p.is_dir() and p.name.isdigit() and int(p.name) == number
            ),
            str(number),
        )
        directory = resolve_inside(self.repo, Path(mc.base_path) / name)
        check_files_inside(self.repo, directory)
        return directory

    def _batching(self, mc: ModelConfig) -> BatchingSettings:
        b, s = mc.batching, self.settings
        return BatchingSettings(
            max_batch_size=b.max_batch_size if b.max_batch_size is not None else s.max_batch_size,
            max_wait_ms=b.max_wait_ms if b.max_wait_ms is not None else s.max_wait_ms,
            max_queue=b.max_queue if b.max_queue is not None else s.max_queue,
            max_in_flight=b.max_in_flight if b.max_in_flight is not None else s.max_in_flight,
        )

    def _embedding(
        self, config: RepositoryConfig, mc: ModelConfig, manifest: ModelManifest
    ) -> tuple[str | None, Path | None]:
        """(name, directory) of the embedding a version reads: models.yaml, else model.json."""
        if mc.embedding is not None:
            name = mc.embedding
            origin = f"models.yaml sets embedding {name!r} for model {mc.name!r}"
        elif manifest.embedding is not None:
            name = manifest.embedding.name
            origin = f"model.json names embedding {name!r}"
        else:
            return None, None
        ec = config.embedding(name)
        if ec is None:
            raise ArtifactError(f"{origin}, but models.yaml declares no embedding of that name")
        directory = resolve_inside(self.repo, ec.path)
        check_files_inside(self.repo, directory)
        em = load_embedding_manifest(directory)
        if ec.dtype is not None and em.dtype != ec.dtype:
            raise ArtifactError(
                f"embedding {name!r}: models.yaml expects dtype {ec.dtype}, "
                f"embedding.json says {em.dtype}"
            )
        if manifest.embedding is not None and not em.compatible_with(manifest.embedding):
            raise ArtifactError(
                f"embedding {name!r} (sha256 {em.sha256[:12]}…) is not the one the model was "
                f"trained with ({manifest.embedding.name!r}, sha256 "
                f"{manifest.embedding.sha256[:12]}…)"
            )
        return name, directory

    def _load_version(self, config: RepositoryConfig, entry: ModelEntry, number: int) -> None:
        from server.batching import Batcher
        from server.runtime.loader import load_runtime

        mc = entry.config
        path = Path(mc.base_path) / str(number)
        mv = ModelVersion(name=mc.name, version=number, path=path, batching=self._batching(mc))
        with self._lock:
            previous = entry.versions.get(number)
            entry.versions[number] = mv
        if previous is not None:
            self._close_runtime(previous)
            self._notify(previous, removed=True)
        self._notify(mv)
        log.info("loading %s version %d from %s", mc.name, number, path)
        runtime: Runtime | None = None
        t0 = time.monotonic()
        try:
            # Registers the version with the memory monitor when the block succeeds (READY).
            with self.memory.track(mc.name, number) as tracking:
                path = mv.path = self._version_dir(mc, number)
                manifest = load_model_manifest(path)
                mv.manifest = manifest
                if mc.format is not None and manifest.format != mc.format:
                    raise ArtifactError(
                        f"models.yaml expects format {mc.format}, model.json says {manifest.format}"
                    )
                if manifest.format not in SERVABLE_FORMATS:
                    raise ArtifactError(f"format {manifest.format} is not servable")
                mv.embedding, embedding_dir = self._embedding(config, mc, manifest)
                assert self._store is not None
                assert self._inference is not None
                runtime = load_runtime(
                    path,
                    store=self._store,
                    embedding_dir=embedding_dir,
                    intra_op_threads=self._threads.intra_op_threads,
                    inter_op_threads=self._threads.inter_op_threads,
                )
                t1 = time.monotonic()
                if self.settings.warmup:
                    warm_up(runtime, mv.batching.max_batch_size)
                self._trim()  # the load's temporaries: graph protos, checkpoint buffers
                t2 = time.monotonic()
                mv.stats = LoadStats(
                    load_seconds=t1 - t0,
                    warmup_seconds=t2 - t1,
                    memory_before=tracking.before,
                    memory_after=self.memory.sample(),
                )
                shared = self._store.get(runtime.embedding_key) if runtime.embedding_key else None
                tracking.attach(
                    runtime,
                    embedding_bytes=shared.nbytes if shared is not None else None,
                    embedding_name=mv.embedding or (shared.name if shared is not None else None),
                )
                batcher = Batcher(
                    runtime.predict,
                    runtime.tokenizer.encode_batch,
                    max_batch_size=mv.batching.max_batch_size,
                    max_wait_ms=mv.batching.max_wait_ms,
                    max_queue=mv.batching.max_queue,
                    max_in_flight=mv.batching.max_in_flight,
                    stage_full_batches=self.settings.stage_full_batches,
                    idle_split=self._threads.idle_split,
                    split_executor=self._split,
                    executor=self._inference,
                    name=f"{mc.name}:{number}",
                    observer=self.listener.batch_observer(mv) if self.listener else None,
                )
                self._on_loop(self._activate(mv, runtime, batcher))
        except Exception as exc:
            reason = _reason(exc)
            if not isinstance(exc, TextserveError):
                log.exception("model %s version %d failed to load", mc.name, number)
            with self._lock:
                mv.state = VersionState.FAILED
                mv.reason = reason
                mv.runtime = None
            if runtime is not None:
                self._close_quietly(runtime)
            self._notify(mv)
            log.warning("model %s version %d FAILED: %s", mc.name, number, reason)
            return
        self._notify(mv)
        assert mv.stats is not None
        log.info(
            "model %s version %d READY: load %.2f s, warm-up %.2f s, RSS %+.1f MiB, USS %+.1f MiB",
            mc.name,
            number,
            mv.stats.load_seconds,
            mv.stats.warmup_seconds,
            mv.stats.rss_delta / 2**20,
            mv.stats.uss_delta / 2**20,
        )

    async def _activate(self, mv: ModelVersion, runtime: Runtime, batcher: Batcher[str]) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        batcher.start()
        with self._lock:
            mv.runtime = runtime
            mv.batcher = batcher
            mv.state = VersionState.READY
            self._publish()

    def _unload_model(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            versions = list(entry.versions.values()) if entry is not None else []
        for mv in versions:
            assert entry is not None
            self._unload_version(entry, mv)
        with self._lock:
            if entry is not None:
                entry.reason = ""

    def _unload_version(self, entry: ModelEntry, mv: ModelVersion) -> None:
        with self._lock:
            was_ready = mv.state is VersionState.READY
            if was_ready:
                mv.state = VersionState.UNLOADING
            self._publish()
        if was_ready:
            self._notify(mv)
            log.info("unloading %s version %d", mv.name, mv.version)
        if mv.batcher is not None and self._loop is not None and not self._loop.is_closed():
            self._on_loop(mv.batcher.close(self.settings.drain_timeout_s))
        self._close_runtime(mv)
        with self._lock:
            if entry.versions.get(mv.version) is mv:
                del entry.versions[mv.version]
            self._publish()
        self._notify(mv, removed=True)

    def _close_runtime(self, mv: ModelVersion) -> None:
        self.memory.unregister(mv.name, mv.version)
        runtime, mv.runtime = mv.runtime, None
        if runtime is not None:
            self._close_quietly(runtime)
            self._trim()

    def _trim(self) -> None:
        if self.settings.malloc_trim:
            allocator.trim()

    @staticmethod
    def _close_quietly(runtime: Runtime) -> None:
        try:
            runtime.close()
        except Exception:
            log.exception("closing a runtime failed")
