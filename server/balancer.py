"""Exact connection balancing for ``--workers N``: the supervisor accepts, the workers serve.

With ``balance = "connections"`` (the default) the supervisor owns the listening socket. A
thread accepts each connection and hands it to the ready worker with the fewest open
connections (ties in turn), as Envoy's ``exact_balance`` or nginx's ``least_conn`` would. The
worker serves it like any connection it accepted itself; the only cost is one hop per *new*
connection (keep-alive requests never pass through the supervisor). The alternative,
``balance = "kernel"``, lets every worker listen with ``SO_REUSEPORT``; the kernel then hashes
connections to workers, and 64 connections split anywhere from 32/32 to 41/23
(docs/bench/README.md).

Each worker has one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair with the supervisor; messages:

* supervisor → worker: :data:`HANDOFF` with one file descriptor (``SCM_RIGHTS``): a connection;
* worker → supervisor: :data:`READY` once, when its models are loaded and it serves;
  :data:`CLOSED` each time a handed connection closes.

:class:`Balancer` is the supervisor's side, :class:`ConnectionInbox` the worker's. The listening
socket listens only once a worker is ready, so until then connections are refused, as when the
workers listen themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("textserve.balancer")

HANDOFF = b"c"
READY = b"r"
CLOSED = b"x"
BACKLOG = 2048
"""Listen backlog of the supervisor's socket (the kernel caps it at ``somaxconn``)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end) of a new worker's channel; the worker end is inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    ours.setblocking(False)
    return ours, theirs


def bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEADDR``), not listening.

    ``reuse_port`` (``balance = "kernel"``): with ``SO_REUSEPORT`` (Linux, BSD), so every worker
    binds the same port; until a socket listens the kernel gives it no connections (uvicorn
    makes a worker's listen once its models are loaded; the supervisor's ``--port 0`` holder
    never does). Without it no other process may share the port (the supervisor's socket in
    ``connections`` mode)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class _Worker:
    index: int
    channel: socket.socket
    ready: bool = False
    open: int = 0
    """Connections handed to this worker and not reported closed."""


