"""Memory accounting for a process serving many models: what each model costs, and the process.

Figures and what they mean
--------------------------
Process-wide (psutil ``memory_full_info``, sampled every ``memory_sample_interval_s``):

``rss``  every resident page the process maps, shared ones included. Per process: two worker
         processes mapping the same embedding file each count all of it.
``uss``  pages only this process holds — what killing it would give back. File pages another
         process also maps (a shared mmap'd embedding) are not in it.
``pss``  RSS with each shared page divided by the number of processes mapping it: summing PSS
         over the workers counts a shared mmap'd embedding once.

Per model version (:class:`ModelMemory`):

``own``          exact bytes of the model's own tensors (``Runtime.own_bytes``: conv/dense
                 weights, and the embedding constant of a self-contained graph).
``embedding``    bytes of the shared embedding the model reads (matrix + int8 scales), which is
                 held once per process whatever the number of models reading it; ``sharers``
                 is how many loaded model versions read it.
``attributed``   ``own + embedding / sharers``: summed over all loaded versions this counts every
                 distinct embedding exactly once (the remainder bytes of the division go to the
                 first sharers by name, so the sums are exact).
``rss_growth``,  the process's RSS/USS after load + warm-up minus before, measured by
``uss_growth``   :meth:`MemoryMonitor.track`. Honest but coarse: it includes allocator slack and
                 state TensorFlow creates lazily (the first session in a process also pays for
                 thread pools and kernel registration), the first model to use an embedding
                 pays for loading it and later sharers do not, and anything else the process
                 does during the load (other requests) lands in it too. The registry loads
                 serially to keep it meaningful. It can be negative (memory freed meanwhile).

Tensor accounting (``own``, ``embedding``) is exact and stable; growth is what the operating
system saw. Neither includes TensorFlow itself (~500 MiB USS per process after
``import tensorflow``), which is the process baseline.

Nothing here imports a transport: ``report()`` is JSON-ready for ``GET /v1/memory``, and
:meth:`MemoryMonitor.model_memory` / :meth:`MemoryMonitor.latest` feed the metrics module's
``textserve_model_memory_bytes{model,version,kind}`` and ``textserve_process_memory_bytes{kind}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)

#: The kinds :meth:`MemoryMonitor.model_memory` reports per model version.
MODEL_MEMORY_KINDS = ("own", "embedding_share", "attributed", "rss_growth", "uss_growth")
#: The kinds of :class:`ProcessMemory`.
PROCESS_MEMORY_KINDS = ("rss", "uss", "pss")


@dataclass(frozen=True)
class ProcessMemory:
    rss: int
    uss: int
    pss: int


def process_memory(process: psutil.Process | None = None) -> ProcessMemory:
    """RSS, USS and PSS of ``process`` (default: this process), in bytes.

    Reads ``/proc/<pid>/smaps``: ~10 ms for a process that has imported TensorFlow.
    """
    proc = process or psutil.Process()
    info = proc.memory_full_info()
    return ProcessMemory(rss=int(info.rss), uss=int(info.uss), pss=int(getattr(info, "pss", 0)))


class _RuntimeLike(Protocol):
    """What :meth:`Tracking.attach` reads (a ``server.runtime.base.Runtime``)."""

    @property
    def own_bytes(self) -> int: ...

    @property
    def embedding_key(self) -> str | None: ...


EmbeddingSizer = Callable[[str], int | None]
"""Embedding key (sha256) → bytes held for it (e.g. the embedding store's accounting)."""


@dataclass(frozen=True)
class LoadGrowth:
    """Process memory before and after one load + warm-up."""

    before: ProcessMemory
    after: ProcessMemory
    seconds: float

    @property
    def rss(self) -> int:
        return self.after.rss - self.before.rss

    @property
    def uss(self) -> int:
        return self.after.uss - self.before.uss


@dataclass(frozen=True)
class ModelMemory:
    """What one loaded model version costs (see the module docstring for each figure)."""

    model: str
    version: int
    own_bytes: int
    embedding_key: str | None
    embedding_name: str | None
    embedding_bytes: int
    sharers: int
    """Loaded versions reading the same embedding (this one included); 0 without embedding."""
    embedding_share: int
    growth: LoadGrowth | None

    @property
    def attributed_bytes(self) -> int:
        return self.own_bytes + self.embedding_share

    def kinds(self) -> dict[str, int]:
        """Figures by gauge kind (``textserve_model_memory_bytes{kind=...}``)."""
        out = {
            "own": self.own_bytes,
            "embedding_share": self.embedding_share,
            "attributed": self.attributed_bytes,
        }
        if self.growth is not None:
            out["rss_growth"] = self.growth.rss
            out["uss_growth"] = self.growth.uss
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "own_bytes": self.own_bytes,
            "embedding": None
            if self.embedding_key is None
            else {
                "key": self.embedding_key,
                "name": self.embedding_name,
                "bytes": self.embedding_bytes,
                "sharers": self.sharers,
                "share_bytes": self.embedding_share,
            },
            "attributed_bytes": self.attributed_bytes,
            "load": None
            if self.growth is None
            else {
                "rss_growth_bytes": self.growth.rss,
                "uss_growth_bytes": self.growth.uss,
                "seconds": round(self.growth.seconds, 6),
            },
        }


