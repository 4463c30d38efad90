"""Open Inference Protocol (KServe V2 / Triton) routes.

* ``GET /v2/health/live``: 200 ``{"live": true}`` while the process serves HTTP (also while
  models load).
* ``GET /v2/health/ready``: 200 ``{"ready": true}`` when the registry is ready (see
  :mod:`server.registry`), else 503 ``{"ready": false, "error": ...}``.
* ``GET /v2``: server metadata with the supported extensions.
* ``GET /v2/models/{name}[/versions/{v}]``: model metadata (input ``text`` BYTES ``[-1]``,
  output ``probs`` FP32 ``[-1, num_labels]``).
* ``GET /v2/models/{name}[/versions/{v}]/ready``: 200 ``{"name", "ready": true}``, or 400 with
  ``"ready": false`` and the reason (the protocol's 4xx for false, Triton's 400); 404 for an
  unknown model/version.
* ``POST /v2/models/{name}[/versions/{v}]/infer``: see :mod:`server.api.v2_codec`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api import describe
from server.api.body import OCTET_STREAM, check_content_type, json_response, read_body
from server.api.deadline import request_deadline
from server.api.disconnect import unless_disconnected
from server.api.paths import V2_MODEL, V2_MODEL_VERSION
from server.api.routes.native import Handler
from server.api.schemas import (
    V2_INFER_RESPONSES,
    ErrorResponse,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    request_body,
)
from server.api.v2_codec import HEADER_LENGTH, encode_infer_response, parse_infer
from server.dataplane import DataPlane
from server.errors import ModelNotReady

_ALSO = frozenset({OCTET_STREAM})


def infer_handler(plane: DataPlane) -> Handler:
    """``/infer``'s work, shared by the FastAPI route and the fast path."""
    limit = plane.settings.max_body_bytes

    async def infer(name: str, version: str | None, request: Request) -> Response:
        deadline = request_deadline(request)
        mv = plane.resolve(name, version)
        check_content_type(request, _ALSO)
        body = await read_body(request, limit)
        parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), plane)
        answer = await unless_disconnected(
            request.receive,
            plane.classify(mv, parsed.texts, deadline=deadline, follow=version is None),
        )
        mv = answer.model
        content, headers = encode_infer_response(
            parsed, mv.name, mv.version, mv.labels, answer.probs
        )
        media = OCTET_STREAM if headers else "application/json"
        return Response(content, headers=headers, media_type=media)

    return infer


def router(plane: DataPlane) -> APIRouter:
    api = APIRouter(tags=["v2"])
    registry = plane.registry

    @api.get("/v2/health/live", summary="Liveness", response_model=V2Live)
    async def live() -> Response:
        return json_response({"live": registry.live}, 200 if registry.live else 503)

    @api.get(
        "/v2/health/ready",
        summary="Readiness",
        response_model=V2Ready,
        responses={503: {"model": V2Ready}},
    )
    async def ready() -> Response:
        if registry.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": "models are loading or none is ready"}, 503)

    @api.get("/v2", summary="Server metadata", response_model=V2ServerMetadata)
    async def server_metadata() -> Response:
        return json_response(describe.v2_server_metadata())

    async def _metadata(name: str, version: str | None) -> Response:
        return json_response(describe.v2_model_metadata(registry, plane.resolve(name, version)))

    @api.get(
        f"{V2_MODEL}",
        summary="Model metadata",
        response_model=V2ModelMetadata,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def model_metadata(name: str) -> Response:
        return await _metadata(name, None)

    @api.get(
        f"{V2_MODEL_VERSION}",
        summary="Model version metadata",
        response_model=V2ModelMetadata,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def version_metadata(name: str, version: str) -> Response:
        return await _metadata(name, version)

    def _ready(name: str, version: str | None) -> Response:
        # The V2 protocol: "a 200 status code indicates true and a 4xx status code indicates
        # false"; Triton (and tritonclient's is_model_ready) use 400.
        try:
            plane.resolve(name, version)
        except ModelNotReady as exc:
            return json_response({"name": name, "ready": False, "error": exc.message}, 400)
        return json_response({"name": name, "ready": True})

    @api.get(
        f"{V2_MODEL}/ready",
        summary="Model readiness",
        response_model=V2ModelReady,
        responses={400: {"model": V2ModelReady}, 404: {"model": ErrorResponse}},
    )
    async def model_ready(name: str) -> Response:
        return _ready(name, None)

    @api.get(
        f"{V2_MODEL_VERSION}/ready",
        summary="Model version readiness",
        response_model=V2ModelReady,
        responses={400: {"model": V2ModelReady}, 404: {"model": ErrorResponse}},
    )
    async def version_ready(name: str, version: str) -> Response:
        return _ready(name, version)

    _infer = infer_handler(plane)

    @api.post(
        f"{V2_MODEL}/infer",
        summary="Inference with the newest READY version",
        response_model=V2InferResponse,
        responses=V2_INFER_RESPONSES,
        openapi_extra=request_body(V2InferRequest),
    )
    async def infer(name: str, request: Request) -> Response:
        return await _infer(name, None, request)

    @api.post(
        f"{V2_MODEL_VERSION}/infer",
        summary="Inference with one version",
        response_model=V2InferResponse,
        responses=V2_INFER_RESPONSES,
        openapi_extra=request_body(V2InferRequest),
    )
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(name, version, request)

    return api
