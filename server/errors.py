"""One exception hierarchy for textserve.

Every error the core raises carries the HTTP status it maps to, so the transport layer
(``server/api``) needs exactly one handler to turn any of them into ``{"error": "..."}``.
The core never imports FastAPI; it only names statuses from :mod:`http`.
"""

from __future__ import annotations

from http import HTTPStatus


class TextserveError(Exception):
    """Base class. ``status`` is the HTTP status a client should see."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. ``Retry-After``)."""
        return {}


class BadRequest(TextserveError):
    """The request is malformed or violates a documented limit."""

    status = HTTPStatus.BAD_REQUEST


class UnsupportedMediaType(TextserveError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class PayloadTooLarge(TextserveError):
    """Too many texts, or a body over ``max_body_bytes``."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotFound(TextserveError):
    status = HTTPStatus.NOT_FOUND


class ModelNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class Unauthorized(TextserveError):
    status = HTTPStatus.UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(TextserveError):
    status = HTTPStatus.FORBIDDEN


class Conflict(TextserveError):
    """The request cannot be carried out in the server's current configuration."""

    status = HTTPStatus.CONFLICT


class ModelNotReady(TextserveError):
    """The model exists but is LOADING, FAILED or UNLOADING."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Overloaded(TextserveError):
    """A bounded queue is full: the client should retry later."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ShuttingDown(Overloaded):
    """The server is draining and accepts no new work."""


class DeadlineExceeded(TextserveError):
    status = HTTPStatus.GATEWAY_TIMEOUT


class ArtifactError(TextserveError):
    """A model repository file is missing, corrupt or inconsistent.

    Raised while loading; the registry records the message as the model's FAILED reason.
    Also used by the toolchain CLI for bad input files.
    """

    status = HTTPStatus.UNPROCESSABLE_ENTITY


class ConfigError(ArtifactError):
    """``models.yaml`` or settings are invalid."""


class UsageError(TextserveError):
    """Bad command-line input: printed as one line, exit status 2."""

    status = HTTPStatus.BAD_REQUEST
