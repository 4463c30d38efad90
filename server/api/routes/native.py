"""textserve's native routes: classify with one model or all, list and describe models.

* ``POST /v1/models/{name}:classify``, ``POST /v1/models/{name}/versions/{v}:classify``:
  ``{"texts": [...], "top_k": 1}`` → ``{"model", "version", "results": [{"label", "score",
  "top_k": [{"label", "score"}, ...]}]}``, one result per text, in order.
* ``POST /v1/classify``: ``{"texts": [...], "models": [...], "top_k": 1}`` (``models`` omitted:
  every READY model) → ``{"models": [names], "results": {name: {"version", "results"}}}``;
  the models run concurrently. One unknown/unready named model fails the whole request.
* ``GET /v1/models``: every configured model with its versions, states, failure reasons,
  labels, format, embedding, load/warm-up seconds and memory figures.
* ``GET /v1/models/{name}``: one model; also TF Serving's status (see ``server.api.describe``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api import describe
from server.api.body import json_response, read_json_object
from server.api.deadline import request_deadline
from server.api.disconnect import unless_disconnected
from server.api.paths import MODEL, MODEL_VERSION
from server.api.schemas import (
    ERROR_RESPONSES,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModelListResponse,
    ModelStatusResponse,
    MultiClassifyRequest,
    MultiClassifyResponse,
    parse_classify,
    parse_multi_classify,
    request_body,
)
from server.dataplane import DataPlane, labelled_results

Handler = Callable[[str, str | None, Request], Awaitable[Response]]
"""``(model name, version or None, request) -> response`` of a per-model inference route."""


def classify_handler(plane: DataPlane) -> Handler:
    """``:classify``'s work, shared by the FastAPI route and the fast path
    (:mod:`server.api.fastpath`)."""
    limit = plane.settings.max_body_bytes

    async def classify(name: str, version: str | None, request: Request) -> Response:
        deadline = request_deadline(request)
        mv = plane.resolve(name, version)
        texts, top_k = parse_classify(await read_json_object(request, limit), plane)
        answer = await unless_disconnected(
            request.receive, plane.classify(mv, texts, deadline=deadline, follow=version is None)
        )
        mv = answer.model
        return json_response(
            {
                "model": mv.name,
                "version": str(mv.version),
                "results": labelled_results(answer.probs, mv.labels, plane.cap_top_k(top_k, mv)),
            }
        )

    return classify


def router(plane: DataPlane) -> APIRouter:
    api = APIRouter(tags=["native"])
    limit = plane.settings.max_body_bytes
    registry = plane.registry
    _classify = classify_handler(plane)

    @api.post(
        f"{MODEL}:classify",
        summary="Classify texts with a model's newest READY version",
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(ClassifyRequest),
    )
    async def classify(name: str, request: Request) -> Response:
        return await _classify(name, None, request)

    @api.post(
        f"{MODEL_VERSION}:classify",
        summary="Classify texts with one model version",
        response_model=ClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(ClassifyRequest),
    )
    async def classify_version(name: str, version: str, request: Request) -> Response:
        return await _classify(name, version, request)

    @api.post(
        "/v1/classify",
        summary="Classify texts with several models at once",
        response_model=MultiClassifyResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(MultiClassifyRequest),
    )
    async def classify_many(request: Request) -> Response:
        deadline = request_deadline(request)
        texts, models, top_k = parse_multi_classify(await read_json_object(request, limit), plane)
        answers = await unless_disconnected(
            request.receive, plane.classify_many(texts, models, deadline=deadline)
        )
        return json_response(
            {
                "models": [a.model.name for a in answers],
                "results": {
                    a.model.name: {
                        "version": str(a.model.version),
                        "results": labelled_results(
                            a.probs, a.model.labels, plane.cap_top_k(top_k, a.model)
                        ),
                    }
                    for a in answers
                },
            }
        )

    @api.get("/v1/models", summary="List models", response_model=ModelListResponse)
    async def list_models() -> Response:
        return json_response(describe.model_list(registry))

    @api.get(
        MODEL,
        summary="Describe a model (also TF Serving's model status)",
        response_model=ModelStatusResponse,
        responses={404: {"model": ErrorResponse}},
    )
    async def model_status(name: str) -> Response:
        return json_response(describe.model_status(registry, name))

    return api
