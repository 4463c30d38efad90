"""A pure-ASGI fast path for the hot inference routes, ahead of FastAPI's router.

``POST /v1/models/{name}[/versions/{v}]:classify`` (native), ``...:predict`` (TF Serving) and
``POST /v2/models/{name}[/versions/{v}]/infer`` (V2) carry nearly all the traffic. Through
FastAPI each request pays for the router's linear match, dependency solving, an exit stack and
several ``send`` wrappers — about half of the event loop's time per single-text request
(``py-spy`` profile in ``docs/bench/README.md``). :class:`FastPath` sits innermost among the
app's middleware (inside the request metrics and anything added later, inside Starlette's
server-error middleware), recognises these routes with the FastAPI routes' own compiled path
patterns, and calls the **same** handler the FastAPI route calls
(:func:`server.api.routes.native.classify_handler` and its siblings). Behaviour is unchanged:

* ``scope["route"]``/``scope["path_params"]``/``scope["endpoint"]`` are set as Starlette's router
  sets them, so the request metrics label the route template as before;
* an exception is answered by the app's own exception handlers (looked up along the
  exception's MRO, as Starlette does); one without a handler propagates to the server-error
  middleware (logged, JSON 500), as before;
* every other request — other methods, other paths, a non-empty ``root_path`` — goes to FastAPI
  unchanged. The FastAPI routes stay declared: they document the API (OpenAPI) and serve as the
  fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.routes.native import Handler

ExceptionHandlers = Mapping[Any, Callable[..., Any]]


class _HotRoute:
    __slots__ = ("convertors", "handler", "regex", "route")

    def __init__(self, route: Route, handler: Handler) -> None:
        self.route = route
        self.regex = route.path_regex
        self.convertors = route.param_convertors
        self.handler = handler


def _walk(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, descending into routers FastAPI keeps whole on ``include_router`` (the
    routers of :mod:`server.api.routes` are included without a prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _walk(included.routes)
        else:
            yield route


class FastPath:
    """Pure ASGI middleware: dispatch ``handlers`` (route template → handler) directly.

    ``routes`` is the app's route list and ``exception_handlers`` its handler mapping, both read
    when the middleware stack is built (at the first request or lifespan), so routes included
    and handlers added after ``add_middleware`` are seen.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[BaseRoute],
        handlers: Mapping[str, Handler],
        exception_handlers: ExceptionHandlers,
    ) -> None:
        self.app = app
        hot: list[_HotRoute] = []
        for route in _walk(routes):
            if (
                isinstance(route, Route)
                and route.path in handlers
                and route.methods is not None
                and "POST" in route.methods
            ):
                hot.append(_HotRoute(route, handlers[route.path]))
        missing = set(handlers) - {h.route.path for h in hot}
        if missing:
            raise RuntimeError(f"fast path: no POST route for {sorted(missing)}")
        self.hot = tuple(hot)
        self.exception_handlers = exception_handlers

    def _match(self, path: str) -> tuple[_HotRoute, dict[str, Any]] | None:
        for hot in self.hot:
            m = hot.regex.match(path)
            if m is not None:
                params = m.groupdict()
                for key, value in params.items():
                    params[key] = hot.convertors[key].convert(value)
                return hot, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        found = self._match(scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        hot, params = found
        scope["route"] = hot.route
        scope["endpoint"] = hot.route.endpoint
        scope["path_params"] = params
        request = Request(scope, receive)
        try:
            response = await hot.handler(params["name"], params.get("version"), request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[..., Any] | None:
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None  # the server-error middleware's (logged 500), as through FastAPI
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None
