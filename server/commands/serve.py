"""``textserve serve``: serve a model repository over HTTP (uvicorn; ``--workers N`` processes).

Settings come from :class:`~server.settings.Settings` (environment ``TEXTSERVE_*``, ``.env``);
flags given on the command line override them. uvicorn runs with uvloop and httptools, the
access log off unless ``--access-log``. On SIGINT/SIGTERM it stops accepting connections,
lets in-flight requests finish (up to ``drain_timeout_s``), then drains the batchers and
closes every session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.artifact import MODELS_YAML, load_repository_config
from server.errors import ConfigError, UsageError
from server.settings import Settings

# flag dest → Settings field (same name); type for argparse
_FLAGS: dict[str, tuple[type, str]] = {
    "repo": (Path, "model repository directory (holds models.yaml)"),
    "host": (str, "address to bind"),
    "port": (int, "TCP port (0 picks a free one)"),
    "log_level": (str, "log level (debug, info, warning, error)"),
    "workers": (int, "server processes sharing the port; default 1"),
    "balance": (str, "how workers share connections: connections (default) or kernel"),
    "intra_op_threads": (int, "TensorFlow intra-op threads per session"),
    "inter_op_threads": (int, "TensorFlow inter-op threads per session"),
    "inference_threads": (int, "threads running session.run (shared by all models)"),
    "max_batch_size": (int, "default largest batch per session.run"),
    "max_wait_ms": (float, "default longest wait for a batch to fill"),
    "max_queue": (int, "default bound on queued texts per model version"),
    "max_texts_per_request": (int, "more texts in one request answer 413"),
    "max_text_chars": (int, "a longer text answers 413"),
    "max_body_bytes": (int, "a larger body answers 413"),
    "max_top_k": (int, "largest accepted top_k (400 above it)"),
    "drain_timeout_s": (float, "on shutdown, how long in-flight work may take"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    for dest, (kind, help_text) in _FLAGS.items():
        flag = "--" + dest.replace("_", "-")
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        default=None,
        help="mark models READY without running them on a few batch shapes first",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (slower; off by default)"
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--handoff-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Set by the supervisor: run as one of --workers N, either binding the port with
    # SO_REUSEPORT (--reuse-port) or serving the connections handed over a channel (--handoff-fd).


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        dest: getattr(args, dest)
        for dest in (*_FLAGS, "warmup")
        if getattr(args, dest, None) is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"invalid settings: {details}") from None


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not (settings.repo / MODELS_YAML).is_file():
        raise ConfigError(
            f"{settings.repo / MODELS_YAML}: not found (build one with `textserve build-demo`)"
        )
    load_repository_config(settings.repo)  # a broken models.yaml: one line, exit status 1

    import uvicorn

    from server.api.app import create_app

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handoff_fd: int | None = getattr(args, "handoff_fd", None)
    worker = bool(getattr(args, "reuse_port", False)) or handoff_fd is not None
    if settings.workers > 1 and not worker:
        from server.supervisor import Supervisor

        return Supervisor(settings, access_log=bool(args.access_log)).run()
    config = uvicorn.Config(
        create_app(settings, serve_when_loaded=worker),
        host=settings.host,
        port=settings.port,
        **uvicorn_options(),
        access_log=bool(args.access_log),
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )
    server = _server_class()(config)
    if handoff_fd is not None:
        server.handoff_fd = handoff_fd
        server.run(sockets=[])  # no socket of its own: the supervisor hands connections over
    elif worker:
        from server.balancer import bound_socket

        # Bound, not listening: uvicorn listens after the lifespan startup (models loaded).
        server.run(sockets=[bound_socket(settings.host, settings.port, reuse_port=True)])
    else:
        server.run()
    # A SIGTERM while still loading (a --workers worker stopped by its supervisor) is an
    # orderly stop too; only a failed startup with nobody asking to stop is an error.
    return 0 if server.started or server.signalled else 1


def uvicorn_options() -> dict[str, Any]:
    """The ``uvicorn.Config`` options every textserve server runs with (the test fixtures' real
    servers too): uvloop, httptools behind one ``send`` per response
    (:mod:`server.api.http_protocol`), lifespan on, no ``server`` header."""
    from server.api.http_protocol import CoalescingHttpToolsProtocol

    return {
        "loop": "uvloop",
        "http": CoalescingHttpToolsProtocol,
        "lifespan": "on",
        "server_header": False,
    }


def _server_class() -> type[Any]:
    import uvicorn

    from server.balancer import ConnectionInbox

    class Server(uvicorn.Server):
        """uvicorn's server, except that a drained shutdown on SIGTERM/SIGINT exits with 0, also
        when the signal came before startup finished.

        (uvicorn re-raises the signal after its graceful shutdown, so the process would die of
        it — status 143 — after having finished every request.)
        """

        signalled = False
        handoff_fd: int | None = None
        """With ``--handoff-fd``: serve the connections the supervisor hands over this channel."""
        _inbox: ConnectionInbox | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.handoff_fd is None or not self.started or self.should_exit:
                return
            loop = asyncio.get_running_loop()
            config, state, app_state = self.config, self.server_state, self.lifespan.state

            def protocol() -> asyncio.BaseProtocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=state, app_state=app_state, _loop=loop
                )

            self._inbox = ConnectionInbox(socket.socket(fileno=self.handoff_fd), protocol, loop)
            self._inbox.start()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self._inbox is not None:
                await self._inbox.close()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signalled = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server
