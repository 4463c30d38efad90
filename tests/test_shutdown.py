"""Graceful shutdown of a real ``textserve serve`` process on SIGTERM.

Many large requests are in flight (queued behind each other in the model's batcher, and two
still uploading their bodies) when SIGTERM arrives: the server stops accepting connections at
once, answers every in-flight request with 200 and the right number of results, and exits with
status 0. A request that outlives ``--drain-timeout-s`` does not hold the exit back.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serve_process import ServeProcess, metric, repo_with, start_serve

PATH = "/v1/models/pos:classify"
SENTENCE = (
    "the small brown dog ran quickly across a wide green field near the old river bank while "
    "an old man watched it from a wooden bench and slowly ate his bread in the warm sun"
)


@pytest.fixture
def repo(small_repo: Path, tmp_path: Path) -> Path:
    return repo_with(small_repo, tmp_path / "repo", ["pos"])


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


class RawRequest:
    """A POST over its own socket, sent synchronously (it is in flight when the constructor
    returns); with ``hold`` only that many body bytes are sent until :meth:`finish`."""

    def __init__(self, url: str, texts: int, hold: int | None = None) -> None:
        self.texts = texts
        body = json.dumps({"texts": [f"{SENTENCE} {i}" for i in range(texts)]}).encode()
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        cut = len(body) if hold is None else hold
        self.sock.sendall(head + body[:cut])
        self.rest = body[cut:]

    def finish(self) -> tuple[int, Any]:
        """Send the rest of the body; (status, JSON answer)."""
        with self.sock:
            if self.rest:
                self.sock.sendall(self.rest)
            stream = self.sock.makefile("rb")
            status = int(stream.readline().split()[1])
            length = 0
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            return status, json.loads(stream.read(length))


def wait_accepted(served: ServeProcess, requests: list[RawRequest]) -> None:
    """Until the server has accepted every request's connection and read what was sent (a
    connection still in the listen backlog when the listener closes is reset by the kernel:
    it was never in flight)."""
    ports = {r.sock.getsockname()[1] for r in requests}
    deadline = time.monotonic() + 30
    while True:
        connections = served.process.net_connections(kind="tcp")
        if ports <= {c.raddr.port for c in connections if c.raddr}:
            break
        assert time.monotonic() < deadline, "the server did not accept the connections"
        time.sleep(0.02)
    time.sleep(0.3)  # the event loop has read the requests (headers and what body was sent)


def answered(request: RawRequest) -> None:
    status, answer = request.finish()
    assert status == 200, answer
    assert len(answer["results"]) == request.texts


def test_sigterm_finishes_in_flight_requests_and_exits_0(repo: Path, tmp_path: Path) -> None:
    served: ServeProcess = start_serve(
        repo,
        *("--drain-timeout-s", "60", "--inference-threads", "1", "--max-queue", "100000"),
        log=tmp_path / "serve.log",
    )
    try:
        # Two requests still uploading their bodies, 24 large ones queued in the batcher.
        held = [RawRequest(served.url, 300, hold=200), RawRequest(served.url, 5, hold=10)]
        queued = [RawRequest(served.url, 1024) for _ in range(24)]
        wait_accepted(served, [*held, *queued])
        waiting = metric(served.url, "textserve_queue_depth", model="pos", version="2")
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not refuses_connections(served.url):
            assert time.monotonic() < deadline, "still accepting connections 5 s after SIGTERM"
            time.sleep(0.02)
        refused_after = time.monotonic() - t0
        for request in [*queued, *held]:
            answered(request)
        answered_after = time.monotonic() - t0
        status = served.proc.wait(60)
        exited_after = time.monotonic() - t0
    finally:
        served.stop()
    assert status == 0, served.stderr()
    assert waiting > 0, "no work was left in the queue when SIGTERM came"
    assert refused_after < 2.0
    assert "Traceback" not in served.stderr()
    print(
        f"\nSIGTERM with {len(queued) + len(held)} requests in flight "
        f"({sum(r.texts for r in queued + held)} texts, {waiting:.0f} still queued): "
        f"connections refused after "
        f"{refused_after * 1e3:.0f} ms, all answered 200 after {answered_after:.2f} s, "
        f"exit 0 after {exited_after:.2f} s"
    )


def test_drain_timeout_bounds_the_shutdown(repo: Path, tmp_path: Path) -> None:
    """A request that never completes its body cannot hold the process for longer than the
    drain timeout; the process still exits 0."""
    served = start_serve(repo, "--drain-timeout-s", "1", log=tmp_path / "serve.log")
    try:
        stuck = RawRequest(served.url, 3, hold=10)
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        status = served.proc.wait(30)
        elapsed = time.monotonic() - t0
        stuck.sock.close()
    finally:
        served.stop()
    assert status == 0, served.stderr()
    assert elapsed < 1 + 5, elapsed
