"""Server settings: one pydantic-settings class, environment prefix ``TEXTSERVE_``.

Precedence: CLI flags > environment (``TEXTSERVE_PORT=9000``) > ``.env`` file > defaults.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TEXTSERVE_", env_file=".env", extra="ignore", use_attribute_docstrings=True
    )

    repo: Path = Path("model_repository")
    """Model repository directory (holds models.yaml)."""
    host: str = "127.0.0.1"
    """Address to bind. Use 0.0.0.0 in containers."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    log_level: str = "info"
    """Log level for textserve and uvicorn."""

    workers: int = Field(default=1, ge=1, le=64)
    """Server processes sharing the port (see ``balance``), each with its own TensorFlow and
    sessions; the embedding's mmap'd pages are shared. With the thread settings unset, each of
    2 workers on 2 cores runs batches on one core and splits a lone request over both
    (``idle_split``). Against 2 intra-op threads per worker, side by side (5 reps): single
    texts +13 % texts/s at 64 connections, +29 % at 8, +31 % at 1; 64-text requests level at 1
    connection (0.88 of the in-process ceiling), +4 % at 8 and 64 (docs/bench/README.md). Costs
    ~+350 MiB private memory per extra worker. With more than one, admin load/unload answer 409
    and /v1/memory describes the worker that answered."""
    balance: Literal["connections", "kernel"] = "connections"
    """How ``workers`` > 1 share connections. ``connections``: the supervisor accepts each one and
    hands it to the ready worker with the fewest open connections (exact; one extra hop per new
    connection, none per keep-alive request). ``kernel``: each worker listens with
    SO_REUSEPORT and the kernel hashes connections to workers (64 connections split from 32/32
    to 41/23 in the bench)."""
    intra_op_threads: int | None = Field(default=None, ge=0)
    """TensorFlow intra-op threads per session (0 = TensorFlow's default). Unset: the CPUs this
    process may use (affinity, bounded by a cgroup CPU quota) divided by ``workers`` (at least
    1): 2 for one process on 2 cores, 1 for each of 2 workers."""
    inter_op_threads: int | None = Field(default=None, ge=0)
    """TensorFlow inter-op threads per session (0 = TensorFlow's default). With one, a session
    runs the kernels of concurrent predicts one after the other. Unset: ``idle_split``'s value,
    so the slices of an idle split run at once."""
    inference_threads: int = Field(default=2, ge=1)
    """Threads running session.run off the event loop (shared by all models)."""
    inference_nice: int | None = Field(default=None, ge=0, le=19)
    """Added to the nice value of the threads that load and run models (TensorFlow's own
    thread pools inherit it; Linux), so the event loop, which reads requests and sends
    answers, gets a core first when both want one. 0 = equal priority. Unset: 10 when each
    batch runs on one thread (``intra_op_threads`` resolves to 1, as for 2 workers on 2
    cores: single texts at conc. 64 p99 32.5 -> 28.0 ms, +5 % texts/s at conc. 512), else 0
    (TensorFlow's intra-op threads wait for each other, and preempting one stalls the rest:
    one process with 2 threads lost 13 % texts/s at conc. 64; docs/bench/README.md)."""

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Default largest batch (texts) one session.run receives; models.yaml may override."""
    max_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    """Default longest time a partial batch waits for more texts (from its oldest request).
    0 is work-conserving: texts that arrive while a batch runs still join the next one, but a
    finished batch is never held for more. Against 2 ms, in twelve side-by-side comparisons
    (single texts), 0 had more texts/s at conc. 8 eleven times and at conc. 64 nine times; p99
    went either way (docs/bench/README.md). Raise it for open-loop clients whose batches fill."""
    max_queue: int = Field(default=4096, ge=1)
    """Default bound on queued texts per model version; beyond it: 503 + Retry-After."""
    max_in_flight: int = Field(default=1, ge=1, le=64)
    """Default number of predicts (session.run) one model version runs at once; models.yaml may
    override. 2 lets a batch start while another runs (needs inference_threads >= 2): on 2 shared
    cores +5-12 % texts/s, but more CPU per single text and a worse p99 (docs/bench/README.md)."""

    idle_split: int | None = Field(default=None, ge=1, le=16)
    """A batch that starts while its model is idle (a lone request) runs as up to this many
    concurrent predicts of row slices (at least 8 texts each), tokenized once: with one intra-op
    thread per session a lone request still uses the idle cores, while batches that follow one
    another under load run whole, one core each (cheaper per text than TensorFlow's intra-op
    split). Needs ``inter_op_threads`` >= this. Unset: the CPUs divided by the intra-op threads,
    at most 8 and at most a set ``inter_op_threads`` (1 for one process on 2 cores, 2 for each
    of 2 workers); 1 = off."""

    stage_full_batches: bool = True
    """Hand a full batch to an inference thread while ``max_in_flight`` predicts run: it is
    padded and starts the moment one ends, without a round trip through the event loop."""

    max_texts_per_request: int = Field(default=1024, ge=1)
    """More texts in one request → 413."""
    max_text_chars: int = Field(default=20_000, ge=1)
    """A longer text → 413, naming the text's index."""
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """A larger request body → 413."""
    max_top_k: int = Field(default=100, ge=1)
    """Largest accepted ``top_k`` (capped further by the model's number of labels)."""

    warmup: bool = True
    """Run each model on a few batch shapes before marking it READY."""
    malloc_trim: bool = True
    """glibc only: after each model load and unload, return free heap pages to the kernel
    (``malloc_trim``: a load's temporaries, an unloaded model's graph)."""
    lean_tensorflow: bool = False
    """Memory over speed: TensorFlow's oneDNN ops allocate with malloc instead of a pool that
    keeps its peak (``TF_ONEDNN_USE_SYSTEM_ALLOCATOR``), and glibc's mmap threshold is fixed so
    large blocks go back to the kernel when freed. Ten seed-scale models: ~17 MiB less RSS at
    rest, batches ~15-30 % slower (docs/memory/README.md)."""
    memory_sample_interval_s: float = Field(default=5.0, gt=0)
    """How often process memory (RSS/USS/PSS) is sampled."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests may take to finish."""
    admin_token: SecretStr | None = None
    """Bearer token for /v2/repository/* admin routes; unset → those routes answer 403."""
    opentelemetry: bool = False
    """Let FastAPI's native OpenTelemetry instrumentation trace and measure requests (it needs
    an OpenTelemetry SDK configured in the process). Off by default: the Prometheus metrics
    cover every request, and FastAPI's check for a configured provider cost ~3 us a request,
    ~2 % of the event loop's time per single-text request (measured)."""

    # -- resolved thread layout (the unset fields' values) ------------------------------------

    def thread_layout(self) -> ThreadLayout:
        """The thread counts (and TensorFlow's nice increment) the server runs with: set fields
        as they are, unset ones derived from :func:`available_cpus` (read once here) and
        ``workers``."""
        cpus = available_cpus()
        intra = self.intra_op_threads
        if intra is None:
            intra = max(1, cpus // self.workers)
        split = self.idle_split
        if split is None:
            split = min(AUTO_SPLIT_MAX, max(1, cpus // (intra or cpus)))
            if self.inter_op_threads:  # set: slices beyond it would run one after the other
                split = min(split, self.inter_op_threads)
        inter = self.inter_op_threads if self.inter_op_threads is not None else split
        nice = self.inference_nice
        if nice is None:
            nice = AUTO_NICE if intra == 1 else 0
        return ThreadLayout(
            intra_op_threads=intra, inter_op_threads=inter, idle_split=split, inference_nice=nice
        )


class ThreadLayout(NamedTuple):
    """Resolved ``intra_op_threads``, ``inter_op_threads``, ``idle_split`` and
    ``inference_nice``."""

    intra_op_threads: int
    inter_op_threads: int
    idle_split: int
    inference_nice: int


AUTO_NICE = 10
"""The unset ``inference_nice`` when each batch runs on one thread."""


AUTO_SPLIT_MAX = 8
"""The unset ``idle_split`` never exceeds this (a batch of 64 has at most 8 slices of 8)."""


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a cpuset), bounded by a
    cgroup CPU quota (``docker run --cpus 2``, a Kubernetes CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def cgroup_cpu_quota(root: Path) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None without one or when unreadable."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or "100000")
        v1 = root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
