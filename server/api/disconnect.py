"""Drop the work of a request whose client went away.

Once a request's body has been read, the next ASGI ``receive()`` completes only when the client
disconnects (or the response is complete). :func:`unless_disconnected` awaits the inference
while one ``receive()`` waits beside it; an ``http.disconnect`` cancels the inference — the
batcher then takes the request's texts that have not started out of its queue, so the model
never runs them — and raises :class:`ClientDisconnected`. Its handler answers 499 (nginx's
"client closed request"), which nobody reads (uvicorn drops writes to a closed connection) but
the request metrics count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from server.api.body import json_response

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled with :class:`ClientDisconnected` if the client disconnects.

    Call only after the request body has been read completely.
    """
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always inside a task under an ASGI server
        return await work
    gone = False

    def on_message(watch: asyncio.Future[Any]) -> None:
        nonlocal gone
        if watch.cancelled() or watch.exception() is not None:
            return
        message = watch.result()
        if isinstance(message, dict) and message.get("type") == "http.disconnect":
            gone = True
            task.cancel()

    watcher: asyncio.Future[Any] = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientDisconnected("the client disconnected") from None
        raise
    finally:
        if not watcher.done():
            watcher.remove_done_callback(on_message)
            watcher.cancel()


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """Exception handler: a 499 that only the request metrics will see."""
    return json_response({"error": "client closed request"}, CLIENT_CLOSED_REQUEST)
