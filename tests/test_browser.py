"""The demo page and badges.js in a real headless Chromium, against a real service process."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from replicator.ops.demo import CONTACTS, DEMO_USER
from tests.conftest import Database, Server, create_database, drop_database
from tests.service_support import RunningService, running_service, start_service

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: how long the page may take to show a change (a reconnect waits out the client's backoff)
WAIT_MS = 45_000

#: the demo page and its routes are served only when asked for (or with the embedded database)
DEMO = {"REPLICATOR_DEMO": "true"}
STATIC = Path(__file__).resolve().parents[1] / "replicator" / "web" / "static"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"

BY_NAME = {name: user for user, name in CONTACTS.items()}
MOM, DAD, GRANDMA = BY_NAME["Mom"], BY_NAME["Dad"], BY_NAME["Grandma"]
STRANGER = str(uuid.UUID(int=0xABCDEF, version=4))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-deps.sh (make system-deps)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 720, "height": 760})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    """An app's origin, other than the service's."""
    with app_origin() as origin:
        yield origin


@pytest.fixture(scope="module")
def shared_database(pg_server: Server) -> Iterator[Database]:
    db = create_database(pg_server)
    yield db
    drop_database(db)


@pytest.fixture(scope="module")
def shared(shared_database: Database, app: str) -> Iterator[RunningService]:
    """One service (with the demo, and the app's origin allowed) for the tests that leave it
    as they found it: each of them uses users of its own."""
    env = {**DEMO, "REPLICATOR_CORS_ORIGINS": app}
    with running_service(shared_database.dsn, shared_database.slot, env=env) as service:
        yield service


@pytest.fixture
def dsn(shared_database: Database) -> str:
    return shared_database.dsn


def sql(dsn: str, query: str, *params: object) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, params)


def message(dsn: str, sender: str, recipient: str = DEMO_USER) -> None:
    sql(dsn, "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)", sender, recipient)


def missed_call(dsn: str, caller: str, callee: str = DEMO_USER) -> None:
    sql(
        dsn,
        "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
        caller,
        callee,
    )


def open_demo(page: Page, service: RunningService, user: str = DEMO_USER) -> Locator:
    """The demo page; what it shows of device A (the tests read that pane)."""
    page.goto(f"{service.url}/#access_token={service.token(user)}", wait_until="domcontentloaded")
    return device(page, "a")


def device(page: Page, name: str) -> Locator:
    return page.locator(f'[data-device="{name}"]')


def unread(page: Page | Locator, sender: str) -> Locator:
    return pane_of(page).locator(f'li[data-sender="{sender}"]')


def missed(page: Page | Locator, caller: str) -> Locator:
    return pane_of(page).locator(f'li[data-caller="{caller}"]')


def total_unread(page: Page | Locator) -> Locator:
    return pane_of(page).get_by_test_id("total-unread")


def total_missed(page: Page | Locator) -> Locator:
    return pane_of(page).get_by_test_id("total-missed")


def pane_of(where: Page | Locator) -> Locator:
    return device(where, "a") if isinstance(where, Page) else where


def test_page_follows_changes_and_recovers_after_a_restart(database: Database, page: Page) -> None:
    dsn = database.dsn
    service = start_service(dsn, database.slot, env=DEMO)
    try:
        app = open_demo(page, service)
        expect(app).to_have_attribute("data-state", "live")
        expect(total_unread(page)).to_have_text("0")
        expect(app.get_by_test_id("unread-list")).to_have_text("No unread messages")

        message(dsn, MOM)
        expect(unread(page, MOM).locator(".count")).to_have_text("1")
        expect(unread(page, MOM)).to_contain_text("Mom")
        expect(total_unread(page)).to_have_text("1")

        message(dsn, STRANGER)
        message(dsn, STRANGER)
        expect(unread(page, STRANGER).locator(".count")).to_have_text("2")
        expect(unread(page, STRANGER)).to_contain_text(STRANGER[:8])
        expect(total_unread(page)).to_have_text("3")

        sql(dsn, "UPDATE messages SET read_at = now() WHERE sender_id = %s", MOM)
        expect(unread(page, MOM)).to_have_count(0)
        expect(total_unread(page)).to_have_text("2")

        missed_call(dsn, DAD)
        expect(missed(page, DAD).locator(".count")).to_have_text("1")
        expect(missed(page, DAD)).to_contain_text("Dad")
        expect(total_missed(page)).to_have_text("1")

        # Another user's changes never reach this page.
        message(dsn, MOM, recipient=STRANGER)
        missed_call(dsn, GRANDMA)
        expect(missed(page, GRANDMA)).to_have_count(1)
        expect(total_unread(page)).to_have_text("2")

        page.evaluate("window.sameDocument = true")
        port = str(urlsplit(service.url).port)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/v1/badges" in r.url else None)
        assert service.stop() == 0
        expect(app).to_have_attribute("data-state", "stale")
        expect(app.get_by_test_id("stale-notice")).to_be_visible()
        expect(app.get_by_test_id("status")).to_have_text("Reconnecting…")

        # While the service is down: new messages, a read, seen calls.
        message(dsn, GRANDMA)
        message(dsn, GRANDMA)
        sql(dsn, "UPDATE messages SET read_at = now() WHERE sender_id = %s", STRANGER)
        sql(dsn, "UPDATE calls SET seen_at = now() WHERE callee_id = %s", DEMO_USER)

        service = start_service(dsn, database.slot, env={**DEMO, "REPLICATOR_PORT": port})
        expect(app).to_have_attribute("data-state", "live")
        expect(unread(page, GRANDMA).locator(".count")).to_have_text("2")
        expect(unread(page, STRANGER)).to_have_count(0)
        expect(total_unread(page)).to_have_text("2")
        expect(app.locator("li[data-caller]")).to_have_count(0)
        expect(total_missed(page)).to_have_text("0")
        expect(app.get_by_test_id("stale-notice")).to_be_hidden()
        assert page.evaluate("window.sameDocument") is True
        # Each device came back with the ticket the service handed it as it shut down, its
        # stream in one request: no new ticket was asked for.
        paths = [urlsplit(url).path for url in requests]
        assert "/v1/badges/ticket" not in paths
        assert paths.count("/v1/badges/stream") >= 2
        assert all("ticket=" in url for url in requests if "/stream" in url)
    finally:
        service.stop()


def test_a_ticket_the_next_instance_does_not_take_means_coming_back_the_usual_way(
    database: Database, page: Page
) -> None:
    """The restarted service signs tickets with another secret (rotated), so the ticket
    handed out at shutdown is refused: the page gets a new one with its token."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    env = {**DEMO, "REPLICATOR_JWT_PUBLIC_KEY": pem.decode()}
    now = int(time.time())
    claims = {"sub": DEMO_USER, "aud": "authenticated", "iat": now, "exp": now + 3600}
    token = jwt.encode(claims, key, "ES256")
    service = start_service(database.dsn, database.slot, env=env)
    try:
        page.goto(f"{service.url}/#access_token={token}", wait_until="domcontentloaded")
        app = device(page, "a")
        expect(app).to_have_attribute("data-state", "live")
        answers: list[tuple[str, int]] = []
        page.on("response", lambda r: answers.append((urlsplit(r.url).path, r.status)))
        port = str(urlsplit(service.url).port)
        assert service.stop() == 0
        message(database.dsn, MOM)
        rotated = {**env, "REPLICATOR_PORT": port, "REPLICATOR_JWT_SECRET": "r" * 40}
        service = start_service(database.dsn, database.slot, env=rotated)
        expect(unread(page, MOM).locator(".count")).to_have_text("1")
        expect(app).to_have_attribute("data-state", "live")
        # the handed ticket was refused, the token was good: a new ticket, then the stream
        assert ("/v1/badges/stream", 401) in answers
        assert ("/v1/badges/ticket", 200) in answers
    finally:
        service.stop()


def test_page_marks_counts_stale_while_replication_is_down(database: Database, page: Page) -> None:
    dsn = database.dsn
    with running_service(dsn, database.slot, env=DEMO) as service:
        message(dsn, DAD)
        app = open_demo(page, service)
        expect(unread(page, DAD).locator(".count")).to_have_text("1")
        expect(app).to_have_attribute("data-state", "live")
        # Every state the page passes through, however briefly.
        page.evaluate(
            """() => {
                const app = document.querySelector('[data-device="a"]');
                window.states = [];
                new MutationObserver(() => window.states.push(app.dataset.state))
                    .observe(app, {attributes: true, attributeFilter: ["data-state"]});
            }"""
        )
        # Cut the service's replication connection: it reconnects by itself.
        sql(
            dsn,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE slot_name = %s AND active",
            database.slot,
        )
        message(dsn, DAD)
        page.wait_for_function("window.states.includes('stale')")
        expect(app).to_have_attribute("data-state", "live")
        expect(unread(page, DAD).locator(".count")).to_have_text("2")


def test_refused_token_is_reported_and_not_retried(database: Database, page: Page) -> None:
    with running_service(database.dsn, database.slot, env=DEMO) as service:
        # Each device trades the token for a stream ticket first: that is its one request.
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/v1/badges" in r.url else None)
        expired = service.token(DEMO_USER, ttl=-60)
        page.goto(f"{service.url}/#access_token={expired}", wait_until="domcontentloaded")
        app = device(page, "a")
        expect(app).to_have_attribute("data-state", "unauthorized")
        expect(device(page, "b")).to_have_attribute("data-state", "unauthorized")
        expect(page.get_by_test_id("auth-notice")).to_be_visible()
        expect(app.get_by_test_id("status")).to_have_text("Signed out")
        # Longer than the client's first reconnect delay: no second attempt comes.
        page.wait_for_timeout(2500)
        assert [urlsplit(url).path for url in streams] == ["/v1/badges/ticket"] * 2

        page.goto(f"{service.url}/", wait_until="domcontentloaded")
        expect(app).to_have_attribute("data-state", "unauthorized")


def test_client_loads_as_a_module_and_takes_a_token_function(
    shared: RunningService, app: str, page: Page, dsn: str
) -> None:
    """badges.mjs, hosted by the app beside badges.js, against the service's origin."""
    user = str(uuid.uuid4())
    message(dsn, DAD, user)
    page.goto(app + "/blank")
    result = page.evaluate(
        """async ([url, token]) => {
            const { connect } = await import("/badges.mjs");
            return await new Promise((resolve) => {
                const client = connect(url, {
                    token: async () => token,
                    onChange(state, status) {
                        if (!state) return;
                        client.close();
                        resolve({ state, status, share: client.share });
                    },
                });
            });
        }""",
        [shared.url + "/v1/badges/stream", shared.token(user)],
    )
    assert result["state"]["user_id"] == user
    assert result["state"]["unread_messages"] == {DAD: 1}
    assert result["status"] == {"connected": True, "live": True, "lagMs": 0, "error": None}
    assert result["share"] == "worker"


def test_expiring_tokens_are_refreshed_and_no_change_is_lost(
    shared: RunningService, app: str, page: Page, dsn: str
) -> None:
    """5-second tokens: at each expiry the stream says reauthenticate, the client asks its
    token() for a new one and reconnects at once; every change still shows."""
    user = str(uuid.uuid4())
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/v1/badges" in r.url else None)
    page.expose_function("mintToken", lambda: shared.token(user, ttl=5))
    page.goto(app + "/")
    page.evaluate(
        """(url) => {
            window.tokens = 0;
            window.client = ReplicatorBadges.connect({
                url,
                share: false,
                token: async () => { window.tokens += 1; return await window.mintToken(); },
                onChange(state, status) {
                    window.latest = state;
                    window.clientStatus = status;
                },
            });
        }""",
        shared.url + "/v1/badges/stream",
    )
    for round_ in range(1, 5):
        # a new token means the last one expired and its stream was ended
        page.wait_for_function(f"window.tokens >= {round_ + 1}")
        message(dsn, DAD, user)
        page.wait_for_function(
            f"window.latest && window.latest.unread_messages[{DAD!r}] === {round_}"
        )
    status = page.evaluate("window.clientStatus")
    assert status["error"] is None and status["live"] is True
    page.evaluate("window.client.close()")
    streams = [url for url in requests if "/stream" in url]
    assert len(streams) >= 5
    assert all("ticket=" in url and "access_token" not in url for url in streams)


def test_a_fixed_token_stops_with_token_expired(shared: RunningService, page: Page) -> None:
    tickets: list[str] = []
    page.on("request", lambda r: tickets.append(r.url) if "/ticket" in r.url else None)
    token = shared.token(str(uuid.uuid4()), ttl=3)
    page.goto(f"{shared.url}/#access_token={token}", wait_until="domcontentloaded")
    app = device(page, "a")
    expect(app).to_have_attribute("data-state", "live")
    expect(app).to_have_attribute("data-state", "unauthorized")
    expect(page.get_by_test_id("auth-reason")).to_have_text("The token has expired.")
    assert page.evaluate("window.devices.a.status.error") == "token expired"
    assert len(tickets) == 2  # one per device


class _AppPage(BaseHTTPRequestHandler):
    """An app on its own origin: ``/`` loads the app's own copy of badges.js (so that it can
    be the page's shared worker), ``/badges.js`` and ``/badges.mjs`` are those copies, and any
    other path is a blank page whose scripts come from elsewhere."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        content_type = "text/html; charset=utf-8"
        if path == "/":
            body = (
                b"<!doctype html><meta charset=utf-8><title>app</title>"
                b'<script src="/badges.js"></script><p>app'
            )
        elif path in ("/badges.js", "/badges.mjs"):
            body = (STATIC / path[1:]).read_bytes()
            content_type = "text/javascript; charset=utf-8"
        else:
            body = b"<!doctype html><meta charset=utf-8><title>app</title><p>app"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def app_origin() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _AppPage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def with_deadline(page: Page, condition: Callable[[], bool]) -> None:
    """Poll a condition on the test's side (page events arrive while Playwright waits)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(50)


CROSS_ORIGIN_CLIENT = """async ([service, token, withCredentials]) => {
    const snapshot = await fetch(service + "/v1/badges", {
        headers: token ? { Authorization: "Bearer " + token } : {},
        credentials: withCredentials ? "include" : "omit",
    }).then((r) => r.json()).catch((e) => ({ failed: String(e) }));
    window.latest = null;
    window.client = globalThis.ReplicatorBadges.connect({
        url: service + "/v1/badges/stream",
        token: token ? () => token : null,
        withCredentials,
        onChange(state, status) { window.latest = state; window.clientStatus = status; },
    });
    return snapshot;
}"""


def test_a_page_on_another_origin_uses_fetch_and_eventsource(
    database: Database, browser: Browser
) -> None:
    dsn = database.dsn
    with app_origin() as listed, app_origin() as other:
        env = {"REPLICATOR_CORS_ORIGINS": f"{listed},*"}
        with running_service(dsn, database.slot, env=env) as service:
            token = service.token(DEMO_USER)
            pages = {}
            for origin in (listed, other):
                context = browser.new_context()
                context.add_cookies([{"name": "access_token", "value": token, "url": service.url}])
                pages[origin] = context.new_page()
                pages[origin].set_default_timeout(WAIT_MS)
                pages[origin].goto(origin + "/")
                pages[origin].add_script_tag(url=service.url + "/badges.js")
            try:
                # A listed origin: the header token, then the cookie (credentials).
                app = pages[listed]
                first = app.evaluate(CROSS_ORIGIN_CLIENT, [service.url, token, False])
                assert first["user_id"] == DEMO_USER
                app.wait_for_function("window.latest && window.clientStatus.live")
                message(dsn, MOM)
                app.wait_for_function(f"window.latest?.unread_messages[{MOM!r}] === 1")
                app.evaluate("window.client.close()")
                with_cookie = app.evaluate(CROSS_ORIGIN_CLIENT, [service.url, None, True])
                assert with_cookie["user_id"] == DEMO_USER
                app.wait_for_function(f"window.latest?.unread_messages[{MOM!r}] === 1")

                # Any other origin (*): tokens in a header or a ticket work, the cookie not.
                elsewhere = pages[other]
                snapshot = elsewhere.evaluate(CROSS_ORIGIN_CLIENT, [service.url, token, False])
                assert snapshot["unread_messages"] == {MOM: 1}
                elsewhere.wait_for_function("window.latest && window.clientStatus.live")
                message(dsn, MOM)
                for page in (app, elsewhere):
                    page.wait_for_function(f"window.latest?.unread_messages[{MOM!r}] === 2")
                elsewhere.evaluate("window.client.close()")
                attempts: list[str] = []
                elsewhere.on(
                    "request", lambda r: attempts.append(r.url) if "/stream" in r.url else None
                )
                refused = elsewhere.evaluate(CROSS_ORIGIN_CLIENT, [service.url, None, True])
                assert "failed" in refused  # the browser hides the answer: a network error
                # The stream fails the same way; the client backs off and tries again.
                with_deadline(elsewhere, lambda: len(attempts) >= 2)
                assert elsewhere.evaluate("window.latest") is None
            finally:
                for page in pages.values():
                    page.context.close()


# -- one stream per browser ------------------------------------------------------------------

CONNECT = """([url, token, share, minDelay]) => {
    window.updates = 0;
    window.client = ReplicatorBadges.connect({
        url, token, share, minDelay: minDelay || 1000,
        onChange(state, status) {
            window.latest = state;
            window.clientStatus = status;
            window.updates += 1;
        },
    });
}"""


def connect_tab(tab: Page, app: str, service: RunningService, token: str, share: object) -> None:
    tab.set_default_timeout(WAIT_MS)
    tab.goto(app + "/")
    tab.evaluate(CONNECT, [service.url + "/v1/badges/stream", token, share, None])


def streams_connected(service: RunningService) -> float:
    return service.metrics()["replicator_streams_connected"]


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition outside the browser, bounded in time."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.05)


def all_show(tabs: list[Page], sender: str, count: int) -> None:
    for tab in tabs:
        tab.wait_for_function(
            f"window.latest?.unread_messages[{sender!r}] === {count} && window.clientStatus.live"
        )


def shared_worker_targets(browser: Browser) -> list[dict[str, str]]:
    session = browser.new_browser_cdp_session()
    try:
        targets = session.send("Target.getTargets")["targetInfos"]
        return [t for t in targets if t["type"] == "shared_worker"]
    finally:
        session.detach()


@pytest.mark.parametrize("share", ["worker", "locks"])
def test_eight_tabs_share_one_stream_and_each_shows_every_change(
    shared: RunningService, app: str, browser: Browser, dsn: str, share: str
) -> None:
    """Eight tabs of one browser profile hold one stream, whichever way they share it; the
    tab (or worker) holding it goes away, then the next, and the rest stay live."""
    user = str(uuid.uuid4())
    token = shared.token(user)
    context = browser.new_context()
    try:
        tabs = [context.new_page() for _ in range(8)]
        for tab in tabs:
            connect_tab(tab, app, shared, token, share)
        message(dsn, MOM, user)
        all_show(tabs, MOM, 1)
        assert {tab.evaluate("window.client.share") for tab in tabs} == {share}
        until(lambda: streams_connected(shared) == 1, "one stream for eight tabs")

        count = 1
        for _ in range(2):
            if share == "locks":
                leaders = [tab for tab in tabs if tab.evaluate("window.client.leading")]
                assert len(leaders) == 1
                gone = leaders[0]
            else:
                # the worker holds the stream: the tab that started it goes, then the next
                assert not any(tab.evaluate("window.client.leading") for tab in tabs)
                gone = tabs[0]
            gone.close()
            tabs.remove(gone)
            count += 1
            message(dsn, MOM, user)
            all_show(tabs, MOM, count)
            until(lambda: streams_connected(shared) == 1, "one stream for the tabs left")

        if share == "worker":
            # The worker itself goes (the browser ended it): a new one takes over.
            (worker,) = shared_worker_targets(browser)
            session = browser.new_browser_cdp_session()
            session.send("Target.closeTarget", {"targetId": worker["targetId"]})
            session.detach()
            until(lambda: len(shared_worker_targets(browser)) == 1, "a new worker")
            count += 1
            message(dsn, MOM, user)
            all_show(tabs, MOM, count)
            until(lambda: streams_connected(shared) == 1, "one stream from the new worker")

        # close() ends one tab's client only
        quitter = tabs.pop()
        quitter.evaluate("window.client.close()")
        message(dsn, MOM, user)
        all_show(tabs, MOM, count + 1)
        assert quitter.evaluate(f"window.latest.unread_messages[{MOM!r}]") == count
        until(lambda: streams_connected(shared) == 1, "the stream stays for the others")
    finally:
        context.close()
    until(lambda: streams_connected(shared) == 0, "no stream once the browser is gone")


FREEZE = "() => document.dispatchEvent(new Event('freeze'))"
RESUME = "() => document.dispatchEvent(new Event('resume'))"


def pause(tab: Page) -> Any:
    """Stop the tab's JavaScript, as a frozen page's: no timer, no message, no event runs."""
    session = tab.context.new_cdp_session(tab)
    session.send("Debugger.enable")
    session.send("Debugger.pause")
    return session


def test_a_frozen_leader_is_replaced(
    shared: RunningService, app: str, browser: Browser, dsn: str
) -> None:
    """A leader tab frozen by the browser hands the stream over as it freezes; one that
    stops without a word (frozen before it could, or hanging) is replaced once it misses
    its heartbeats, and lets its stream go when it runs again."""
    user = str(uuid.uuid4())
    token = shared.token(user)
    context = browser.new_context()
    try:
        tabs = [context.new_page() for _ in range(3)]
        for tab in tabs:
            connect_tab(tab, app, shared, token, "locks")
        message(dsn, MOM, user)
        all_show(tabs, MOM, 1)

        def leader() -> Page:
            found = [tab for tab in tabs if tab.evaluate("window.client.leading")]
            assert len(found) == 1
            return found[0]

        # Page lifecycle: `freeze`, then nothing runs until `resume`.
        frozen = leader()
        frozen.evaluate(FREEZE)
        session = pause(frozen)
        others = [tab for tab in tabs if tab is not frozen]
        message(dsn, MOM, user)
        all_show(others, MOM, 2)
        until(lambda: streams_connected(shared) == 1, "the frozen leader let its stream go")
        session.send("Debugger.resume")
        session.detach()
        frozen.evaluate(RESUME)
        message(dsn, MOM, user)
        all_show(tabs, MOM, 3)
        assert not frozen.evaluate("window.client.leading")

        # A leader that stops without its freeze handler running: the others hear no beat.
        silent = leader()
        session = pause(silent)
        others = [tab for tab in tabs if tab is not silent]
        message(dsn, MOM, user)
        all_show(others, MOM, 4)
        session.send("Debugger.resume")
        session.detach()
        # it finds the lead taken, closes its stream and follows
        until(lambda: streams_connected(shared) == 1, "one stream after the silent leader")
        message(dsn, MOM, user)
        all_show(tabs, MOM, 5)
        assert sum(tab.evaluate("window.client.leading") for tab in tabs) == 1
        assert not silent.evaluate("window.client.leading")
    finally:
        context.close()


# -- read-your-writes, waking up, the demo ------------------------------------------------

SYNC_LOOP = """async ([service, token, mom, rounds]) => {
    const client = ReplicatorBadges.connect({ url: service + "/v1/badges/stream", token });
    const act = async (action) => {
        const response = await fetch(service + "/v1/demo/actions", {
            method: "POST",
            headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
            body: JSON.stringify({ action, contact: mom }),
        });
        return (await response.json()).lsn;
    };
    const wrong = [];
    let expected = 0;
    for (let i = 0; i < rounds; i++) {
        const action = i % 3 === 2 ? "read" : "message";
        expected = action === "read" ? 0 : expected + 1;
        const state = await client.sync(await act(action));
        const shown = state.unread_messages[mom] || 0;
        if (shown !== expected) wrong.push({ i, action, shown, expected });
    }
    client.close();
    return wrong;
}"""


def test_sync_after_a_write_shows_it_on_the_first_call(
    shared: RunningService, app: str, page: Page
) -> None:
    """client.sync(lsn) with the LSN of the app's own commit: never the old count."""
    page.goto(app + "/")
    token = shared.token(str(uuid.uuid4()))
    wrong = page.evaluate(SYNC_LOOP, [shared.url, token, MOM, 45])
    assert wrong == []


def test_going_offline_and_online_reconnects_without_waiting_out_the_backoff(
    shared: RunningService, app: str, browser: Browser, dsn: str
) -> None:
    """A backoff of at least 54 s after the first failure, longer than the test waits: only
    the `online` event can bring the client back in time."""
    user = str(uuid.uuid4())
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        tab.goto(app + "/")
        tab.evaluate(CONNECT, [shared.url + "/v1/badges/stream", shared.token(user), False, 60_000])
        tab.wait_for_function("window.clientStatus?.live")
        context.set_offline(True)
        tab.wait_for_function("window.clientStatus.live === false")
        message(dsn, MOM, user)
        context.set_offline(False)
        all_show([tab], MOM, 1)
    finally:
        context.close()


def test_the_demo_buttons_move_both_devices(shared: RunningService, browser: Browser) -> None:
    """The demo as a visitor uses it; its screenshot (docs/demo.png) is taken on the way."""
    context = browser.new_context(viewport={"width": 1000, "height": 560})
    problems: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        token = shared.token(DEMO_USER)
        page.goto(f"{shared.url}/#access_token={token}", wait_until="domcontentloaded")
        a, b = device(page, "a"), device(page, "b")
        for pane in (a, b):
            expect(pane).to_have_attribute("data-state", "live")
        # the token is gone from the address bar (and so from history and bookmarks)
        assert "access_token" not in page.url

        for count in (1, 2):
            page.get_by_test_id("message-from-mom").click()
            for pane in (a, b):
                expect(unread(pane, MOM).locator(".count")).to_have_text(str(count))
        page.get_by_test_id("dad-calls").click()
        for pane in (a, b):
            expect(missed(pane, DAD).locator(".count")).to_have_text("1")
            expect(total_missed(pane)).to_have_text("1")
        expect(page.get_by_test_id("log")).to_contain_text("both devices follow the stream")
        # the LSNs differ from run to run: masked, the picture stays the same
        page.screenshot(
            path=SCREENSHOT,
            full_page=True,
            mask=[page.locator("article footer")],
            mask_color="#e9ebf1",
        )

        page.get_by_test_id("open-chat-with-mom").click()
        for pane in (a, b):
            expect(unread(pane, MOM)).to_have_count(0)
            expect(total_unread(pane)).to_have_text("0")
        expect(page.get_by_test_id("log")).to_contain_text("device A asked for the state")
        page.get_by_test_id("see-missed-calls").click()
        for pane in (a, b):
            expect(missed(pane, DAD)).to_have_count(0)
            expect(total_missed(pane)).to_have_text("0")
        expect(page.get_by_test_id("log")).to_contain_text("device B asked for the state")
    finally:
        context.close()
    # the page runs under its Content-Security-Policy without a violation or an error
    assert problems == []


def test_badges_js_shows_exact_counts_while_changes_arrive(
    shared: RunningService, app: str, page: Page, dsn: str
) -> None:
    """A random run of reads, messages, missed calls and seen calls, some in bursts: the
    client's state (the first ``badges`` with every ``badges-change`` merged by badges.js) and
    its totals end equal to the badge queries."""
    user = str(uuid.uuid4())
    rng = random.Random(3)
    movers = list(CONTACTS)
    # senders whose messages stay unread, so that no change is larger than the whole state
    # and every event after the first is a badges-change
    steady = [str(uuid.UUID(int=0xD00 + i, version=4)) for i in range(8)]
    for sender in steady:
        message(dsn, sender, user)
    token = shared.token(user)
    connect_tab(page, app, shared, token, False)
    page.wait_for_function("window.latest && window.clientStatus.live")
    page.evaluate(
        """([url, token]) => {
            window.kinds = [];
            const source = new EventSource(`${url}?access_token=${token}`);
            for (const kind of ["badges", "badges-change"]) {
                source.addEventListener(kind, () => window.kinds.push(kind));
            }
        }""",
        [shared.url + "/v1/badges/stream", token],
    )
    page.wait_for_function("window.kinds.length === 1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(80):
            with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    person, op = rng.choice(movers), rng.random()
                    if op < 0.5:
                        conn.execute(
                            "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                            (person, user),
                        )
                    elif op < 0.7:
                        conn.execute(
                            "UPDATE messages SET read_at = now()"
                            " WHERE recipient_id = %s AND sender_id = %s",
                            (user, person),
                        )
                    elif op < 0.9:
                        conn.execute(
                            "INSERT INTO calls (caller_id, callee_id, status)"
                            " VALUES (%s, %s, 'missed')",
                            (person, user),
                        )
                    else:
                        conn.execute(
                            "UPDATE calls SET seen_at = now() WHERE callee_id = %s", (user,)
                        )
        unread_now = dict(
            conn.execute(
                "SELECT sender_id::text, count(*) FROM messages WHERE recipient_id = %s"
                " AND read_at IS NULL GROUP BY 1",
                (user,),
            ).fetchall()
        )
        calls = dict(
            conn.execute(
                "SELECT caller_id::text, count(*) FROM calls WHERE callee_id = %s"
                " AND status = 'missed' AND seen_at IS NULL GROUP BY 1",
                (user,),
            ).fetchall()
        )
    want = {
        "unread_messages": unread_now,
        "missed_calls": calls,
        "total_unread_messages": sum(unread_now.values()),
        "total_missed_calls": sum(calls.values()),
    }
    page.wait_for_function(
        """(want) => {
            const state = window.latest;
            const same = (a, b) => JSON.stringify(Object.entries(a).sort())
                === JSON.stringify(Object.entries(b).sort());
            return same(state.unread_messages, want.unread_messages)
                && same(state.missed_calls, want.missed_calls)
                && state.total_unread_messages === want.total_unread_messages
                && state.total_missed_calls === want.total_missed_calls;
        }""",
        arg=want,
    )
    kinds = page.evaluate("window.kinds")
    assert kinds[0] == "badges" and len(kinds) > 1
    assert set(kinds[1:]) == {"badges-change"}
