"""TensorFlow Serving REST API compatible routes.

* ``POST /v1/models/{name}[/versions/{v}]:predict``: row format ``{"instances": [texts]}``
  → ``{"predictions": [[p0, p1, ...], ...]}``; columnar ``{"inputs": [texts]}`` (or
  ``{"inputs": {"text": [texts]}}``) → ``{"outputs": [[...], ...]}``, as TF Serving answers.
  Instances may also be ``{"b64": ...}`` or ``{"text": ...}``. Besides JSON, the body may be
  sent as ``application/x-www-form-urlencoded`` (what ``curl -d`` declares; TF Serving's own
  examples rely on it).
* ``GET /v1/models/{name}/versions/{v}``: TF Serving's status of one version.
* ``GET /v1/models/{name}[/versions/{v}]/metadata``: a TF Serving style signature
  (``text`` DT_STRING ``[-1]`` → ``probs`` DT_FLOAT ``[-1, num_labels]``).

``GET /v1/models/{name}`` is in :mod:`server.api.routes.native` (a superset of TF Serving's
status). Errors are ``{"error": "..."}`` like TF Serving's.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api import describe
from server.api.body import FORM, json_response, read_json_object
from server.api.deadline import request_deadline
from server.api.disconnect import unless_disconnected
from server.api.paths import MODEL, MODEL_VERSION
from server.api.routes.native import Handler
from server.api.schemas import (
    ERROR_RESPONSES,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    TfsMetadataResponse,
    TfsStatusResponse,
    parse_predict,
    request_body,
)
from server.dataplane import DataPlane, parse_version
from server.errors import VersionNotFound

_ALSO = frozenset({FORM})


def predict_handler(plane: DataPlane) -> Handler:
    """``:predict``'s work, shared by the FastAPI route and the fast path."""
    limit = plane.settings.max_body_bytes

    async def predict(name: str, version: str | None, request: Request) -> Response:
        deadline = request_deadline(request)
        mv = plane.resolve(name, version)
        texts, columnar = parse_predict(await read_json_object(request, limit, _ALSO), plane)
        answer = await unless_disconnected(
            request.receive, plane.classify(mv, texts, deadline=deadline, follow=version is None)
        )
        key = "outputs" if columnar else "predictions"
        return json_response({key: np.ascontiguousarray(answer.probs)})

    return predict


def router(plane: DataPlane) -> APIRouter:
    api = APIRouter(tags=["tensorflow-serving"])
    registry = plane.registry
    _predict = predict_handler(plane)

    @api.post(
        f"{MODEL}:predict",
        summary="TF Serving predict with the newest READY version",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(PredictRequest),
    )
    async def predict(name: str, request: Request) -> Response:
        return await _predict(name, None, request)

    @api.post(
        f"{MODEL_VERSION}:predict",
        summary="TF Serving predict with one version",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(PredictRequest),
    )
    async def predict_version(name: str, version: str, request: Request) -> Response:
        return await _predict(name, version, request)

    @api.get(
        MODEL_VERSION,
        summary="TF Serving status of one model version",
        response_model=TfsStatusResponse,
        responses={404: {"model": ErrorResponse}},
    )
    async def version_status(name: str, version: str) -> Response:
        number = parse_version(version, name)
        match = [v for v in registry.versions(name) if v.version == number]
        if not match:
            raise VersionNotFound(f"model {name!r} has no version {version!r}")
        return json_response({"model_version_status": [describe.tfs_version_status(match[0])]})

    @api.get(
        f"{MODEL}/metadata",
        summary="TF Serving signature metadata",
        response_model=TfsMetadataResponse,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def metadata(name: str) -> Response:
        return json_response(describe.tfs_metadata(plane.resolve(name)))

    @api.get(
        f"{MODEL_VERSION}/metadata",
        summary="TF Serving signature metadata of one version",
        response_model=TfsMetadataResponse,
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def version_metadata(name: str, version: str) -> Response:
        return json_response(describe.tfs_metadata(plane.resolve(name, version)))

    return api
