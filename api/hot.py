"""The hot routes, called straight from the middleware stack: FastAPI still declares and documents
them, but a request for one skips FastAPI's routing and request handling.

Measured on the benchmarks' host (bench/api_cpu.py): uvicorn alone costs ~60 µs of CPU a request,
FastAPI around a route that returns fixed bytes ~280, and this project's `GET /v1/forecasts/{id}`
700-1000. The hot routes already read their own parameters and key (api/deps.py) and return a
`Response`, so FastAPI's part for them is matching the path against every route in turn, building
the request's dependency stacks and exception wrappers, and solving a signature of nothing but
`request` and `response`. `HotRoutes` matches the few hot paths itself and calls the endpoint as
FastAPI would: the same `Request`, a sub-response with no status (what `answers.answer` merges),
errors answered by the app's own exception handlers, and `scope["route"]` / `path_params` set as
the router sets them (the audit log and the latency metric read them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException

HOT: set[Callable[..., Any]] = set()
_ARGUMENTS = {"request", "response"}


def hot(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an endpoint as hot: it takes only its path parameters, `request` and `response`, and
    returns a `Response`."""
    HOT.add(endpoint)
    return endpoint


class HotRoutes:
    """ASGI middleware, the innermost: requests for the hot routes of `routers` (the app's, included
    without a prefix, in the app's order) go straight to their endpoints, every other request to
    FastAPI's router as before."""

    def __init__(self, app, routers: list[APIRouter]):
        self.app = app
        self._routes = [
            (method, route.path_regex, route)
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint in HOT
            for method in route.methods or ()
        ]
        for _, _, route in self._routes:  # what FastAPI would do for them beyond the call, it need not
            taken, dependant = set(inspect.signature(route.endpoint).parameters), route.dependant
            plain = {p.name for p in dependant.path_params if p.field_info.annotation is str}
            if taken - _ARGUMENTS != set(route.param_convertors) or plain != set(route.param_convertors):
                raise TypeError(f"hot endpoint {route.path} must take str path parameters, request and response only")
            if dependant.dependencies or dependant.query_params or dependant.header_params or dependant.body_params:
                raise TypeError(f"hot endpoint {route.path} must declare no dependencies and no parameters")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("root_path"):  # under a mount prefix: the router strips it
            return await self.app(scope, receive, send)
        found = self._match(scope["method"], scope["path"])
        if found is None:
            return await self.app(scope, receive, send)
        route, params = found
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, params
        request = Request(scope, receive, send)
        sub = Response()  # as FastAPI makes it: headers to merge, no status of its own
        del sub.headers["content-length"]
        sub.status_code = None  # type: ignore[assignment]
        try:
            response = await route.endpoint(**params, request=request, response=sub)
        except Exception as exc:
            handler = _handler(scope["app"].exception_handlers, exc)
            if handler is None:
                raise  # to ServerErrorMiddleware: a 500, as from the router
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _match(self, method: str, path: str) -> tuple[APIRoute, dict[str, Any]] | None:
        for wanted, regex, route in self._routes:
            if method == wanted and (match := regex.match(path)):
                convert = route.param_convertors
                return route, {name: convert[name].convert(value) for name, value in match.groupdict().items()}
        return None


def _handler(handlers: dict, exc: Exception) -> Callable[..., Any] | None:
    """The app's handler for `exc`, found as Starlette's ExceptionMiddleware finds it. Not the one
    for `Exception` (or 500): that is ServerErrorMiddleware's, which answers and then re-raises."""
    if isinstance(exc, HTTPException) and exc.status_code in handlers and exc.status_code != 500:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