@dataclass
class _Entry:
    own_bytes: int
    embedding_key: str | None
    embedding_name: str | None
    embedding_bytes: int
    growth: LoadGrowth | None


@dataclass
class Tracking:
    """Handed out by :meth:`MemoryMonitor.track`; say what was loaded with :meth:`attach`."""

    model: str
    version: int
    before: ProcessMemory
    started: float
    _attached: _Entry | None = field(default=None, repr=False)

    def attach(
        self,
        runtime: _RuntimeLike,
        *,
        embedding_bytes: int | None = None,
        embedding_name: str | None = None,
    ) -> None:
        """Record the loaded runtime's ``own_bytes`` and ``embedding_key``.

        ``embedding_bytes`` defaults to the monitor's sizer for that key.
        """
        self.attach_figures(
            own_bytes=runtime.own_bytes,
            embedding_key=runtime.embedding_key,
            embedding_bytes=embedding_bytes,
            embedding_name=embedding_name,
        )

    def attach_figures(
        self,
        *,
        own_bytes: int,
        embedding_key: str | None,
        embedding_bytes: int | None = None,
        embedding_name: str | None = None,
    ) -> None:
        if own_bytes < 0 or (embedding_bytes is not None and embedding_bytes < 0):
            raise ValueError("byte counts cannot be negative")
        self._attached = _Entry(
            own_bytes=own_bytes,
            embedding_key=embedding_key,
            embedding_name=embedding_name,
            embedding_bytes=-1 if embedding_bytes is None else embedding_bytes,
            growth=None,
        )


@dataclass(frozen=True)
class Sample:
    memory: ProcessMemory
    at: float
    """``time.monotonic()`` when taken."""


