"""Model repository admin routes, compatible with Triton's model repository extension.

* ``POST /v2/repository/index`` (body optional, ``{"ready": true}`` lists only READY versions)
  → ``[{"name", "version", "state", "reason"}, ...]``: one entry per model version, or one
  per model that has none loaded (``state`` UNAVAILABLE after an unload, FAILED with a reason).
* ``POST /v2/repository/models/{name}/load``: re-read ``models.yaml`` and (re)load ``name``:
  version directories that appeared are loaded and warmed up *before* they replace the version
  serving now; FAILED versions are retried; versions the policy no longer selects are retired
  once a newer one serves. Answers when done: 200 with the model's versions, or 400 naming what
  failed (whatever served before keeps serving). A ``models.yaml`` that does not parse is a 400
  and changes nothing. A name missing from ``models.yaml`` is a 404.
* ``POST /v2/repository/models/{name}/unload``: drain and unload every version of ``name``
  (queued requests are answered first); the model stays configured, UNAVAILABLE, until loaded
  again. ``{"parameters": {"unload_dependents": ...}}`` is accepted and ignored (no model
  depends on another).

Every admin route needs ``Authorization: Bearer <token>`` matching ``Settings.admin_token``
(``TEXTSERVE_ADMIN_TOKEN``), compared in constant time. With no token configured the routes
are disabled: 403. A missing or wrong token: 401 with ``WWW-Authenticate: Bearer``. Requests
are authorised before their body is read.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.responses import Response

from server.api.body import json_response, read_json_object
from server.api.paths import V2_REPOSITORY_MODEL
from server.api.schemas import ErrorResponse
from server.dataplane import DataPlane
from server.errors import BadRequest, ConfigError, Conflict, Forbidden, Unauthorized
from server.registry import ModelVersion, VersionState

ADMIN_BODY_LIMIT = 64 * 1024
"""Admin request bodies are tiny JSON objects."""

_bearer = HTTPBearer(auto_error=False, description="Settings.admin_token (TEXTSERVE_ADMIN_TOKEN)")


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str
    reason: str


class VersionStatus(BaseModel):
    version: str
    state: str
    reason: str


class ModelLoadResponse(BaseModel):
    name: str
    state: str
    versions: list[VersionStatus]


_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad body, or the model failed to load."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    403: {"model": ErrorResponse, "description": "No admin token configured: admin disabled."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    413: {"model": ErrorResponse, "description": "Body too large."},
    415: {"model": ErrorResponse, "description": "Not a JSON body."},
    503: {"model": ErrorResponse, "description": "The server is shutting down."},
}


def _body(properties: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra``: an optional JSON object body with ``properties``."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


_INDEX_BODY = _body({"ready": {"type": "boolean", "description": "List only READY versions."}})
_LOAD_BODY = _body(
    {"parameters": {"type": "object", "maxProperties": 0, "description": "Not supported."}}
)
_UNLOAD_BODY = _body(
    {
        "parameters": {
            "type": "object",
            "properties": {"unload_dependents": {"type": "boolean"}},
            "description": "Accepted and ignored.",
        }
    }
)


def _version_status(mv: ModelVersion) -> dict[str, str]:
    return {"version": str(mv.version), "state": str(mv.state), "reason": mv.reason}


def router(plane: DataPlane) -> APIRouter:
    registry = plane.registry
    settings = plane.settings

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        token = settings.admin_token
        if token is None or not token.get_secret_value():
            raise Forbidden("admin routes are disabled: no admin token is configured")
        if credentials is None:
            raise Unauthorized("admin routes need 'Authorization: Bearer <token>'")
        expected = token.get_secret_value().encode("utf-8")
        if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
            raise Unauthorized("wrong admin token")

    api = APIRouter(tags=["admin"], dependencies=[Depends(authorize)])

    def single_process() -> None:
        """Load/unload change one process's registry; with several workers that would leave
        the others serving the old set, so it is refused."""
        if settings.workers > 1:
            raise Conflict(
                f"load/unload act on one process and this server runs {settings.workers} "
                "workers: change models.yaml and restart (or roll the replicas) instead"
            )

    async def optional_object(request: Request) -> dict[str, Any]:
        """The JSON object body, or {} for an empty body (Triton's clients send none)."""
        if request.headers.get("content-length") in (None, "0") and not request.headers.get(
            "transfer-encoding"
        ):
            return {}
        return await read_json_object(request, ADMIN_BODY_LIMIT)

    def model_summary(name: str) -> dict[str, Any]:
        entry = registry.entry(name)
        return {
            "name": name,
            "state": str(entry.state),
            "versions": [_version_status(v) for v in registry.versions(name)],
        }

    @api.post(
        "/v2/repository/index",
        summary="List model versions and their states (Triton repository index)",
        response_model=list[IndexEntry],
        responses=_ADMIN_ERRORS,
        openapi_extra=_INDEX_BODY,
    )
    async def index(request: Request) -> Response:
        body = await optional_object(request)
        if set(body) - {"ready"}:
            raise BadRequest(f"unknown field {sorted(set(body) - {'ready'})[0]!r}; use 'ready'")
        only_ready = body.get("ready", False)
        if type(only_ready) is not bool:
            raise BadRequest("'ready' must be a boolean")
        out: list[dict[str, Any]] = []
        for entry in registry.entries():
            versions = registry.versions(entry.name)
            for mv in versions:
                if not only_ready or mv.state is VersionState.READY:
                    out.append({"name": entry.name, **_version_status(mv)})
            if not versions and not only_ready:
                out.append(
                    {"name": entry.name, "state": str(entry.state), "reason": entry.state_reason}
                )
        return json_response(out)

    @api.post(
        f"{V2_REPOSITORY_MODEL}/load",
        summary="Load or reload a model (re-reads models.yaml and scans version directories)",
        response_model=ModelLoadResponse,
        responses=_ADMIN_ERRORS,
        openapi_extra=_LOAD_BODY,
    )
    async def load(name: str, request: Request) -> Response:
        single_process()
        body = await optional_object(request)
        if set(body) - {"parameters"}:
            raise BadRequest("unknown field; the load body takes 'parameters' only")
        if body.get("parameters"):
            raise BadRequest("load parameters (config overrides, files) are not supported")
        try:
            await asyncio.wrap_future(registry.load(name))
        except ConfigError as exc:
            raise BadRequest(f"{exc.message}; nothing was changed") from None
        entry = registry.entry(name)
        versions = registry.versions(name)
        problems = [f"version {v.version}: {v.reason}" for v in versions if v.reason]
        if entry.reason:
            problems.insert(0, entry.reason)
        if problems:
            serving = entry.newest_ready()
            now = (
                f"version {serving.version} keeps serving"
                if serving is not None
                else "no version serves"
            )
            raise BadRequest(f"failed to load model {name!r}: {'; '.join(problems)} ({now})")
        return json_response(model_summary(name))

    @api.post(
        f"{V2_REPOSITORY_MODEL}/unload",
        summary="Unload every version of a model (drains its queue first)",
        response_model=ModelLoadResponse,
        responses=_ADMIN_ERRORS,
        openapi_extra=_UNLOAD_BODY,
    )
    async def unload(name: str, request: Request) -> Response:
        single_process()
        body = await optional_object(request)
        if set(body) - {"parameters"}:
            raise BadRequest("unknown field; the unload body takes 'parameters' only")
        params = body.get("parameters", {})
        if type(params) is not dict:
            raise BadRequest("'parameters' must be an object")
        await asyncio.wrap_future(registry.unload(name))
        return json_response(model_summary(name))

    return api
