"""``GET /metrics`` (Prometheus text exposition) and the per-request accounting behind it.

:class:`RequestMetricsMiddleware` is a pure ASGI middleware (no ``BaseHTTPMiddleware``, whose
task group and streaming wrapper cost a lot per request). Around every HTTP request it

* puts a fresh :class:`~server.metrics.RequestRecord` in
  :data:`~server.metrics.current_request`, which the data plane fills with the model version
  the request resolved and the texts it classified;
* reads the status from ``http.response.start`` — responses of the exception handlers
  (4xx, 503) pass through it like any other; an exception that escapes the app (answered 500
  by Starlette's outermost error middleware) is counted as 500;
* labels the request with the matched route's *template* (``/v1/models/{name}:classify``),
  or ``""`` when no route matched, so label values stay bounded.

A request that never reached the data plane (``GET /v1/models/{name}``, TF Serving's version
status) is labelled with the path's ``name`` only when the registry knows that model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.memory import MemoryMonitor
from server.metrics import Metrics, RequestRecord, current_request

METRICS_PATH = "/metrics"


class RequestMetricsMiddleware:
    """Counts and times every HTTP request into ``metrics`` (see the module docstring).

    ``known_model(name)`` says whether ``name`` is a configured model (bounds the labels of
    requests that did not go through the data plane).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, known_model: Callable[[str], bool]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_model = known_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = RequestRecord()
        token = current_request.set(record)
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            current_request.reset(token)
            self._observe(scope, status, time.perf_counter() - start, record)

    def _observe(self, scope: Scope, status: int, duration_s: float, record: RequestRecord) -> None:
        route = scope.get("route")
        template: str = getattr(route, "path_format", "") if route is not None else ""
        if not record.models:
            name = scope.get("path_params", {}).get("name")
            if isinstance(name, str) and self.known_model(name):
                record.resolved(name, "")
        self.metrics.observe_record(template, status, duration_s, record)


def router(metrics: Metrics, monitor: MemoryMonitor) -> APIRouter:
    api = APIRouter(tags=["observability"])

    @api.get(
        METRICS_PATH,
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        metrics.set_memory_from(monitor)
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    return api
