"""``textserve serve`` as a real subprocess, for tests that measure the process from outside
(RSS, file descriptors, signals, exit status) or must not share the test's GIL.

Also a minimal keep-alive HTTP/1.1 client on asyncio streams: cheap enough per request that a
burst of concurrent clients measures the server, not the client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import yaml

from server.artifact import MODELS_YAML


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repo_with(small_repo: Path, dst: Path, models: Sequence[str]) -> Path:
    """A copy of the small repository (hard links) configuring only ``models`` (latest)."""
    shutil.copytree(small_repo, dst, copy_function=os.link)
    path = dst / MODELS_YAML
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["models"] = [
        {**m, "version_policy": "latest"} for m in data["models"] if m["name"] in models
    ]
    path.unlink()  # a hard link into the shared fixture
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dst


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def fds(self) -> int:
        return int(self.process.num_fds())

    def open_files(self) -> set[str]:
        """What the process's descriptors point at, as ``fd -> target`` (for a failure report)."""
        out = set()
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            try:
                out.add(f"{fd.name} -> {os.readlink(fd)}")
            except OSError:
                continue  # closed meanwhile
        return out

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait for the exit status (kill after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return int(self.proc.returncode)


def start_serve(
    repo: Path, *args: str, log: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> ServeProcess:
    """Start ``textserve serve --repo REPO ARGS`` on a free port; return once it is ready."""
    port = free_port()
    environment = {
        **os.environ,
        "TEXTSERVE_LOG_LEVEL": "warning",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
    }
    if "TEXTSERVE_ADMIN_TOKEN" not in (env or {}):
        environment.pop("TEXTSERVE_ADMIN_TOKEN", None)  # only what the test asks for
    command = [sys.executable, "-m", "server.cli", "serve", "--repo", str(repo)]
    command += ["--port", str(port), *args]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    served = ServeProcess(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"textserve serve exited with {proc.returncode}:\n{served.stderr()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{served.url}/v2/health/ready", timeout=2).status_code == 200:
                return served
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(30)
            raise TimeoutError(f"not ready within {timeout} s:\n{served.stderr()}")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(repo: Path, *args: str, log: Path, **kw: object) -> Iterator[ServeProcess]:
    served = start_serve(repo, *args, log=log, **kw)  # type: ignore[arg-type]
    try:
        yield served
    finally:
        served.stop()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's Prometheus exposition (``GET /metrics``)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{([^}}]*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{{{want}}}")


# -- a small asyncio HTTP/1.1 client ----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class Connection:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def open(self) -> None:
        """Connect now (so a later :meth:`post` only writes and reads)."""
        await self._connect()

    @property
    def local_port(self) -> int:
        """This end's port (the server sees it as the peer's)."""
        if self._writer is None:
            raise ConnectionError("not connected")
        return int(self._writer.get_extra_info("sockname")[1])

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Reply:
        reader, writer = await self._connect()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        ).encode("latin-1")
        t0 = time.monotonic()
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        reply_headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            reply_headers[key.strip().lower()] = value.strip()
        content = await reader.readexactly(int(reply_headers.get("content-length", "0")))
        seconds = time.monotonic() - t0
        if reply_headers.get("connection", "").lower() == "close":
            await self.close()
        return Reply(status, reply_headers, content, seconds)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
