"""The Starlette app: badge stream, snapshot and tickets, health, metrics, demo page, client."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from replicator.errors import BadRequest, ProtocolError, ReplicatorError
from replicator.fanout.hub import (
    EVENT_MODES,
    Hub,
    LimitExceeded,
    Subscriber,
    badges_payload,
    encode_status_event,
)
from replicator.ops.demo import CONTACTS
from replicator.pg.lsn import format_lsn, parse_lsn
from replicator.web.auth import AuthError, Identity, TokenVerifier
from replicator.web.cors import CorsMiddleware, CorsPolicy
from replicator.web.headers import COMMON, DATA_POLICY, SecurityHeaders
from replicator.web.hot import HotRoutes
from replicator.web.metrics import ProcessMetrics, registry_for, render
from replicator.web.stream import BadgeStreamResponse
from replicator.web.tickets import Tickets

if TYPE_CHECKING:
    from replicator.pipeline.consumer import ConsumerView

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_QUERY_LENGTH = 4096
#: how long ``min_lsn`` waits for the stream to pass the LSN before answering 503
MIN_LSN_WAIT_S = 5.0
#: how long the stream may take to bring an LSN by itself before a message moves it on
NUDGE_AFTER_S = 0.02
#: what a 503 for ``min_lsn`` asks the client to wait
MIN_LSN_RETRY_S = 2
#: the largest LSN PostgreSQL has
MAX_LSN = (1 << 64) - 1
#: the demo page's request bodies are a few words
MAX_DEMO_BODY = 1024

#: files served from ``static/``: name -> media type (the demo's only with the demo on)
CLIENT_FILES = {
    "badges.js": "text/javascript",
    "badges.mjs": "text/javascript",
    "badges.d.ts": "application/typescript; charset=utf-8",
}
DEMO_FILES = {"index.html": "text/html", "demo.js": "text/javascript", "demo.css": "text/css"}

#: does a demo action for a user and returns the WAL position after its commit
DemoActions = Callable[[str, object, object], Awaitable[int]]
#: makes the stream pass an LSN soon; returns the server's WAL position then (or None)
Nudge = Callable[[int], Awaitable[int | None]]

#: error responses carry the security headers themselves (the stream route's pass the
#: middleware by)
_ERROR_HEADERS = {
    "Content-Security-Policy": DATA_POLICY.decode(),
    **{name.decode(): value.decode() for name, value in COMMON},
}


def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message},
        status_code=status,
        headers={**_ERROR_HEADERS, **headers},
    )


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
    """Routes over one consumer and one hub.

    ``app`` is the public application. ``/metrics`` and the detailed ``/readyz`` tell anyone
    the schema's problems, user counts and LSNs: with ``ops_elsewhere`` they are served by
    ``admin_app`` only (a second listener) and the public ``/readyz`` says just its status
    word; with ``metrics_token``, ``/metrics`` wants it as a bearer token.
    """

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
        collectors: Sequence[Collector] = (),
        ops_elsewhere: bool = False,
        metrics_token: str | None = None,
        nudge: Nudge | None = None,
        demo: DemoActions | None = None,
        min_lsn_wait: float = MIN_LSN_WAIT_S,
    ) -> None:
        self.consumer = consumer
        self.hub = hub
        self.verifier = verifier
        self.tickets = tickets or Tickets()
        self.cors = cors or CorsPolicy(())
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.nudge = nudge
        self.demo = demo
        self.min_lsn_wait = min_lsn_wait
        #: resident memory, CPU seconds and open file descriptors of this process
        self.process = ProcessMetrics()
        self.registry = registry_for(consumer, hub, self.process, *collectors)
        self._metrics_token = metrics_token.encode() if metrics_token else None
        ops = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        if ops_elsewhere:
            public_ops = [
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz_brief, methods=["GET"]),
            ]
        else:
            public_ops = ops
        stream = self._guard(self.stream, "stream")
        ticket = self._guard(self.ticket, "ticket")
        routes = [
            Route("/v1/badges/stream", stream, methods=["GET"]),
            Route("/v1/badges", self._guard(self.badges), methods=["GET"]),
            Route("/v1/badges/ticket", ticket, methods=["POST"]),
            Route("/v1/admin/badges", self._guard(self.all_badges, "admin"), methods=["GET"]),
            *public_ops,
            *(static_route(name, media) for name, media in CLIENT_FILES.items()),
        ]
        if demo is not None:
            routes += [
                static_route("index.html", DEMO_FILES["index.html"], path="/"),
                *(static_route(name, media) for name, media in DEMO_FILES.items()),
                Route("/v1/demo/contacts", self.demo_contacts, methods=["GET"]),
                Route(
                    "/v1/demo/actions", self._guard(self.demo_action, "bearer"), methods=["POST"]
                ),
            ]
        security = Middleware(SecurityHeaders, skip=("/v1/badges/stream",))
        self.app = Starlette(
            routes=routes,
            lifespan=lifespan,
            middleware=[security, Middleware(CorsMiddleware, policy=self.cors)],
        )
        self.admin_app = Starlette(routes=ops, middleware=[security])
        #: the app with a reconnect's two requests served directly (what the server runs)
        self.asgi = HotRoutes(
            self.app,
            {
                ("POST", "/v1/badges/ticket"): ticket,
                ("GET", "/v1/badges/stream"): stream,
                ("HEAD", "/v1/badges/stream"): stream,
            },
            self.cors,
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
        if kind in ("ticket", "bearer"):
            # A ticket's point is to keep the token out of URLs, and a write must not ride
            # on a cookie that a page the user did not mean to trust could send.
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
        refused = await self._reach(request)
        if refused is not None:
            return refused
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

    async def _reach(self, request: Request) -> Response | None:
        """Wait until the state holds every transaction committed at or before ``min_lsn``
        (when given); the refusal to send otherwise."""
        text = request.query_params.get("min_lsn")
        if text is None:
            return None
        try:
            lsn = parse_lsn(text)
            if not 0 <= lsn <= MAX_LSN:
                raise ProtocolError("out of range")
        except ProtocolError:
            return error(
                400,
                "bad_request",
                f"min_lsn={text[:40]!r} is not an LSN; pass the X/Y text that"
                " pg_current_wal_lsn() returns after your commit",
            )
        consumer = self.consumer
        deadline = time.monotonic() + self.min_lsn_wait

        async def reached(until: float) -> bool:
            with anyio.move_on_after(max(0.0, until - time.monotonic())):
                return await consumer.reached(lsn)
            return False

        # A commit just made is usually on its way: give it a moment before writing.
        if await reached(min(time.monotonic() + NUDGE_AFTER_S, deadline)):
            return None
        if self.nudge is not None and consumer.error is None:
            after = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                after = await self.nudge(lsn)
            if after is not None and lsn > after:
                return error(
                    400,
                    "bad_request",
                    f"min_lsn {format_lsn(lsn)} is ahead of the database's WAL"
                    f" ({format_lsn(after)}); pass the LSN that pg_current_wal_lsn() returns"
                    " after your commit",
                )
        if await reached(deadline):
            return None
        if consumer.error is not None:
            why = f"replication has stopped: {consumer.error}"
        elif not consumer.live:
            why = "the replication stream is down"
        else:
            why = f"the service has applied the WAL up to {format_lsn(consumer.applied_lsn)}"
        return error(
            503,
            "not_yet",
            f"min_lsn {format_lsn(lsn)} not reached within {self.min_lsn_wait:g} s: {why}",
            **{"Retry-After": str(MIN_LSN_RETRY_S)},
        )

    async def badges(self, request: Request, identity: Identity) -> Response:
        refused = await self._reach(request)
        if refused is not None:
            return refused
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

    def return_ticket(self, sub: Subscriber, valid_s: float) -> str | None:
        """A ticket for coming back after a restart (``Hub.close``), valid ``valid_s``
        seconds; None when tickets do not outlive this process (no HS256 secret) or the
        stream's token has expired."""
        if not self.tickets.shared:
            return None
        expires = sub.expires_at
        if expires != math.inf:
            expires = time.time() + (expires - time.monotonic())
        identity = Identity(sub.user, False, expires, sub.anonymous)
        try:
            return self.tickets.issue(identity, ttl=valid_s)[0]
        except AuthError:
            return None

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

    def readiness(self) -> tuple[int, dict[str, object]]:
        c = self.consumer
        body: dict[str, object] = {
            "live": c.live,
            "applied_lsn": format_lsn(c.applied_lsn),
            "lag_bytes": c.lag_bytes(),
        }
        if c.error:
            return 503, {"status": "failed", "error": c.error, **body}
        if not c.live:
            return 503, {"status": "not streaming", **body}
        behind = c.behind()
        if behind is not None:
            return 503, {"status": "catching up", "reason": behind, **body}
        return 200, {"status": "ready", **body}

    async def readyz(self, request: Request) -> Response:
        status, body = self.readiness()
        return JSONResponse(body, status_code=status)

    async def readyz_brief(self, request: Request) -> Response:
        status, body = self.readiness()
        return JSONResponse({"status": body["status"]}, status_code=status)

    async def metrics(self, request: Request) -> Response:
        if self._metrics_token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._metrics_token
            ):
                return error(
                    401,
                    "unauthorized",
                    "/metrics needs Authorization: Bearer <REPLICATOR_METRICS_TOKEN>",
                    **{"WWW-Authenticate": "Bearer"},
                )
        await self.process.refresh()
        return Response(render(self.registry), media_type="text/plain; version=0.0.4")

    async def demo_contacts(self, request: Request) -> Response:
        """The demo contacts' names by user id, for the demo page."""
        return JSONResponse(CONTACTS)

    async def demo_action(self, request: Request, identity: Identity) -> Response:
        """One of the demo page's buttons, for the token's user: ``{"action", "contact"}``
        in, ``{"lsn"}`` (the WAL position after the commit, for ``min_lsn``) out."""
        assert self.demo is not None
        try:
            body = await small_json(request, MAX_DEMO_BODY)
            lsn = await self.demo(identity.user_id, body.get("action"), body.get("contact"))
        except BadRequest as exc:
            return error(400, "bad_request", str(exc))
        except ReplicatorError as exc:
            return error(503, "unavailable", str(exc), **{"Retry-After": "5"})
        return JSONResponse({"lsn": format_lsn(lsn)}, headers={"Cache-Control": "no-store"})


def static_route(name: str, media_type: str, *, path: str | None = None) -> Route:
    """``GET /name`` (or ``path``): the file ``static/name``, revalidated on every load."""
    file = STATIC / name

    async def serve(request: Request) -> Response:
        return FileResponse(file, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return Route(path or "/" + name, serve, methods=["GET"])


async def small_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object of at most ``limit`` bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the request body is over {limit} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body is not a JSON object")
    return data