class MemoryMonitor:
    """Per-model attribution plus a periodic sampler of the process's RSS/USS/PSS.

    Thread-safe: the loader thread registers, the sampler thread samples, the event loop reads.
    """

    def __init__(
        self,
        interval_s: float = 5.0,
        *,
        embedding_sizer: EmbeddingSizer | None = None,
        on_sample: Callable[[MemoryMonitor, ProcessMemory], None] | None = None,
        process: psutil.Process | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._sizer = embedding_sizer
        self._on_sample = on_sample
        self._process = process or psutil.Process()
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._latest: Sample | None = None
        self._peak_rss = 0
        self._peak_uss = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- per model ----------------------------------------------------------------------------
    @contextmanager
    def track(self, model: str, version: int) -> Iterator[Tracking]:
        """Measure RSS/USS around a load + warm-up; register the model if the block succeeds.

        Inside the block, call ``tracking.attach(runtime)``. If the block raises, or never
        attaches, nothing is registered. If the figures cannot be registered (embedding bytes
        unknown or inconsistent), a warning is logged and the load is left alone.
        """
        tracking = Tracking(model, version, self.sample(), time.monotonic())
        yield tracking
        attached = tracking._attached
        if attached is None:
            log.warning("memory: %s:%d loaded without attach(); not tracked", model, version)
            return
        after = self.sample()
        attached.growth = LoadGrowth(tracking.before, after, time.monotonic() - tracking.started)
        try:
            self._register_entry(model, version, attached)
        except ValueError as exc:  # accounting must never fail a load that succeeded
            log.warning("memory: %s:%d not tracked: %s", model, version, exc)

    def register(
        self,
        model: str,
        version: int,
        *,
        own_bytes: int,
        embedding_key: str | None,
        embedding_bytes: int | None = None,
        embedding_name: str | None = None,
        growth: LoadGrowth | None = None,
    ) -> None:
        """Register (or replace) a loaded version without measuring growth."""
        if own_bytes < 0 or (embedding_bytes is not None and embedding_bytes < 0):
            raise ValueError("byte counts cannot be negative")
        entry = _Entry(
            own_bytes,
            embedding_key,
            embedding_name,
            -1 if embedding_bytes is None else embedding_bytes,
            growth,
        )
        self._register_entry(model, version, entry)

    def _register_entry(self, model: str, version: int, entry: _Entry) -> None:
        if entry.embedding_key is None:
            entry.embedding_bytes = 0
        elif entry.embedding_bytes < 0:
            size = self._sizer(entry.embedding_key) if self._sizer is not None else None
            if size is None:
                raise ValueError(
                    f"{model}:{version}: bytes of embedding {entry.embedding_key[:12]}… unknown "
                    "(pass embedding_bytes or give the monitor an embedding_sizer)"
                )
            entry.embedding_bytes = size
        with self._lock:
            for (m, v), other in self._entries.items():
                if (
                    entry.embedding_key is not None
                    and (m, v) != (model, version)
                    and other.embedding_key == entry.embedding_key
                    and other.embedding_bytes != entry.embedding_bytes
                ):
                    raise ValueError(
                        f"embedding {entry.embedding_key[:12]}… registered with "
                        f"{other.embedding_bytes} bytes by {m}:{v}, now {entry.embedding_bytes}"
                    )
            self._entries[(model, version)] = entry

    def unregister(self, model: str, version: int) -> bool:
        """Forget an unloaded version; False if it was not registered."""
        with self._lock:
            return self._entries.pop((model, version), None) is not None

    def models(self) -> list[ModelMemory]:
        """Every registered version, sorted by (model, version), with shares computed now."""
        with self._lock:
            items = sorted(self._entries.items())
        users: dict[str, list[tuple[str, int]]] = {}
        for key, e in items:
            if e.embedding_key is not None:
                users.setdefault(e.embedding_key, []).append(key)
        out = []
        for key, e in items:
            share, sharers = 0, 0
            if e.embedding_key is not None:
                sharing = users[e.embedding_key]
                sharers = len(sharing)
                base, extra = divmod(e.embedding_bytes, sharers)
                share = base + (1 if sharing.index(key) < extra else 0)
            out.append(
                ModelMemory(
                    model=key[0],
                    version=key[1],
                    own_bytes=e.own_bytes,
                    embedding_key=e.embedding_key,
                    embedding_name=e.embedding_name,
                    embedding_bytes=e.embedding_bytes,
                    sharers=sharers,
                    embedding_share=share,
                    growth=e.growth,
                )
            )
        return out

    def get(self, model: str, version: int) -> ModelMemory | None:
        return next((m for m in self.models() if (m.model, m.version) == (model, version)), None)

    def model_memory(self) -> Iterator[tuple[str, str, dict[str, int]]]:
        """``(model, version, {kind: bytes})`` for ``Metrics.set_model_memory``.

        Shares change whenever a sharer loads or unloads: refresh every model, not just one.
        """
        for m in self.models():
            yield m.model, str(m.version), m.kinds()

    # -- process ------------------------------------------------------------------------------
    def sample(self) -> ProcessMemory:
        """Take one process sample now (also what the sampler thread calls)."""
        mem = process_memory(self._process)
        with self._lock:
            self._latest = Sample(mem, time.monotonic())
            self._samples += 1
            self._peak_rss = max(self._peak_rss, mem.rss)
            self._peak_uss = max(self._peak_uss, mem.uss)
        return mem

    def latest(self) -> ProcessMemory | None:
        """The most recent sample (None before the first)."""
        with self._lock:
            return self._latest.memory if self._latest is not None else None

    def process_memory(self) -> Iterator[tuple[str, int]]:
        """``(kind, bytes)`` of the latest sample, kinds ``rss``, ``uss``, ``pss``."""
        mem = self.latest()
        if mem is not None:
            yield from (("rss", mem.rss), ("uss", mem.uss), ("pss", mem.pss))

    @property
    def samples(self) -> int:
        with self._lock:
            return self._samples

    def start(self) -> None:
        """Start the sampler thread (idempotent). It samples at once, then every interval."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="textserve-memory", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the sampler and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mem = self.sample()
                if self._on_sample is not None:
                    self._on_sample(self, mem)
            except Exception:  # a failed sample must never kill the sampler
                log.exception("memory sample failed")
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- report -------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """JSON-ready summary for ``GET /v1/memory`` (bytes everywhere)."""
        models = self.models()
        with self._lock:
            latest, samples = self._latest, self._samples
            peak_rss, peak_uss = self._peak_rss, self._peak_uss
        embeddings: dict[str, dict[str, Any]] = {}
        for m in models:
            if m.embedding_key is None:
                continue
            e = embeddings.setdefault(
                m.embedding_key,
                {
                    "key": m.embedding_key,
                    "name": m.embedding_name,
                    "bytes": m.embedding_bytes,
                    "models": [],
                },
            )
            e["models"].append({"model": m.model, "version": m.version})
            e["name"] = e["name"] or m.embedding_name
        process = None
        if latest is not None:
            process = {
                "rss_bytes": latest.memory.rss,
                "uss_bytes": latest.memory.uss,
                "pss_bytes": latest.memory.pss,
                "peak_rss_bytes": peak_rss,
                "peak_uss_bytes": peak_uss,
                "age_seconds": round(time.monotonic() - latest.at, 3),
                "samples": samples,
                "interval_seconds": self.interval_s,
            }
        own = sum(m.own_bytes for m in models)
        shared = sum(e["bytes"] for e in embeddings.values())
        return {
            "process": process,
            "models": [m.as_dict() for m in models],
            "embeddings": list(embeddings.values()),
            "totals": {
                "models": len(models),
                "own_bytes": own,
                "embedding_bytes": shared,
                "attributed_bytes": sum(m.attributed_bytes for m in models),
                "tensor_bytes": own + shared,
            },
        }
