"""Tickets, token expiry, CORS and fair shares through a real service process."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import jwt
import pytest
from starlette.requests import Request

from replicator.web.app import client_address
from replicator.web.cors import CorsPolicy
from tests.conftest import Server
from tests.service_support import RunningService, service_on_new_database

pytestmark = pytest.mark.anyio

APP = "http://app.test:5173"
ELSEWHERE = "http://elsewhere.test"
PROXY = "127.0.0.3"


@pytest.fixture(scope="module")
def service(pg_server: Server) -> Iterator[RunningService]:
    env = {
        "REPLICATOR_CORS_ORIGINS": APP,
        "REPLICATOR_MAX_STREAMS_PER_ADDRESS": "3",
        "REPLICATOR_MAX_STREAMS": "8",
        "REPLICATOR_RESERVED_STREAMS": "2",
        "REPLICATOR_MAX_ANONYMOUS_STREAMS": "1",
        "REPLICATOR_TRUSTED_PROXIES": PROXY,
    }
    with service_on_new_database(pg_server, env=env) as svc:
        yield svc


@pytest.fixture
async def idle(service: RunningService) -> RunningService:
    """The shared service with no stream left open by an earlier test (closes are async)."""
    with anyio.fail_after(30):
        while service.metrics()["replicator_streams_connected"] != 0:
            await anyio.sleep(0.05)
    return service


def user() -> str:
    return str(uuid.uuid4())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def hold(
    service: RunningService,
    *,
    local: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> AsyncIterator[httpx.Response]:
    """A stream request from ``local``, held open while inside (the body is not read)."""
    transport = httpx.AsyncHTTPTransport(local_address=local)
    async with (
        httpx.AsyncClient(transport=transport, timeout=30, cookies=cookies) as client,
        client.stream(
            "GET", service.url + "/v1/badges/stream", headers=headers, params=params
        ) as response,
    ):
        if response.status_code != 200:
            await response.aread()
        yield response


async def events_until_end(response: httpx.Response) -> list[tuple[str, Any]]:
    """Every event of a stream, until the server ends it."""
    events: list[tuple[str, Any]] = []
    name, data = "message", ""
    with anyio.fail_after(60):
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                events.append((name, json.loads(data)))
                name, data = "message", ""
    return events


async def test_a_stream_ends_with_reauthenticate_when_its_token_expires(
    idle: RunningService,
) -> None:
    service, alice = idle, user()
    token = service.token(alice, ttl=2)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        ticket = (await client.post("/v1/badges/ticket", headers=bearer(token))).json()["ticket"]
    async with (
        hold(service, headers=bearer(token)) as by_header,
        hold(service, params={"ticket": ticket}) as by_ticket,
    ):
        assert by_header.status_code == by_ticket.status_code == 200
        for response in (by_header, by_ticket):
            events = await events_until_end(response)
            assert [name for name, _ in events] == ["badges", "reauthenticate"]
            assert events[0][1]["user_id"] == alice
            assert events[1][1] == {"reason": "token expired"}


async def test_tickets_are_single_use_short_lived_and_bound_to_the_token(
    idle: RunningService,
) -> None:
    service, alice = idle, user()
    token = service.token(alice)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        issued = await client.post("/v1/badges/ticket", headers=bearer(token))
        assert issued.status_code == 200
        assert issued.headers["cache-control"] == "no-store"
        ticket = issued.json()["ticket"]
        assert 0 < issued.json()["expires_in"] <= 30
        assert token not in ticket and alice not in ticket

        async with hold(service, params={"ticket": ticket}) as stream:
            assert stream.status_code == 200
            first = await anext(stream.aiter_lines())
            assert first.startswith("retry:")

        async def refused(params: dict[str, str]) -> str:
            answer = await client.get("/v1/badges/stream", params=params)
            assert answer.status_code == 401
            return str(answer.json()["message"])

        assert (await refused({"ticket": ticket})).startswith("ticket already used")
        fresh = (await client.post("/v1/badges/ticket", headers=bearer(token))).json()["ticket"]
        tampered = fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB")
        assert await refused({"ticket": tampered}) == "invalid ticket"
        assert await refused({"ticket": "x" * 2000}) == "ticket too long"

        # Only a bearer header gets a ticket: not a cookie, not a token in the URL.
        async with httpx.AsyncClient(
            base_url=service.url, cookies={"access_token": token}
        ) as with_cookie:
            answers = [
                await with_cookie.post("/v1/badges/ticket"),
                await client.post("/v1/badges/ticket", params={"access_token": token}),
            ]
        for answer in answers:
            assert answer.status_code == 401
            assert answer.json()["message"] == "send the token as Authorization: Bearer <token>"
        expired = service.token(alice, ttl=-60)
        assert (await client.post("/v1/badges/ticket", headers=bearer(expired))).status_code == 401

        # A ticket never outlives its token.
        brief = service.token(alice, ttl=2)
        short = (await client.post("/v1/badges/ticket", headers=bearer(brief))).json()
        assert short["expires_in"] <= 2
        expiry = jwt.decode(brief, options={"verify_signature": False})["exp"]
        with anyio.fail_after(10):
            while time.time() <= expiry:
                await anyio.sleep(0.05)
        assert (await refused({"ticket": short["ticket"]})).startswith("ticket expired")


async def test_cors_preflight_and_responses(idle: RunningService) -> None:
    service, alice = idle, user()
    token = service.token(alice)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        for path, method in (("/v1/badges/stream", "GET"), ("/v1/badges/ticket", "POST")):
            preflight = await client.options(
                path,
                headers={
                    "Origin": APP,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == APP
            assert preflight.headers["access-control-allow-credentials"] == "true"
            assert method in preflight.headers["access-control-allow-methods"]
            assert "Authorization" in preflight.headers["access-control-allow-headers"]
            assert "Origin" in preflight.headers["vary"]
        denied = await client.options(
            "/v1/badges/stream",
            headers={"Origin": ELSEWHERE, "Access-Control-Request-Method": "GET"},
        )
        assert denied.status_code == 403
        assert denied.json()["message"] == (
            "origin 'http://elsewhere.test' is not in REPLICATOR_CORS_ORIGINS"
        )
        assert "access-control-allow-origin" not in denied.headers

        listed = await client.get("/v1/badges", headers={"Origin": APP, **bearer(token)})
        assert listed.status_code == 200 and listed.json()["user_id"] == alice
        assert listed.headers["access-control-allow-origin"] == APP
        assert listed.headers["access-control-allow-credentials"] == "true"
        assert listed.headers["access-control-expose-headers"] == "Retry-After"
        assert listed.headers["vary"] == "Origin"
        # Errors are readable by the page too.
        unauthorized = await client.get("/v1/badges", headers={"Origin": APP})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == APP
        other = await client.get("/v1/badges", headers={"Origin": ELSEWHERE, **bearer(token)})
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers
        assert other.headers["vary"] == "Origin"
        # The ticket and the stream (served apart from the router, for reconnects) carry the
        # same CORS and security headers, errors included.
        ticket = await client.post("/v1/badges/ticket", headers={"Origin": APP, **bearer(token)})
        no_ticket = await client.post("/v1/badges/ticket", headers={"Origin": APP})
        no_stream = await client.get("/v1/badges/stream", headers={"Origin": APP})
        assert (ticket.status_code, no_ticket.status_code, no_stream.status_code) == (200, 401, 401)
        for answer in (ticket, no_ticket, no_stream):
            for name in ("access-control-allow-origin", "vary", "content-security-policy"):
                assert answer.headers[name] == listed.headers[name], (answer.url, name)
            assert answer.headers["x-content-type-options"] == "nosniff"
        plain = await client.get("/healthz", headers={"Origin": APP})
        assert "access-control-allow-origin" not in plain.headers

        # The cookie counts from a listed origin, the service's own, or without an Origin;
        # never from another site.
        own = service.url
        for origin, status in ((APP, 200), (own, 200), (None, 200), (ELSEWHERE, 401)):
            headers = {"Origin": origin} if origin else {}
            client.cookies.set("access_token", token)
            answer = await client.get("/v1/badges", headers=headers)
            assert answer.status_code == status, (origin, answer.text)
        assert answer.json()["message"].startswith(
            "the access_token cookie is not accepted from origin 'http://elsewhere.test'"
        )
        client.cookies.clear()

    async with hold(service, headers={"Origin": APP, **bearer(token)}) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == APP
        assert stream.headers["content-type"].startswith("text/event-stream")


def test_cors_policy_with_a_wildcard() -> None:
    policy = CorsPolicy([APP, "*"])
    assert dict(policy.headers(APP))[b"access-control-allow-credentials"] == b"true"
    anyone = dict(policy.headers(ELSEWHERE))
    assert anyone[b"access-control-allow-origin"] == b"*"
    assert b"access-control-allow-credentials" not in anyone
    assert not policy.allows_cookie(ELSEWHERE, "badges.test")
    assert policy.allows_cookie(APP, "badges.test")
    assert policy.allows_cookie("https://badges.test", "badges.test")


def _refused(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'replicator_streams_refused_total{{reason="{reason}"}}', 0.0)


async def test_fair_shares_per_address_proxy_anonymous_and_reserve(idle: RunningService) -> None:
    service = idle
    before = service.metrics()
    people = [user() for _ in range(8)]
    tokens = [service.token(p) for p in people]

    async with AsyncExitStack() as stack:

        async def open_(**kwargs: Any) -> httpx.Response:
            return await stack.enter_async_context(hold(service, **kwargs))

        def forwarded(address: str, token: str) -> dict[str, str]:
            return {"X-Forwarded-For": address, **bearer(token)}

        for token in tokens[:3]:
            assert (await open_(headers=bearer(token))).status_code == 200
        crowded = await open_(headers=bearer(tokens[3]))
        assert crowded.status_code == 429
        assert crowded.headers["retry-after"] == "10"
        assert crowded.json() == {
            "error": "too_many_streams",
            "message": "too many open streams from this address (limit 3)",
        }
        # Another address has its own share.
        assert (await open_(local="127.0.0.2", headers=bearer(tokens[3]))).status_code == 200
        # Behind the trusted proxy, X-Forwarded-For names the client...
        behind = await open_(local=PROXY, headers=forwarded("10.0.0.1", tokens[4]))
        assert behind.status_code == 200
        # ...from anyone else it is ignored: this is still 127.0.0.1, which is full.
        spoofed = await open_(headers=forwarded("10.9.9.9", tokens[5]))
        assert spoofed.status_code == 429

        anonymous = [service.token(user(), claims={"is_anonymous": True}) for _ in range(2)]
        assert (
            await open_(local=PROXY, headers=forwarded("10.0.0.2", anonymous[0]))
        ).status_code == 200
        over = await open_(local=PROXY, headers=forwarded("10.0.0.3", anonymous[1]))
        assert over.status_code == 503
        assert over.json()["message"] == "too many streams of anonymous users (limit 1)"

        # 6 of 8 open: the last 2 places wait for users already connected.
        newcomer = await open_(local=PROXY, headers=forwarded("10.0.0.4", tokens[6]))
        assert newcomer.status_code == 503
        assert 5 <= int(newcomer.headers["retry-after"]) <= 15
        assert "kept for users already connected" in newcomer.json()["message"]
        second_device = await open_(local="127.0.0.2", headers=bearer(tokens[0]))
        assert second_device.status_code == 200

    after = service.metrics()
    for reason, count in (("address", 2), ("anonymous", 1), ("reserve", 1), ("capacity", 0)):
        assert _refused(after, reason) - _refused(before, reason) == count, reason


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same host's /64
        ("::ffff:203.0.113.7", "203.0.113.7"),
    ],
)
def test_client_address_groups_ipv6_by_its_64(peer: str, address: str) -> None:
    request = Request({"type": "http", "client": (peer, 4000), "headers": []})
    assert client_address(request) == address
