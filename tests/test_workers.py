"""``textserve serve --workers 2``: real worker processes on one port, supervised.

Each test starts the real command; the supervisor forks two workers that each load the
repository and either take the connections the supervisor hands them (``balance``
``connections``, the default) or listen themselves with ``SO_REUSEPORT`` (``kernel``). Checked
from outside: both workers answer, connections are split evenly (``connections``),
``/metrics`` sums the workers, a killed worker is replaced without the port going dark, admin
load/unload are refused (they would change one process only), SIGTERM drains and exits 0 with
no worker left behind, workers that cannot start make the supervisor give up with status 1,
and a port in use is one line and status 1.
"""

from __future__ import annotations

import asyncio
import os
import re
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
            cmdline = child.cmdline()
            worker = "--reuse-port" in cmdline or "--handoff-fd" in cmdline
            if child.status() != psutil.STATUS_ZOMBIE and worker:
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
    """A ``kernel``-mode worker listens only once its models are loaded (it binds earlier)."""
    return any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp"))


def ready_workers(served: ServeProcess) -> int:
    """Workers the supervisor has logged ready (``connections`` mode, log level info)."""
    return len(set(re.findall(r"worker (\d+) ready", served.stderr())))


def established(process: psutil.Process) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED for c in process.net_connections(kind="tcp"))


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


def wait_both_ready(served: ServeProcess, balance: str) -> None:
    """Both workers serving: before that the load could all go to one of them."""
    wait_until(lambda: len(workers_of(served)) == 2, 30, "two workers")
    if balance == "kernel":
        wait_until(lambda: all(listening(w) for w in workers_of(served)), 120, "both listening")
    else:
        wait_until(lambda: ready_workers(served) == 2, 120, "both ready")


INFO = {"TEXTSERVE_LOG_LEVEL": "info"}  # the supervisor logs "worker N ready"


@pytest.mark.parametrize("balance", ["connections", "kernel"])
def test_two_workers_share_the_port_and_the_metrics(
    repo: Path, tmp_path: Path, balance: str
) -> None:
    args = ("--workers", "2", "--balance", balance)
    with serving(repo, *args, log=tmp_path / "serve.log", env=INFO) as served:
        wait_both_ready(served, balance)
        assert all(not listening(w) for w in workers_of(served)) == (balance == "connections")
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


def client_ports(process: psutil.Process) -> set[int]:
    """Client-side ports of the worker's established connections."""
    return {
        c.raddr.port
        for c in process.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr
    }


async def open_connections(url: str, n: int) -> list[Connection]:
    """``n`` keep-alive connections, each with one request answered (so each was handed)."""
    conns = [Connection(url) for _ in range(n)]
    await asyncio.gather(*(c.open() for c in conns))
    body = orjson.dumps({"texts": ["a small dog"]})
    replies = await asyncio.gather(*(c.post(CLASSIFY, body) for c in conns))
    assert [r.status for r in replies] == [200] * n
    return conns


def test_connections_are_split_evenly_and_closed_ones_make_room(repo: Path, tmp_path: Path) -> None:
    with serving(repo, "--workers", "2", log=tmp_path / "serve.log", env=INFO) as served:
        wait_both_ready(served, "connections")
        first, second = workers_of(served)

        def split(expected: list[int]) -> None:
            wait_until(
                lambda: [established(first), established(second)] == expected,
                10,
                f"connections per worker {expected}",
            )

        async def scenario() -> None:
            conns = await open_connections(served.url, 64)
            split([32, 32])
            # close the 32 connections of the first worker: it must get the next ones
            ports = client_ports(first)
            mine = [c for c in conns if c.local_port in ports]
            assert len(mine) == 32
            await asyncio.gather(*(c.close() for c in mine))
            split([0, 32])
            conns = [c for c in conns if c not in mine]
            conns += await open_connections(served.url, 40)  # 32 to catch up, then 4 + 4
            split([36, 36])
            await asyncio.gather(*(c.close() for c in conns))

        asyncio.run(scenario())
        split([0, 0])


def test_a_killed_worker_is_replaced_and_sigterm_stops_everything(
    repo: Path, tmp_path: Path
) -> None:
    served = start_serve(repo, "--workers", "2", log=tmp_path / "serve.log", env=INFO)
    try:
        wait_both_ready(served, "connections")
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


def serve_on_a_port_in_use(repo: Path, balance: str) -> subprocess.CompletedProcess[bytes]:
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))  # no SO_REUSEPORT: nobody else may bind the port
    blocker.listen()
    try:
        command = [sys.executable, "-m", "server.cli", "serve", "--repo", str(repo)]
        command += ["--port", str(port), "--workers", "2", "--balance", balance]
        env = {**os.environ, "TEXTSERVE_LOG_LEVEL": "warning", "TF_CPP_MIN_LOG_LEVEL": "2"}
        return subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)
    finally:
        blocker.close()


def test_workers_that_cannot_start_stop_the_supervisor(repo: Path) -> None:
    done = serve_on_a_port_in_use(repo, "kernel")  # every worker's own bind fails
    assert done.returncode == 1
    assert b"keep failing to start" in done.stderr


def test_a_port_in_use_is_one_line_and_status_1(repo: Path) -> None:
    done = serve_on_a_port_in_use(repo, "connections")  # the supervisor binds it
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[-1].startswith("textserve: error: cannot bind")
    assert b"Traceback" not in done.stderr
