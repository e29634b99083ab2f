"""The Starlette app: badge stream, snapshot and tickets, health, metrics, demo page, client."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from replicator.fanout.hub import (
    EVENT_MODES,
    Hub,
    LimitExceeded,
    badges_payload,
    encode_status_event,
)
from replicator.ops.demo import CONTACTS
from replicator.pg.lsn import format_lsn
from replicator.web.auth import AuthError, Identity, TokenVerifier
from replicator.web.cors import CorsMiddleware, CorsPolicy
from replicator.web.metrics import registry_for, render
from replicator.web.stream import BadgeStreamResponse
from replicator.web.tickets import Tickets

if TYPE_CHECKING:
    from replicator.pipeline.consumer import ConsumerView

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_QUERY_LENGTH = 4096


def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def unauthorized(message: str) -> JSONResponse:
    return error(
        401,
        "unauthorized",
        message,
        **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header is not 'Bearer <token>'")
    return token.strip()


def token_from(request: Request, cors: CorsPolicy) -> str:
    """The bearer token from the Authorization header, the query string or the cookie."""
    found = bearer_token(request) or request.query_params.get("access_token")
    if found:
        return found
    cookie = request.cookies.get("access_token")
    if cookie:
        origin = request.headers.get("origin")
        if origin is None or cors.allows_cookie(origin, request.headers.get("host")):
            return cookie
        raise AuthError(
            f"the access_token cookie is not accepted from origin {origin[:200]!r}"
            " (not in REPLICATOR_CORS_ORIGINS); send Authorization: Bearer <token>"
        )
    raise AuthError(
        "missing token: send Authorization: Bearer <token>, ?access_token=, ?ticket= or"
        " the access_token cookie"
    )


def client_address(request: Request) -> str | None:
    """Whose share a stream counts against: the client's IP address, or its IPv6 /64 (one
    host usually holds a whole /64). Behind REPLICATOR_TRUSTED_PROXIES, uvicorn has already
    put the address from X-Forwarded-For here."""
    if request.client is None:
        return None
    host = request.client.host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class BadgeApp:
    """Routes over one consumer and one hub."""

    def __init__(
        self,
        consumer: ConsumerView,
        hub: Hub,
        verifier: TokenVerifier,
        *,
        heartbeat: float = 15.0,
        send_timeout: float = 30.0,
        lifespan: Callable[[Starlette], Any] | None = None,
        tickets: Tickets | None = None,
        cors: CorsPolicy | None = None,
    ) -> None:
        self.consumer = consumer
        self.hub = hub
        self.verifier = verifier
        self.tickets = tickets or Tickets()
        self.cors = cors or CorsPolicy(())
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.registry = registry_for(consumer, hub)
        routes = [
            Route("/v1/badges/stream", self._guard(self.stream, "stream"), methods=["GET"]),
            Route("/v1/badges", self._guard(self.badges), methods=["GET"]),
            Route("/v1/badges/ticket", self._guard(self.ticket, "ticket"), methods=["POST"]),
            Route("/v1/admin/badges", self._guard(self.all_badges, "admin"), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/", self.index, methods=["GET"]),
            Route("/badges.js", self.client_js, methods=["GET"]),
            Route("/v1/demo/contacts", self.demo_contacts, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes,
            lifespan=lifespan,
            middleware=[Middleware(CorsMiddleware, policy=self.cors)],
        )

    def _guard(
        self, handler: Callable[[Request, Identity], Awaitable[Response]], kind: str = "user"
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if len(request.url.query) > MAX_QUERY_LENGTH:
                return error(414, "uri_too_long", f"query string over {MAX_QUERY_LENGTH} bytes")
            try:
                identity = await self._identify(request, kind)
            except AuthError as exc:
                return unauthorized(str(exc))
            return await handler(request, identity)

        return endpoint

    async def _identify(self, request: Request, kind: str) -> Identity:
        if kind == "admin":
            return await self.verifier.verify_admin(token_from(request, self.cors))
        if kind == "ticket":
            # Its point is to keep the token out of URLs, and a cookie could be sent by a
            # page the user did not mean to trust.
            token = bearer_token(request)
            if token is None:
                raise AuthError("send the token as Authorization: Bearer <token>")
            return await self.verifier.verify(token)
        if kind == "stream":
            ticket = request.query_params.get("ticket")
            if ticket is not None:
                return self.tickets.redeem(ticket)
        return await self.verifier.verify(token_from(request, self.cors))

    async def stream(self, request: Request, identity: Identity) -> Response:
        events = request.query_params.get("events", "changes")
        if events not in EVENT_MODES:
            return error(
                400,
                "bad_request",
                f"events={events[:50]!r} is not known; use events=full for whole states only,"
                " or leave it out for changes",
            )
        try:
            sub = self.hub.subscribe(
                identity.user_id,
                address=client_address(request),
                anonymous=identity.anonymous,
                expires=identity.expires,
                whole=events == "full",
            )
        except LimitExceeded as exc:
            return error(
                exc.status_code,
                "too_many_streams",
                str(exc),
                **{"Retry-After": str(exc.retry_after)},
            )
        first = self.hub.current_event(identity.user_id)
        if not self.consumer.live:
            # Counts shown before the stream is up may be stale: say so from the start.
            first = self.status_event() + first
        return BadgeStreamResponse(
            self.hub, sub, first, heartbeat=self.heartbeat, send_timeout=self.send_timeout
        )

    def status_event(self) -> bytes:
        return encode_status_event(self.consumer.live, int(self.consumer.lag_seconds() * 1000))

    async def badges(self, request: Request, identity: Identity) -> Response:
        payload = badges_payload(identity.user_id, self.hub.state)
        return JSONResponse(payload, headers={"Cache-Control": "no-store"})

    async def ticket(self, request: Request, identity: Identity) -> Response:
        """A single-use ticket for one stream URL (``?ticket=``), in place of the token."""
        try:
            ticket, expires_in = self.tickets.issue(identity)
        except AuthError as exc:
            return unauthorized(str(exc))
        return JSONResponse(
            {"ticket": ticket, "expires_in": expires_in}, headers={"Cache-Control": "no-store"}
        )

    async def all_badges(self, request: Request, identity: Identity) -> Response:
        if not identity.admin:
            return error(403, "forbidden", "this needs a service_role token")
        state = self.consumer.state
        names, grouped = state.names, state.grouped
        # a badge without a counterpart keeps its one count under ''
        users = {
            user: {
                name: held if by else held.get("", 0)
                for name, by, held in zip(names, grouped, counts, strict=True)
            }
            for user, counts in state.items()
        }
        body = {
            "lsn": format_lsn(state.lsn),
            "applied_lsn": format_lsn(self.consumer.applied_lsn),
            "live": self.consumer.live,
            "users": users,
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        c = self.consumer
        body: dict[str, object] = {
            "live": c.live,
            "applied_lsn": format_lsn(c.applied_lsn),
            "lag_bytes": c.lag_bytes(),
        }
        if c.error:
            return JSONResponse({"status": "failed", "error": c.error, **body}, status_code=503)
        if not c.live:
            return JSONResponse({"status": "not streaming", **body}, status_code=503)
        if not c.caught_up():
            return JSONResponse({"status": "catching up", **body}, status_code=503)
        return JSONResponse({"status": "ready", **body})

    async def metrics(self, request: Request) -> Response:
        return Response(render(self.registry), media_type="text/plain; version=0.0.4")

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def client_js(self, request: Request) -> Response:
        return FileResponse(
            STATIC / "badges.js",
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache"},
        )

    async def demo_contacts(self, request: Request) -> Response:
        """The demo contacts' names by user id, for the demo page."""
        return JSONResponse(CONTACTS)
