"""The two requests of a reconnect, served without the router and middleware stack.

A client that comes back (after a restart, a deploy, a dropped network) asks for a ticket
and then opens its stream; after a restart, every client does so within a second. What each
of those requests costs decides how long the crowd waits, so they go straight to their
endpoints here: the same endpoints and responses as through Starlette, with the headers its
middleware adds (the security headers, and CORS for a request with an ``Origin``), and a 500
for an endpoint that fails, as Starlette's error middleware sends. Every other request, and
a preflight, goes through the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from replicator.web.cors import PREFIX, CorsPolicy, request_origin
from replicator.web.headers import with_security
from replicator.web.stream import RAW_HEADERS

Endpoint = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """``routes`` ((method, path) -> endpoint) served directly; anything else by ``app``."""

    def __init__(
        self, app: ASGIApp, routes: Mapping[tuple[str, str], Endpoint], cors: CorsPolicy
    ) -> None:
        assert all(path.startswith(PREFIX) for _, path in routes), "CORS applies to /v1/ only"
        self.app = app
        self.routes = dict(routes)
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and not scope.get("root_path"):
            endpoint = self.routes.get((scope["method"], scope["path"]))
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        origin, _ = request_origin(scope)
        extra = self.cors.headers(origin) if origin is not None else ()
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers", ())
                # a stream's headers already hold the security headers
                if headers is not RAW_HEADERS:
                    headers = with_security(headers)
                if extra:
                    headers = [*headers, *extra]
                if headers is not message.get("headers"):
                    message = {**message, "headers": headers}
            await send(message)

        try:
            response = await endpoint(Request(scope, receive))
            await response(scope, receive, send_with_headers)
        except Exception:
            if not started:
                failed = PlainTextResponse("Internal Server Error", status_code=500)
                await failed(scope, receive, send_with_headers)
            raise
