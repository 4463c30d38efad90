"""One ``send`` per response: :mod:`server.api.http_protocol`.

The transport tests run a real asyncio TCP connection on loopback (the default selector loop,
whose transports are Python objects, so a test can count the real transport's ``write`` calls).
The last test reads a real served response with one ``recv``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import orjson

from server.api.http_protocol import CoalescingTransport
from tests.server.conftest import LiveServer


class _Sink(asyncio.Protocol):
    """The reading end: collects bytes until EOF."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self._more: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def received(self, n: int) -> bytes:
        """The bytes received once there are at least ``n`` (5 s at most)."""
        while len(self.data) < n:
            self._more = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._more, 5)
        return bytes(self.data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[CoalescingTransport, list[bytes], _Sink]]:
    """A coalescing transport over a real loopback TCP connection, the real transport's writes
    recorded, and the peer's sink."""
    loop = asyncio.get_running_loop()
    sink_ready: asyncio.Future[_Sink] = loop.create_future()

    def accept() -> _Sink:
        sink = _Sink()
        sink_ready.set_result(sink)
        return sink

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    sink = await sink_ready
    writes: list[bytes] = []
    real_write: Callable[[Any], None] = transport.write

    def recording_write(data: Any) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = recording_write  # type: ignore[method-assign]
    try:
        yield CoalescingTransport(transport, loop), writes, sink
    finally:
        transport.abort()
        server.close()
        await server.wait_closed()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """On a selector loop, whose transports are Python objects (uvloop's are not)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main)


def test_writes_of_one_step_leave_in_one_write() -> None:
    _run(_writes_of_one_step_leave_in_one_write())


async def _writes_of_one_step_leave_in_one_write() -> None:
    async with _pair() as (coalescing, writes, sink):
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(b"{}")
        assert writes == []  # nothing left yet: the flush runs after this step
        assert coalescing.get_write_buffer_size() >= 40
        await asyncio.sleep(0)
        assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        assert (await sink.received(40)).endswith(b"\r\n\r\n{}")


def test_writes_of_separate_steps_stay_separate_and_in_order() -> None:
    _run(_writes_of_separate_steps_stay_separate_and_in_order())


async def _writes_of_separate_steps_stay_separate_and_in_order() -> None:
    async with _pair() as (coalescing, writes, sink):
        for chunk in (b"a", b"b", b"c"):
            coalescing.write(chunk)
            coalescing.write(bytearray(chunk.upper()))
            await asyncio.sleep(0)
        coalescing.writelines([b"x", memoryview(b"y")])
        coalescing.write(b"")  # ignored, as by asyncio's transports
        await asyncio.sleep(0)
        assert writes == [b"aA", b"bB", b"cC", b"xy"]
        assert await sink.received(8) == b"aAbBcCxy"


def test_close_sends_what_is_pending_first() -> None:
    _run(_close_sends_what_is_pending_first())


async def _close_sends_what_is_pending_first() -> None:
    async with _pair() as (coalescing, writes, sink):
        coalescing.write(b"last ")
        coalescing.write(b"words")
        coalescing.close()
        await asyncio.wait_for(sink.closed, 5)
        assert bytes(sink.data) == b"last words"
        assert writes == [b"last words"]
        await asyncio.sleep(0)  # the scheduled flush finds nothing to do
        assert writes == [b"last words"]


def test_write_eof_sends_what_is_pending_first() -> None:
    _run(_write_eof_sends_what_is_pending_first())


async def _write_eof_sends_what_is_pending_first() -> None:
    async with _pair() as (coalescing, _, sink):
        coalescing.write(b"half")
        coalescing.write_eof()
        await asyncio.wait_for(sink.closed, 5)
        assert bytes(sink.data) == b"half"


def test_abort_drops_what_is_pending() -> None:
    _run(_abort_drops_what_is_pending())


async def _abort_drops_what_is_pending() -> None:
    async with _pair() as (coalescing, writes, sink):
        coalescing.write(b"never sent")
        coalescing.abort()
        await asyncio.wait_for(sink.closed, 5)
        await asyncio.sleep(0)
        assert writes == []
        assert bytes(sink.data) == b""
        assert coalescing.is_closing()  # delegated to the real transport


TCP_INFO_SEGS_IN = 140
"""Offset of ``tcpi_segs_in`` (u32) in Linux's ``struct tcp_info`` (since 4.2)."""


def _segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, TCP_INFO_SEGS_IN)[0])


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(1 << 16)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def test_a_served_response_is_one_tcp_segment(live_server: LiveServer) -> None:
    """The real server's answers, counted in TCP segments the client received (``TCP_INFO``):
    about one per response (headers and body together); uvicorn alone sends two."""
    host, port = live_server.url.removeprefix("http://").split(":")
    body = orjson.dumps({"texts": ["a dog barked at the postman"]})
    request = (
        b"POST /v1/models/noun-topic:classify HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    rounds = 40
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        _read_response(sock)  # connection set up, quick-ACK phase over
        before = _segments_in(sock)
        for _ in range(rounds):
            sock.sendall(request)
            assert orjson.loads(_read_response(sock))["results"][0]["label"]
        segments = _segments_in(sock) - before
    # A stray pure ACK may add a segment now and then; two writes per response would be 80.
    assert rounds <= segments <= rounds * 1.25, segments
