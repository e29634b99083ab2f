"""CORS for the ``/v1/`` routes: pages on other origins may read badges, the stream included.

Listed origins get credentials (the ``access_token`` cookie); ``*`` lets any other origin
call with a header or query token, never with the cookie. The service also ignores the
cookie on a cross-origin request from an origin that is not listed, so a page elsewhere
cannot ride on a signed-in user's cookie. Requests without an ``Origin`` header (same-origin
``GET``, curl) pass through untouched, so same-origin streams pay nothing for this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/v1/"
ALLOW_METHODS = b"GET, HEAD, POST"
ALLOW_HEADERS = b"Authorization, Content-Type, Last-Event-ID, Cache-Control"
#: so a page can read when to retry a refused stream
EXPOSE_HEADERS = b"Retry-After"
MAX_AGE = b"600"


def same_origin(origin: str, host: str | None) -> bool:
    return host is not None and urlsplit(origin).netloc == host.lower()


class CorsPolicy:
    def __init__(self, origins: Sequence[str]) -> None:
        self.listed = frozenset(o for o in origins if o != "*")
        self.anyone = "*" in origins

    def allows_cookie(self, origin: str | None, host: str | None) -> bool:
        """Whether a request from ``origin`` may be authenticated by its cookie."""
        return origin is None or origin in self.listed or same_origin(origin, host)

    def allow(self, origin: str) -> list[tuple[bytes, bytes]]:
        """The allow-origin headers for ``origin``: none when it is not allowed."""
        if origin in self.listed:
            return [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
            ]
        if self.anyone:
            return [(b"access-control-allow-origin", b"*")]
        return []

    def headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """What an actual response to ``origin`` carries."""
        allow = self.allow(origin)
        if allow:
            allow.append((b"access-control-expose-headers", EXPOSE_HEADERS))
        return [(b"vary", b"Origin"), *allow]


def request_origin(scope: Scope) -> tuple[str | None, bool]:
    """The request's ``Origin``, and whether it asks for a preflight's answer."""
    origin = None
    preflight = False
    for name, value in scope["headers"]:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"access-control-request-method":
            preflight = True
    return origin, preflight


class CorsMiddleware:
    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        origin, preflight = request_origin(scope)
        if origin is None:
            await self.app(scope, receive, send)
            return
        if preflight and scope["method"] == "OPTIONS":
            await self._preflight(origin, send)
            return
        extra = self.policy.headers(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: str, send: Send) -> None:
        vary = (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        allow = self.policy.allow(origin)
        if not allow:
            body = json.dumps(
                {
                    "error": "forbidden",
                    "message": f"origin {origin[:200]!r} is not in REPLICATOR_CORS_ORIGINS",
                }
            ).encode()
            headers = [vary, (b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        headers = [
            vary,
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", MAX_AGE),
            *allow,
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
