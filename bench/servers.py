"""Start, probe and stop the servers under test (each its own process, pinned to given cores)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.models import BenchModel


@dataclass
class Server:
    kind: str
    """``textserve`` or ``naive``."""
    process: subprocess.Popen[bytes]
    host: str
    port: int
    path: str
    """The classify route wrk posts to."""
    log: Path
    cpus: tuple[int, ...]
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and its children so far."""
        proc = psutil.Process(self.process.pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def memory(self) -> dict[str, int]:
        """RSS, USS and PSS summed over the server and its children (``--workers`` processes).

        Summed RSS counts pages the workers share (the mmap'd embedding, libraries) once per
        worker; USS and PSS do not."""
        proc = psutil.Process(self.process.pid)
        processes = [proc, *proc.children(recursive=True)]
        total = {"rss": 0, "uss": 0, "pss": 0}
        for p in processes:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            for key in total:
                total[key] += int(getattr(info, key))
        total["processes"] = len(processes)
        return total


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def classify_path(model: str) -> str:
    return f"/v1/models/{model}:classify"


def _spawn(
    cmd: Sequence[str], log: Path, cpus: Sequence[int], env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    # Pinned before the interpreter has imported anything, so every later thread inherits it.
    os.sched_setaffinity(proc.pid, set(cpus))
    return proc


def textserve_command() -> list[str]:
    script = Path(sys.executable).with_name("textserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def start_textserve(
    model: BenchModel,
    log: Path,
    cpus: Sequence[int],
    settings: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Server:
    """The real ``textserve serve`` on ``model``'s repository; ``settings`` as TEXTSERVE_* env."""
    port = free_port(host)
    env = {f"TEXTSERVE_{k.upper()}": v for k, v in (settings or {}).items()}
    env["TEXTSERVE_LOG_LEVEL"] = env.get("TEXTSERVE_LOG_LEVEL", "warning")
    cmd = [*textserve_command(), "serve", "--repo", str(model.repo), "--host", host]
    cmd += ["--port", str(port)]
    proc = _spawn(cmd, log, cpus, env)
    return Server(
        "textserve", proc, host, port, classify_path(model.name), log, tuple(cpus), dict(env)
    )


def start_naive(
    model: BenchModel, log: Path, cpus: Sequence[int], host: str = "127.0.0.1"
) -> Server:
    """``bench/naive_server.py`` serving the same model version."""
    port = free_port(host)
    cmd = [sys.executable, "-m", "bench.naive_server", "--version-dir", str(model.version_dir)]
    if model.embedding_dir is not None:
        cmd += ["--embedding-dir", str(model.embedding_dir)]
    cmd += ["--host", host, "--port", str(port)]
    proc = _spawn(cmd, log, cpus, {})
    return Server("naive", proc, host, port, classify_path(model.name), log, tuple(cpus))


def post(server: Server, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("POST", server.path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(server: Server, body: bytes, timeout_s: float = 300.0) -> float:
    """Poll with a real classify request until it answers 200; seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{server.kind} exited ({server.process.returncode}):\n{tail}")
        try:
            status, data = post(server, body, timeout=10)
            if status == 200:
                return time.monotonic() - t0
            last = f"{status} {data[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"{server.kind} not ready after {timeout_s:.0f} s: {last}")


def wait_idle(server: Server, window_s: float = 0.25, timeout_s: float = 60.0) -> float:
    """Wait until ``server`` uses under 5 % of a core over ``window_s``; seconds waited.

    Requests a finished wrk run left behind (wrk closes its connections, but a server need
    not drop work already queued) must not spill into the next measurement.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        before = server.cpu_seconds()
        time.sleep(window_s)
        if server.cpu_seconds() - before < 0.05 * window_s:
            break
    return time.monotonic() - t0


def stop(server: Server, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
    proc = server.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
