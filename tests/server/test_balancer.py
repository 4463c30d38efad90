"""The connection balancer (:mod:`server.balancer`) over real sockets.

The test plays the workers: it holds the worker ends of real channels, reads the connections
the :class:`Balancer` hands over (real file descriptors of real TCP connections) and reports
readiness and closes as a worker does. :class:`ConnectionInbox` runs on a real event loop
with a small echo protocol instead of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from server.balancer import (
    CLOSED,
    HANDOFF,
    READY,
    Balancer,
    ConnectionInbox,
    bound_socket,
    channel_pair,
)


class FakeWorker:
    """The worker end of a channel, driven by the test."""

    def __init__(self, balancer: Balancer, index: int) -> None:
        ours, self.channel = channel_pair()
        self.channel.settimeout(5)
        balancer.attach(index, ours)
        self.received: list[socket.socket] = []

    def ready(self) -> None:
        self.channel.send(READY)

    def closed(self, n: int = 1) -> None:
        for _ in range(n):
            self.channel.send(CLOSED)

    def take(self, timeout: float = 0.2) -> int:
        """Receive every connection handed over until the channel stays quiet."""
        self.channel.settimeout(timeout)
        n = 0
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, 4)
            except TimeoutError:
                return n
            assert message == HANDOFF
            assert len(fds) == 1
            self.received.append(socket.socket(fileno=fds[0]))
            n += 1

    def close(self) -> None:
        for s in self.received:
            s.close()
        self.channel.close()


@pytest.fixture
def balancer() -> Iterator[tuple[Balancer, int]]:
    listener = bound_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    b = Balancer(listener)
    b.start()
    try:
        yield b, port
    finally:
        b.stop()


def connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def wait_for(cond: object, what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_nothing_listens_before_a_worker_is_ready(balancer: tuple[Balancer, int]) -> None:
    b, port = balancer
    worker = FakeWorker(b, 0)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        worker.ready()
        wait_for(lambda: _accepts(port), "listening after READY")
        assert worker.take() == 1
    finally:
        worker.close()


def listening_with(worker: FakeWorker, port: int) -> None:
    """Report ``worker`` ready, wait until the port accepts, drop the probe's connection."""
    worker.ready()
    wait_for(lambda: _accepts(port), "listening after READY")
    worker.take()
    worker.closed()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def test_connections_go_to_the_worker_with_fewest_open_ones(
    balancer: tuple[Balancer, int],
) -> None:
    b, port = balancer
    w0, w1 = FakeWorker(b, 0), FakeWorker(b, 1)
    clients: list[socket.socket] = []
    try:
        listening_with(w0, port)
        clients += connect(port, 6)  # only worker 0 is ready: it takes them all
        assert (w0.take(), w1.take()) == (6, 0)
        w1.ready()
        wait_for(lambda: b.open_connections() == {0: 6, 1: 0}, "counts before the catch-up")
        clients += connect(port, 10)  # 6 to catch up, then alternating
        assert (w0.take(), w1.take()) == (2, 8)
        assert b.open_connections() == {0: 8, 1: 8}
        w1.closed(3)  # three of worker 1's connections closed: it gets the next three
        wait_for(lambda: b.open_connections() == {0: 8, 1: 5}, "closes counted")
        clients += connect(port, 3)
        assert (w0.take(), w1.take()) == (0, 3)
        clients += connect(port, 64)
        assert (w0.take(), w1.take()) == (32, 32)
    finally:
        for c in clients:
            c.close()
        w0.close()
        w1.close()


def test_the_handed_socket_is_the_clients_connection(balancer: tuple[Balancer, int]) -> None:
    b, port = balancer
    worker = FakeWorker(b, 0)
    try:
        listening_with(worker, port)
        (client,) = connect(port, 1)
        assert worker.take() == 1
        served = worker.received[-1]
        client.sendall(b"ping")
        assert served.recv(4) == b"ping"
        served.sendall(b"pong")
        assert client.recv(4) == b"pong"
        client.close()
    finally:
        worker.close()


def test_a_worker_that_goes_away_gets_nothing_more(balancer: tuple[Balancer, int]) -> None:
    b, port = balancer
    w0, w1 = FakeWorker(b, 0), FakeWorker(b, 1)
    clients: list[socket.socket] = []
    try:
        listening_with(w0, port)
        w1.ready()
        w1.channel.close()  # the worker exited
        wait_for(lambda: 1 not in b.open_connections(), "worker 1 detached")
        clients += connect(port, 5)
        assert w0.take() == 5
        b.detach(0)  # and the last one: connections are accepted and closed, not handed
        wait_for(lambda: not b.open_connections(), "worker 0 detached")
        (client,) = connect(port, 1)
        assert client.recv(1) == b""
        client.close()
    finally:
        for c in clients:
            c.close()
        w0.close()


def test_stop_refuses_new_connections_and_keeps_handed_ones() -> None:
    listener = bound_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    b = Balancer(listener)
    b.start()
    worker = FakeWorker(b, 0)
    try:
        listening_with(worker, port)
        (client,) = connect(port, 1)
        assert worker.take() == 1
        b.stop()
        assert not b.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"still here")
        assert worker.received[-1].recv(10) == b"still here"
        client.close()
        b.stop()  # idempotent
    finally:
        worker.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _inbox_round_trip() -> tuple[list[bytes], list[bytes]]:
    loop = asyncio.get_running_loop()
    supervisor_end, worker_end = channel_pair()
    supervisor_end.setblocking(True)
    supervisor_end.settimeout(5)
    inbox = ConnectionInbox(worker_end, Echo, loop)
    inbox.start()
    first = await loop.run_in_executor(None, supervisor_end.recv, 16)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    echoes = []
    with server:
        for i in range(3):
            client = socket.create_connection(server.getsockname(), timeout=5)
            accepted, _ = server.accept()
            with accepted:
                socket.send_fds(supervisor_end, [HANDOFF], [accepted.fileno()])
            client.setblocking(False)
            with client:
                await loop.sock_sendall(client, f"hello {i}".encode())
                echoes.append(await asyncio.wait_for(loop.sock_recv(client, 64), 5))
    closes = [
        await loop.run_in_executor(None, supervisor_end.recv, 16) for _ in range(3)
    ]  # each client's close reaches the supervisor
    await inbox.close()
    supervisor_end.close()
    worker_end.close()
    return [first, *closes], echoes


def test_the_inbox_serves_handed_connections_and_reports_ready_and_closes() -> None:
    messages, echoes = asyncio.run(_inbox_round_trip())
    assert echoes == [b"hello 0", b"hello 1", b"hello 2"]
    assert messages == [READY, CLOSED, CLOSED, CLOSED]


def test_bound_socket_refuses_a_port_in_use() -> None:
    with contextlib.closing(bound_socket("127.0.0.1", 0)) as first:
        first.listen()
        port = first.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            bound_socket("127.0.0.1", port)
