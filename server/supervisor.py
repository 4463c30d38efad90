"""Several ``textserve serve`` worker processes on one port (``--workers N``).

Why: one process runs all HTTP parsing, JSON and tokenizing on one event-loop thread, which
on a small machine leaves a core idle while TensorFlow waits for the next batch. N workers
each run their own registry, batchers and sessions. The embedding files are memory-mapped,
so their pages are shared between the workers; each worker pays for its own TensorFlow
runtime and per-model state (docs/bench/README.md has the measured trade).

Connections reach the workers one of two ways (``balance``):

* ``connections`` (default): this process listens, accepts each connection and hands it to the
  ready worker with the fewest open connections (:mod:`server.balancer`);
* ``kernel``: every worker binds the address with ``SO_REUSEPORT`` and the kernel spreads
  connections over them by hash.

This module is the parent. It:

* resolves the port once (``--port 0`` picks a free one for all workers; in ``kernel`` mode it
  is held by a bound, non-listening ``SO_REUSEPORT`` socket so no other program takes it);
* runs each worker as ``python -m server.cli serve --handoff-fd FD`` (or ``--reuse-port --port
  P``) with the parent's effective settings in ``TEXTSERVE_*`` variables, and an empty
  ``PROMETHEUS_MULTIPROC_DIR`` (on ``/dev/shm`` when it exists) so ``/metrics`` from any worker
  sums all of them (:mod:`server.metrics`);
* restarts a worker that exits on its own (after marking its metrics dead), unless workers
  keep dying within :data:`FAST_EXIT_S` of their start :data:`MAX_FAST_EXITS` times in a row
  (a broken repository, a port in use): then it stops all of them and exits 1;
* on SIGTERM/SIGINT stops accepting, forwards SIGTERM to every worker (each drains its
  requests, see ``textserve serve``), waits ``drain_timeout_s`` + :data:`STOP_GRACE_S`, kills
  stragglers, and exits 0 if every worker exited 0.

All timeouts use the monotonic clock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from server.balancer import Balancer, bound_socket, channel_pair
from server.errors import ConfigError
from server.metrics import MULTIPROC_ENV
from server.settings import Settings

log = logging.getLogger("textserve.supervisor")

FAST_EXIT_S = 10.0
"""A worker that exits sooner than this after its start counts as failing to start."""
MAX_FAST_EXITS = 3
"""This many fast exits in a row stop the server (exit status 1)."""
STOP_GRACE_S = 10.0
"""Beyond ``drain_timeout_s``, how long workers get to exit before SIGKILL."""
POLL_S = 0.2


def _die_with_parent() -> None:
    """In the forked child: SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def worker_environment(settings: Settings, metrics_dir: Path) -> dict[str, str]:
    """The parent's environment plus every effective setting as ``TEXTSERVE_<NAME>``."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"TEXTSERVE_{name.upper()}"
        if value is None:
            env.pop(key, None)
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    env[MULTIPROC_ENV] = str(metrics_dir)
    return env


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts, restarts and stops ``settings.workers`` worker processes."""

    def __init__(self, settings: Settings, *, access_log: bool = False) -> None:
        self.settings = settings
        self.access_log = access_log
        self._stop = threading.Event()
        self._workers: dict[int, _Worker] = {}
        self._fast_exits = 0
        self.port = settings.port
        self._balancer: Balancer | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0 if every worker drained cleanly) or until workers
        keep failing to start (exit 1)."""
        with (
            self._port_reserved(),
            self._balancing(),
            self._metrics_dir() as metrics_dir,
            self._signals(),
        ):
            env = worker_environment(
                self.settings.model_copy(update={"port": self.port}), metrics_dir
            )
            log.info(
                "textserve: %d workers on %s:%d (balance: %s)",
                self.settings.workers,
                self.settings.host,
                self.port,
                self.settings.balance,
            )
            for index in range(self.settings.workers):
                self._spawn(index, env)
            failed = self._watch(env, metrics_dir)
            codes = self._stop_all()
        return 1 if failed or any(code != 0 for code in codes) else 0

    # -- lifecycle -------------------------------------------------------------------------

    def _command(self, handoff_fd: int | None) -> list[str]:
        cmd = [sys.executable, "-m", "server.cli", "serve"]
        if handoff_fd is None:
            cmd += ["--reuse-port", "--port", str(self.port)]
        else:
            cmd += ["--handoff-fd", str(handoff_fd)]
        return [*cmd, "--access-log"] if self.access_log else cmd

    def _spawn(self, index: int, env: dict[str, str]) -> None:
        # Own session: a terminal's Ctrl-C reaches the parent only, which sends one SIGTERM
        # (a second signal would make uvicorn skip the drain). Parent-death signal: a killed
        # parent takes its workers with it.
        # balance=connections: the worker gets its end of a channel (our copy closes after the
        # fork) and the balancer the other.
        ours, theirs = channel_pair() if self._balancer is not None else (None, None)
        handoff = None if theirs is None else theirs.fileno()
        try:
            process = subprocess.Popen(
                self._command(handoff),
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                pass_fds=() if handoff is None else (handoff,),
            )
        finally:
            if theirs is not None:
                theirs.close()
        if self._balancer is not None and ours is not None:
            self._balancer.attach(index, ours)
        self._workers[index] = _Worker(index, process)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _watch(self, env: dict[str, str], metrics_dir: Path) -> bool:
        """Restart workers that exit until asked to stop. True if they keep failing."""
        from prometheus_client import multiprocess

        while not self._stop.wait(POLL_S):
            for index, worker in list(self._workers.items()):
                code = worker.process.poll()
                if code is None:
                    continue
                lived = time.monotonic() - worker.started
                if self._balancer is not None:
                    self._balancer.detach(index)
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    worker.process.pid, str(metrics_dir)
                )
                log.error(
                    "worker %d (pid %d) exited with status %s after %.1f s",
                    index,
                    worker.process.pid,
                    code,
                    lived,
                )
                self._fast_exits = self._fast_exits + 1 if lived < FAST_EXIT_S else 0
                if self._fast_exits >= MAX_FAST_EXITS:
                    log.error("workers keep failing to start; stopping the server")
                    del self._workers[index]
                    return True
                self._spawn(index, env)
        return False

    def _stop_all(self) -> list[int]:
        """Stop accepting, SIGTERM every worker, wait for the drain, SIGKILL what is left; exit
        statuses."""
        if self._balancer is not None:
            self._balancer.stop()
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + STOP_GRACE_S
        codes = []
        for worker in self._workers.values():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                code = worker.process.wait(timeout=remaining)
                # Killed by our SIGTERM before it had installed its handlers (still importing):
                # it stopped because we asked, like a drained exit.
                codes.append(0 if code == -signal.SIGTERM else code)
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                codes.append(worker.process.wait())
        return codes

    # -- resources ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _port_reserved(self) -> Iterator[None]:
        """With ``--port 0`` in ``kernel`` mode: pick one free port for all workers and hold it
        while they run (in ``connections`` mode the supervisor's own socket holds it)."""
        if self.port != 0 or self.settings.balance == "connections":
            yield
            return
        holder = bound_socket(self.settings.host, 0, reuse_port=True)
        self.port = int(holder.getsockname()[1])
        try:
            yield
        finally:
            holder.close()

    @contextlib.contextmanager
    def _balancing(self) -> Iterator[None]:
        """In ``connections`` mode: bind the port and run the balancer (it listens once a worker
        is ready)."""
        if self.settings.balance != "connections":
            yield
            return
        try:
            listener = bound_socket(self.settings.host, self.port)
        except OSError as exc:
            where = f"{self.settings.host}:{self.port}"
            raise ConfigError(f"cannot bind {where}: {exc.strerror or exc}") from None
        self.port = int(listener.getsockname()[1])
        self._balancer = Balancer(listener)
        self._balancer.on_ready = lambda index: log.info("worker %d ready", index)
        self._balancer.start()
        try:
            yield
        finally:
            self._balancer.stop()  # no-op when _stop_all already stopped it

    @contextlib.contextmanager
    def _metrics_dir(self) -> Iterator[Path]:
        shm = Path("/dev/shm")
        path = Path(
            tempfile.mkdtemp(prefix="textserve-metrics-", dir=shm if shm.is_dir() else None)
        )
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; stopping the workers", signal.Signals(signum).name)
            self._stop.set()

        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, stop) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