class Balancer:
    """Accepts connections on ``listener`` and hands each to the least-loaded ready worker.

    Runs in its own thread (:meth:`start`, :meth:`stop`). :meth:`attach` and :meth:`detach`
    may be called from any thread; the balancer thread alone touches sockets and counts.
    """

    def __init__(self, listener: socket.socket, *, backlog: int = BACKLOG) -> None:
        self._listener = listener
        self._listener.setblocking(False)
        self._backlog = backlog
        self._listening = False
        self._selector = selectors.DefaultSelector()
        self._workers: dict[int, _Worker] = {}
        self._turn = itertools.count()
        self._requests: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="textserve-balancer", daemon=True)
        self.on_ready: Callable[[int], None] = lambda index: None
        """Called (in the balancer thread) when a worker reports ready."""

    # -- interface (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting (new connections are refused from now on) and end the thread.
        Connections already handed over stay with their workers."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown)
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def attach(self, index: int, channel: socket.socket) -> None:
        """Worker ``index`` (a new or restarted one) talks over ``channel``."""
        self._call(lambda: self._attach(index, channel))

    def detach(self, index: int) -> None:
        """Worker ``index`` exited: hand it nothing more."""
        self._call(lambda: self._detach(index))

    def open_connections(self) -> dict[int, int]:
        """Connections handed to each attached worker and not yet closed (a snapshot)."""
        with self._lock:
            return {i: w.open for i, w in self._workers.items()}

    # -- the balancer thread ----------------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._requests.append(fn)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r:
                    self._run_requests()
                elif key.fileobj is self._listener:
                    self._accept()
                else:
                    self._read_channel(key.data)
        for worker in list(self._workers.values()):
            self._detach(worker.index)

    def _run_requests(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            requests, self._requests = self._requests, []
        for fn in requests:
            fn()

    def _shutdown(self) -> None:
        self._stopping = True
        if self._listening:
            self._selector.unregister(self._listener)
            self._listening = False
        self._listener.close()

    def _attach(self, index: int, channel: socket.socket) -> None:
        self._detach(index)
        worker = _Worker(index, channel)
        with self._lock:
            self._workers[index] = worker
        self._selector.register(channel, selectors.EVENT_READ, worker)

    def _detach(self, index: int) -> None:
        with self._lock:
            worker = self._workers.pop(index, None)
        if worker is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.channel)
        worker.channel.close()

    def _read_channel(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.channel.recv(16)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the worker exited; the supervisor restarts it
                self._detach(worker.index)
                return
            if message == CLOSED:
                with self._lock:
                    worker.open = max(0, worker.open - 1)
            elif message == READY and not worker.ready:
                worker.ready = True
                self._listen()
                self.on_ready(worker.index)

    def _listen(self) -> None:
        if self._listening or self._stopping:
            return
        self._listener.listen(self._backlog)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._listening = True

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log, and let the next event retry
                log.warning("accept failed: %s", exc)
                return
            with conn:
                self._hand(conn)

    def _choose(self) -> list[_Worker]:
        """Ready workers, fewest open connections first, ties in turn."""
        ready = [w for w in self._workers.values() if w.ready]
        if not ready:
            return []
        shift = next(self._turn) % len(ready)
        ready = ready[shift:] + ready[:shift]
        return sorted(ready, key=lambda w: w.open)

    def _hand(self, conn: socket.socket) -> None:
        for worker in self._choose():
            try:
                socket.send_fds(worker.channel, [HANDOFF], [conn.fileno()])
            except (BlockingIOError, InterruptedError):
                continue  # that worker is not reading its channel: try the next one
            except OSError:
                self._detach(worker.index)
                continue
            with self._lock:
                worker.open += 1
            return
        log.warning("no worker could take a connection; closing it")


class ConnectionInbox:
    """The worker's side: serves the connections the supervisor hands over.

    ``protocol_factory`` makes the server's protocol for one connection (uvicorn's HTTP
    protocol); each handed socket is served with ``loop.connect_accepted_socket``. A connection's
    close is reported back so the supervisor's counts stay exact.
    """

    def __init__(
        self,
        channel: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._channel = channel
        self._channel.setblocking(False)
        self._factory = protocol_factory
        self._loop = loop
        self._adopting: set[asyncio.Task[None]] = set()
        self._reading = False

    def start(self) -> None:
        """Start taking connections and tell the supervisor this worker is ready."""
        self._loop.add_reader(self._channel.fileno(), self._on_readable)
        self._reading = True
        self._report(READY)

    async def close(self) -> None:
        """Take no more connections; serve those already received (the server's own shutdown
        then drains them like any other)."""
        if self._reading:
            self._stop_reading()
            self._on_readable()  # any handed over before the stop
        if self._adopting:
            await asyncio.gather(*self._adopting, return_exceptions=True)

    def _on_readable(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._channel, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            for fd in fds:
                sock = socket.socket(fileno=fd)
                task = self._loop.create_task(self._adopt(sock))
                self._adopting.add(task)
                task.add_done_callback(self._adopting.discard)
            if not message:  # the supervisor is gone (it takes the workers with it), or closing
                if self._reading:
                    self._stop_reading()
                return

    def _stop_reading(self) -> None:
        self._loop.remove_reader(self._channel.fileno())
        self._reading = False

    async def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            await self._loop.connect_accepted_socket(self._reporting_factory, sock)
        except OSError as exc:
            log.debug("a handed connection could not be served: %s", exc)
            sock.close()
            self._report(CLOSED)

    def _reporting_factory(self) -> asyncio.BaseProtocol:
        protocol = self._factory()
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            try:
                lost(exc)
            finally:
                self._report(CLOSED)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    def _report(self, message: bytes) -> None:
        with contextlib.suppress(OSError):  # a full or closed channel: the count drifts, harmless
            self._channel.send(message)
