"""Per-request deadlines: the optional ``X-Request-Timeout-Ms`` header.

A client that will stop waiting after N milliseconds says so with ``X-Request-Timeout-Ms: N``
(a decimal integer, 1 to 3 600 000). The deadline counts from when the server has read the
request's headers; reading the body counts against it. If the request's texts have not started
running by then, it is answered 504 and its texts are dropped from the model's queue, so no CPU
goes to an answer nobody reads. Texts already in a running batch finish and are answered (a
``session.run`` cannot be interrupted). A malformed value is a 400. Without the header a
request waits as long as it takes.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from server.errors import BadRequest

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
MAX_TIMEOUT_MS = 3_600_000


def request_deadline(request: Request) -> float | None:
    """The request's deadline as a ``time.monotonic()`` instant, or None without the header."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    text = value.strip()
    if not (
        text.isascii() and text.isdigit() and len(text) <= 7 and 1 <= int(text) <= MAX_TIMEOUT_MS
    ):
        raise BadRequest(
            f"{TIMEOUT_HEADER} must be an integer number of milliseconds, 1 to {MAX_TIMEOUT_MS}"
        )
    return time.monotonic() + int(text) / 1000.0
