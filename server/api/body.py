"""Request bodies in, JSON responses out: the hot path's HTTP plumbing.

Bodies are read as raw bytes (bounded by ``max_body_bytes``), parsed with orjson and answered
with orjson-serialised :class:`~starlette.responses.Response` objects; pydantic is used only to
describe the schemas in the OpenAPI document (see :mod:`server.api.schemas`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
OCTET_STREAM = "application/octet-stream"

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content, option=_DUMPS_OPTIONS),
        status_code=status,
        headers=headers,
        media_type=JSON,
    )


def media_type(request: Request) -> str | None:
    """The request's Content-Type without parameters, lower-case (None when absent)."""
    value = request.headers.get("content-type")
    if value is None:
        return None
    return value.partition(";")[0].strip().lower()


def is_json_type(media: str | None) -> bool:
    """No Content-Type at all, ``application/json`` or ``application/*+json``."""
    return (
        media is None
        or media == JSON
        or (media.startswith("application/") and media.endswith("+json"))
    )


def check_content_type(request: Request, also: frozenset[str] = frozenset()) -> str | None:
    """415 unless the body is declared JSON (or one of ``also``, or not declared at all)."""
    media = media_type(request)
    if not is_json_type(media) and media not in also:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported; send {JSON}")
    encoding = request.headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported")
    return media


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 as soon as it exceeds ``limit`` bytes (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
        if chunk:
            chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes | memoryview) -> Any:
    """orjson-parse a body; 400 naming the problem (empty, not UTF-8, not JSON)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not body:
            raise BadRequest("request body is empty; expected a JSON object") from None
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not valid UTF-8") from None
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def require_object(obj: Any) -> dict[str, Any]:
    if type(obj) is not dict:
        raise BadRequest("request body must be a JSON object")
    return obj


async def read_json_object(
    request: Request, limit: int, also: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Content type check, bounded read, orjson parse, and 'must be an object' in one call."""
    check_content_type(request, also)
    return require_object(parse_json(await read_body(request, limit)))
