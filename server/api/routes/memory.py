"""``GET /v1/memory``: what the serving process and each loaded model version cost.

The body is :meth:`server.memory.MemoryMonitor.report` (bytes everywhere; see
:mod:`server.memory` and ``docs/api.md`` for what each figure means and its limits).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from server.api.body import json_response
from server.memory import MemoryMonitor


def router(monitor: MemoryMonitor) -> APIRouter:
    api = APIRouter(tags=["observability"])

    @api.get(
        "/v1/memory",
        summary="Process memory and per-model memory attribution",
        responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
    )
    async def memory() -> Response:
        return json_response(monitor.report())

    return api
