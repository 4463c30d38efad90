"""The FastAPI application: routes of the three protocols, lifespan, and error mapping.

Every error answers ``{"error": "..."}``: :class:`~server.errors.TextserveError` with its own
status and headers (one handler), unknown routes 404, wrong methods 405, request validation
400, anything unexpected 500 (logged). The registry starts loading models in the lifespan's
startup (in the background: ``/v2/health/live`` answers at once) and is closed — batchers
drained, sessions closed — at shutdown.

``app.state.registry``, ``app.state.dataplane``, ``app.state.settings``, ``app.state.metrics``
and ``app.state.memory`` give later routes (admin) the same objects. Each app has its own
Prometheus ``CollectorRegistry`` (never the global one) and its own memory monitor, whose
sampler thread runs for the lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from server import __version__
from server.api.body import json_response
from server.api.disconnect import ClientDisconnected, client_disconnected
from server.api.fastpath import FastPath
from server.api.paths import MODEL, MODEL_VERSION, V2_MODEL, V2_MODEL_VERSION
from server.api.routes import admin, memory, metrics, native, tfserving, v2
from server.api.schemas import ErrorResponse, openapi_components
from server.dataplane import DataPlane
from server.errors import ModelNotFound, NotFound, TextserveError
from server.memory import MemoryMonitor
from server.metrics import Metrics, RegistryMetrics
from server.registry import Registry
from server.settings import Settings

log = logging.getLogger(__name__)


async def _textserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TextserveError)
    return json_response({"error": exc.message}, int(exc.status), exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path!r}"
    else:
        message = str(exc.detail)
    return json_response({"error": message}, exc.status_code, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return json_response({"error": "; ".join(parts) or "invalid request"}, 400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"error": "internal server error"}, 500)


def _document_400_not_422(schema: dict[str, Any]) -> None:
    """FastAPI documents 422 for routes with parameters; textserve answers 400 instead."""
    error = {
        "description": "Bad request",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", error)
    schemas = schema.get("components", {}).get("schemas", {})
    text = repr(schema.get("paths"))
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in text:
            schemas.pop(unused, None)
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema())


async def _freeze_after_load(registry: Registry) -> None:
    """Once the first load pass is done, move every object alive (TensorFlow's Python side,
    vocabularies) out of the garbage collector's sight: a full collection over them took
    tens to hundreds of milliseconds and showed as the p99 of small requests."""
    with contextlib.suppress(Exception):
        await registry.wait_loaded()
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, serve_when_loaded: bool = False) -> FastAPI:
    """The ASGI app. ``serve_when_loaded``: the lifespan's startup waits for the first load pass,
    so uvicorn starts listening only then (a ``--workers`` worker: while it loads, the other
    workers keep the port's connections instead of it answering 503)."""
    prometheus = Metrics(CollectorRegistry())
    monitor = MemoryMonitor(settings.memory_sample_interval_s)
    registry = Registry(settings, listener=RegistryMetrics(prometheus), memory=monitor)
    plane = DataPlane(registry, settings)

    def known_model(name: str) -> bool:
        try:
            registry.entry(name)
        except ModelNotFound:
            return False
        return True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        monitor.start()
        try:
            await registry.start()
            if serve_when_loaded:
                await registry.wait_loaded()
            freeze = asyncio.ensure_future(_freeze_after_load(registry))
            try:
                yield
            finally:
                freeze.cancel()
                await registry.close(settings.drain_timeout_s)
        finally:
            monitor.stop()

    app = FastAPI(
        title="textserve",
        version=__version__,
        summary="Multi-model CPU inference server for TensorFlow text classifiers",
        lifespan=lifespan,
        telemetry={
            "tracing": settings.opentelemetry,
            "metrics": settings.opentelemetry,
            "logs": settings.opentelemetry,
        },
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.dataplane = plane
    app.state.metrics = prometheus
    app.state.memory = monitor
    # Innermost first: the fast path runs inside the request metrics (and any later middleware).
    classify, predict, infer = (
        native.classify_handler(plane),
        tfserving.predict_handler(plane),
        v2.infer_handler(plane),
    )
    app.add_middleware(
        FastPath,
        routes=app.router.routes,
        handlers={
            f"{MODEL}:classify": classify,
            f"{MODEL_VERSION}:classify": classify,
            f"{MODEL}:predict": predict,
            f"{MODEL_VERSION}:predict": predict,
            f"{V2_MODEL}/infer": infer,
            f"{V2_MODEL_VERSION}/infer": infer,
        },
        exception_handlers=app.exception_handlers,
    )
    app.add_middleware(
        metrics.RequestMetricsMiddleware, metrics=prometheus, known_model=known_model
    )
    app.add_exception_handler(TextserveError, _textserve_error)
    app.add_exception_handler(ClientDisconnected, client_disconnected)
    app.add_exception_handler(ClientDisconnect, client_disconnected)  # gone while sending
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(native.router(plane))
    app.include_router(tfserving.router(plane))
    app.include_router(v2.router(plane))
    app.include_router(admin.router(plane))
    app.include_router(metrics.router(prometheus, monitor))
    app.include_router(memory.router(monitor))

    @app.post(MODEL + ":{action}", include_in_schema=False)
    @app.post(MODEL_VERSION + ":{action}", include_in_schema=False)
    async def unknown_action(name: str, action: str) -> Response:
        raise NotFound(f"unknown action {action!r}; use :classify or :predict")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(openapi_components(settings))
            _document_400_not_422(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
