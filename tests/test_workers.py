"""``textserve serve --workers 2``: real worker processes on one port, supervised.

Each test starts the real command; the supervisor forks two ``--reuse-port`` workers that each
load the repository. Checked from outside: both workers answer, ``/metrics`` sums them, a
killed worker is replaced without the port going dark, admin load/unload are refused (they
would change one process only), SIGTERM drains and exits 0 with no worker left behind, and a
repository whose workers cannot start makes the supervisor give up with status 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from tests.serve_process import (
    Connection,
    ServeProcess,
    free_port,
    repo_with,
    serving,
    start_serve,
)

CLASSIFY = "/v1/models/pos:classify"


@pytest.fixture
def repo(small_repo: Path, tmp_path: Path) -> Path:
    return repo_with(small_repo, tmp_path / "repo", ["pos"])


def workers_of(served: ServeProcess) -> list[psutil.Process]:
    """The live worker processes (a killed one not yet reaped is skipped)."""
    out = []
    for child in served.process.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "--reuse-port" in child.cmdline():
                out.append(child)
        except psutil.Error:
            continue
    return out


def classified_total(url: str) -> float:
    """``textserve_requests_total`` of 200 answers on the classify route, every version."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = "textserve_requests_total{"
    wanted = ('model="pos"', 'route="/v1/models/{name}:classify"', 'status="200"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and all(w in line for w in wanted)
    )


def listening(process: psutil.Process) -> bool:
    """A worker listens only once its models are loaded (it binds its socket earlier)."""
    return any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp"))


def wait_until(cond: object, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        time.sleep(0.1)


async def classify_over(url: str, connections: int, per_connection: int) -> list[int]:
    """Statuses of ``connections`` keep-alive clients posting ``per_connection`` texts each."""

    async def client(i: int) -> list[int]:
        conn = Connection(url)
        await conn.open()
        try:
            statuses = []
            for j in range(per_connection):
                body = orjson.dumps({"texts": [f"text {i} {j} about a small dog"]})
                statuses.append((await conn.post(CLASSIFY, body)).status)
            return statuses
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(i) for i in range(connections)))
    return [s for r in results for s in r]


def test_two_workers_share_the_port_and_the_metrics(repo: Path, tmp_path: Path) -> None:
    with serving(repo, "--workers", "2", log=tmp_path / "serve.log") as served:
        wait_until(lambda: len(workers_of(served)) == 2, 30, "two workers")
        # both must be ready before the load, or one could take every connection
        wait_until(lambda: all(listening(w) for w in workers_of(served)), 120, "both listening")
        statuses = asyncio.run(classify_over(served.url, connections=16, per_connection=10))
        assert statuses == [200] * 160
        # counters from every worker's files are summed in any worker's /metrics
        total = classified_total(served.url)
        assert total == 160
        pids = {str(w.pid) for w in workers_of(served)}
        wait_until(
            lambda: (
                pids
                <= {
                    line.split('pid="')[1].split('"')[0]
                    for line in httpx.get(f"{served.url}/metrics", timeout=10).text.splitlines()
                    if line.startswith("textserve_process_memory_bytes{")
                }
            ),
            30,
            "both workers' memory gauges (one series per pid)",
        )


def test_a_killed_worker_is_replaced_and_sigterm_stops_everything(
    repo: Path, tmp_path: Path
) -> None:
    served = start_serve(repo, "--workers", "2", log=tmp_path / "serve.log")
    try:
        wait_until(lambda: len(workers_of(served)) == 2, 30, "two workers")
        wait_until(lambda: all(listening(w) for w in workers_of(served)), 120, "both listening")
        victim = workers_of(served)[0]
        victim.send_signal(signal.SIGKILL)
        wait_until(
            lambda: (
                len(workers_of(served)) == 2
                and victim.pid not in {w.pid for w in workers_of(served)}
            ),
            30,
            "a replacement worker",
        )
        for _ in range(20):  # the survivor answers while the replacement loads
            assert (
                httpx.post(f"{served.url}{CLASSIFY}", json={"texts": ["a dog"]}).status_code == 200
            )
        children = workers_of(served)
    finally:
        code = served.stop()
    assert code == 0, served.stderr()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert "exited with status -9" in served.stderr()


def test_admin_load_and_unload_are_refused_with_several_workers(repo: Path, tmp_path: Path) -> None:
    env = {"TEXTSERVE_ADMIN_TOKEN": "s3cret"}
    with serving(repo, "--workers", "2", log=tmp_path / "serve.log", env=env) as served:
        headers = {"Authorization": "Bearer s3cret"}
        for action in ("load", "unload"):
            r = httpx.post(f"{served.url}/v2/repository/models/pos/{action}", headers=headers)
            assert r.status_code == 409, r.text
            assert "workers" in r.json()["error"]
        assert httpx.post(f"{served.url}{CLASSIFY}", json={"texts": ["a dog"]}).status_code == 200


def test_workers_that_cannot_start_stop_the_supervisor(repo: Path, tmp_path: Path) -> None:
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))  # no SO_REUSEPORT: every worker's bind fails
    blocker.listen()
    try:
        command = [sys.executable, "-m", "server.cli", "serve", "--repo", str(repo)]
        command += ["--port", str(port), "--workers", "2"]
        env = {**os.environ, "TEXTSERVE_LOG_LEVEL": "warning", "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)
    finally:
        blocker.close()
    assert done.returncode == 1
    assert b"keep failing to start" in done.stderr
