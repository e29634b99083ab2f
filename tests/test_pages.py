"""What the service serves besides badges: the client's files, the demo only when asked for,
and security headers on every response."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from replicator.ops.demo import CONTACTS
from tests.conftest import Database
from tests.service_support import RunningService, running_service

MOM = next(user for user, name in CONTACTS.items() if name == "Mom")
CLIENT_FILES = {
    "/badges.js": "text/javascript",
    "/badges.mjs": "text/javascript",
    "/badges.d.ts": "application/typescript",
}
DEMO_ROUTES = [
    ("GET", "/"),
    ("GET", "/demo.js"),
    ("GET", "/demo.css"),
    ("GET", "/v1/demo/contacts"),
]


@pytest.fixture
def demo(database: Database) -> Iterator[RunningService]:
    with running_service(database.dsn, database.slot, env={"REPLICATOR_DEMO": "true"}) as svc:
        yield svc


def assert_secured(response: httpx.Response) -> None:
    headers = response.headers
    what = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), what
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("referrer-policy") == "no-referrer", what


def test_without_the_demo_setting_there_is_no_demo(database: Database) -> None:
    """With DATABASE_URL and no REPLICATOR_DEMO: no demo page, contacts or writes."""
    with running_service(database.dsn, database.slot) as service:
        token = service.token(str(uuid.uuid4()))
        for method, path in [*DEMO_ROUTES, ("POST", "/v1/demo/actions")]:
            response = httpx.request(
                method,
                service.url + path,
                headers={"Authorization": f"Bearer {token}"},
                json={"action": "message", "contact": MOM},
            )
            assert response.status_code in (404, 405), (path, response.status_code)
            assert_secured(response)
        for path, media in CLIENT_FILES.items():
            response = httpx.get(service.url + path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(media)
            assert_secured(response)


def test_every_response_carries_security_headers(demo: RunningService) -> None:
    token = demo.token(str(uuid.uuid4()))
    auth = {"Authorization": f"Bearer {token}"}
    url = demo.url
    responses = [
        httpx.get(url + "/"),
        httpx.get(url + "/demo.js"),
        httpx.get(url + "/badges.js"),
        httpx.get(url + "/badges.d.ts"),
        httpx.get(url + "/v1/demo/contacts"),
        httpx.get(url + "/v1/badges", headers=auth),
        httpx.get(url + "/v1/badges"),
        httpx.get(url + "/v1/badges", headers=auth, params={"min_lsn": "soon"}),
        httpx.get(url + "/v1/badges/stream"),
        httpx.post(url + "/v1/badges/ticket", headers=auth),
        httpx.get(url + "/healthz"),
        httpx.get(url + "/readyz"),
        httpx.get(url + "/metrics"),
        httpx.get(url + "/no/such/page"),
    ]
    with httpx.stream("GET", url + "/v1/badges/stream", headers=auth) as stream:
        assert stream.status_code == 200
        responses.append(stream)
    assert [r.status_code for r in responses] == [
        *[200] * 6,
        401,
        400,
        401,
        200,
        200,
        200,
        200,
        404,
        200,
    ]
    for response in responses:
        assert_secured(response)
    page = responses[0].headers["content-security-policy"]
    # the page runs its own files only: no inline script or style, no other origin
    assert "script-src 'self'" in page and "unsafe" not in page
    assert "default-src 'none'" in responses[5].headers["content-security-policy"]


def test_the_demo_write_route_takes_only_what_it_expects(demo: RunningService) -> None:
    user = str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {demo.token(user)}"}
    route = demo.url + "/v1/demo/actions"
    refused = {
        "action": (auth, {"action": "drop", "contact": MOM}, "action 'drop' is not one of"),
        "contact": (auth, {"action": "message", "contact": "x"}, "not one of the demo contacts"),
        "not JSON": (auth, b"action=message", "not JSON"),
        "too big": (auth, {"action": "message", "pad": "x" * 2000}, "over 1024 bytes"),
        "not a uuid": (
            {"Authorization": f"Bearer {demo.token('42')}"},
            {"action": "message", "contact": MOM},
            "for uuid users",
        ),
    }
    for case, (headers, body, message) in refused.items():
        if isinstance(body, bytes):
            response = httpx.post(route, headers=headers, content=body)
        else:
            response = httpx.post(route, headers=headers, json=body)
        assert response.status_code == 400, case
        assert message in response.json()["message"], case
    # a write takes the Authorization header, never a cookie a page could make it send
    by_cookie = httpx.post(
        route,
        cookies={"access_token": demo.token(user)},
        json={"action": "message", "contact": MOM},
    )
    assert by_cookie.status_code == 401

    written = httpx.post(route, headers=auth, json={"action": "message", "contact": MOM})
    assert written.status_code == 200
    lsn = written.json()["lsn"]
    after = httpx.get(demo.url + "/v1/badges", headers=auth, params={"min_lsn": lsn})
    assert after.status_code == 200
    assert after.json()["unread_messages"] == {MOM: 1}
