"""uvicorn's httptools protocol with one ``send`` per response instead of two.

uvicorn writes a response's status line and headers (``http.response.start``) and its body
(``http.response.body``) with two ``transport.write`` calls. With ``TCP_NODELAY`` each is its own
``send`` syscall and its own TCP segment, and on a loopback or LAN connection a ``send`` also
pays for delivering the segment (waking the reader). For textserve's small JSON answers the
two ``send`` calls took about a quarter of the event loop's time per single-text request, the
one left takes about a tenth (``py-spy``, ``docs/bench/README.md``).

:class:`CoalescingTransport` collects the writes made during one event-loop step and hands
them to the real transport as one ``write`` from a callback scheduled with ``call_soon`` —
after the task that wrote them yields, before the loop polls for I/O again. Headers and body
written by one ``send`` pair therefore leave in one syscall and one segment. Order is kept (all
writes go through the buffer); ``close``/``write_eof`` flush first, ``abort`` drops what is
pending, as the real transport would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A :class:`asyncio.Transport` proxy whose ``write``\\ s of one loop step leave together.

    Everything but ``write``, ``writelines``, ``close``, ``write_eof``, ``abort`` and
    ``get_write_buffer_size`` is delegated to the real transport.
    """

    __slots__ = ("_loop", "_pending", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._size += len(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Hand everything written so far to the real transport in one ``write``."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        if self._transport.is_closing():
            return  # the peer went away meanwhile; the real transport would drop it too
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._size = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
