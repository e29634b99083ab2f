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
from urllib.parse import urlsplit

import psycopg
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from replicator.ops.demo import CONTACTS, DEMO_USER
from tests.conftest import Database
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
    page.goto(f"{service.url}/#access_token={service.token(user)}", wait_until="domcontentloaded")
    return page.locator("#app")


def unread(page: Page, sender: str) -> Locator:
    return page.locator(f'li[data-sender="{sender}"]')


def missed(page: Page, caller: str) -> Locator:
    return page.locator(f'li[data-caller="{caller}"]')


def total_unread(page: Page) -> Locator:
    return page.get_by_test_id("total-unread")


def total_missed(page: Page) -> Locator:
    return page.get_by_test_id("total-missed")


def test_page_follows_changes_and_recovers_after_a_restart(database: Database, page: Page) -> None:
    dsn = database.dsn
    service = start_service(dsn, database.slot)
    try:
        app = open_demo(page, service)
        expect(app).to_have_attribute("data-state", "live")
        expect(total_unread(page)).to_have_text("0")
        expect(page.get_by_test_id("unread-list")).to_have_text("No unread messages")

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
        assert service.stop() == 0
        expect(app).to_have_attribute("data-state", "stale")
        expect(page.get_by_test_id("stale-notice")).to_be_visible()
        expect(page.get_by_test_id("status")).to_have_text("Reconnecting…")

        # While the service is down: new messages, a read, seen calls.
        message(dsn, GRANDMA)
        message(dsn, GRANDMA)
        sql(dsn, "UPDATE messages SET read_at = now() WHERE sender_id = %s", STRANGER)
        sql(dsn, "UPDATE calls SET seen_at = now() WHERE callee_id = %s", DEMO_USER)

        service = start_service(dsn, database.slot, env={"REPLICATOR_PORT": port})
        expect(app).to_have_attribute("data-state", "live")
        expect(unread(page, GRANDMA).locator(".count")).to_have_text("2")
        expect(unread(page, STRANGER)).to_have_count(0)
        expect(total_unread(page)).to_have_text("2")
        expect(page.locator("li[data-caller]")).to_have_count(0)
        expect(total_missed(page)).to_have_text("0")
        expect(page.get_by_test_id("stale-notice")).to_be_hidden()
        assert page.evaluate("window.sameDocument") is True
    finally:
        service.stop()


def test_page_marks_counts_stale_while_replication_is_down(database: Database, page: Page) -> None:
    dsn = database.dsn
    with running_service(dsn, database.slot) as service:
        message(dsn, DAD)
        app = open_demo(page, service)
        expect(unread(page, DAD).locator(".count")).to_have_text("1")
        expect(app).to_have_attribute("data-state", "live")
        # Every state the page passes through, however briefly.
        page.evaluate(
            """() => {
                const app = document.getElementById("app");
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
    with running_service(database.dsn, database.slot) as service:
        # The client trades the token for a stream ticket first: that is the one request.
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/v1/badges" in r.url else None)
        expired = service.token(DEMO_USER, ttl=-60)
        page.goto(f"{service.url}/#access_token={expired}", wait_until="domcontentloaded")
        app = page.locator("#app")
        expect(app).to_have_attribute("data-state", "unauthorized")
        expect(page.get_by_test_id("auth-notice")).to_be_visible()
        expect(page.get_by_test_id("status")).to_have_text("Signed out")
        # Longer than the client's first reconnect delay: no second attempt comes.
        page.wait_for_timeout(2500)
        assert [urlsplit(url).path for url in streams] == ["/v1/badges/ticket"]

        page.goto(f"{service.url}/", wait_until="domcontentloaded")
        expect(app).to_have_attribute("data-state", "unauthorized")


def test_client_loads_as_a_module_and_takes_a_token_function(
    database: Database, page: Page
) -> None:
    with running_service(database.dsn, database.slot) as service:
        message(database.dsn, DAD)
        page.goto(f"{service.url}/healthz")
        result = page.evaluate(
            """async (token) => {
                await import("/badges.js");
                return await new Promise((resolve) => {
                    const client = globalThis.ReplicatorBadges.connect("/v1/badges/stream", {
                        token: async () => token,
                        onChange(state, status) {
                            client.close();
                            resolve({ state, status });
                        },
                    });
                });
            }""",
            service.token(DEMO_USER),
        )
    assert result["state"]["user_id"] == DEMO_USER
    assert result["state"]["unread_messages"] == {DAD: 1}
    assert result["status"] == {"connected": True, "live": True, "lagMs": 0, "error": None}


def test_expiring_tokens_are_refreshed_and_no_change_is_lost(
    database: Database, page: Page
) -> None:
    """5-second tokens: at each expiry the stream says reauthenticate, the client asks its
    token() for a new one and reconnects at once; every change still shows."""
    dsn = database.dsn
    with running_service(dsn, database.slot) as service:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/v1/badges" in r.url else None)
        page.expose_function("mintToken", lambda: service.token(DEMO_USER, ttl=5))
        page.goto(f"{service.url}/healthz")
        page.evaluate(
            """async () => {
                await import("/badges.js");
                window.tokens = 0;
                window.client = globalThis.ReplicatorBadges.connect({
                    token: async () => { window.tokens += 1; return await window.mintToken(); },
                    onChange(state, status) {
                        window.latest = state;
                        window.clientStatus = status;
                    },
                });
            }"""
        )
        for round_ in range(1, 5):
            # a new token means the last one expired and its stream was ended
            page.wait_for_function(f"window.tokens >= {round_ + 1}")
            message(dsn, DAD)
            page.wait_for_function(
                f"window.latest && window.latest.unread_messages[{DAD!r}] === {round_}"
            )
        status = page.evaluate("window.clientStatus")
        assert status["error"] is None and status["live"] is True
        page.evaluate("window.client.close()")
    streams = [url for url in requests if "/stream" in url]
    assert len(streams) >= 5
    assert all("ticket=" in url and "access_token" not in url for url in streams)


def test_a_fixed_token_stops_with_token_expired(database: Database, page: Page) -> None:
    with running_service(database.dsn, database.slot) as service:
        tickets: list[str] = []
        page.on("request", lambda r: tickets.append(r.url) if "/ticket" in r.url else None)
        token = service.token(DEMO_USER, ttl=3)
        page.goto(f"{service.url}/#access_token={token}", wait_until="domcontentloaded")
        app = page.locator("#app")
        expect(app).to_have_attribute("data-state", "live")
        expect(app).to_have_attribute("data-state", "unauthorized")
        expect(page.get_by_test_id("auth-reason")).to_have_text("The token has expired.")
        assert page.evaluate("window.badges.status.error") == "token expired"
        assert len(tickets) == 1


class _AppPage(BaseHTTPRequestHandler):
    """An app's page on its own origin; its scripts come from the service."""

    def do_GET(self) -> None:
        body = b"<!doctype html><meta charset=utf-8><title>app</title><p>app"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
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


def test_badges_js_shows_exact_counts_while_changes_arrive(database: Database, page: Page) -> None:
    """A random run of reads, messages, missed calls and seen calls, some in bursts: the page's
    state (the first ``badges`` with every ``badges-change`` merged by badges.js) and its
    totals end equal to the badge queries."""
    dsn = database.dsn
    rng = random.Random(3)
    movers = list(CONTACTS)
    # senders whose messages stay unread, so that no change is larger than the whole state
    # and every event after the first is a badges-change
    steady = [str(uuid.UUID(int=0xD00 + i, version=4)) for i in range(8)]
    for sender in steady:
        message(dsn, sender)
    with running_service(dsn, database.slot) as service:
        open_demo(page, service)
        page.wait_for_function("window.badges && window.badges.state")
        page.evaluate(
            """(token) => {
                window.kinds = [];
                const source = new EventSource(`/v1/badges/stream?access_token=${token}`);
                for (const kind of ["badges", "badges-change"]) {
                    source.addEventListener(kind, () => window.kinds.push(kind));
                }
            }""",
            service.token(DEMO_USER),
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
                                (person, DEMO_USER),
                            )
                        elif op < 0.7:
                            conn.execute(
                                "UPDATE messages SET read_at = now()"
                                " WHERE recipient_id = %s AND sender_id = %s",
                                (DEMO_USER, person),
                            )
                        elif op < 0.9:
                            conn.execute(
                                "INSERT INTO calls (caller_id, callee_id, status)"
                                " VALUES (%s, %s, 'missed')",
                                (person, DEMO_USER),
                            )
                        else:
                            conn.execute(
                                "UPDATE calls SET seen_at = now() WHERE callee_id = %s",
                                (DEMO_USER,),
                            )
            unread_now = dict(
                conn.execute(
                    "SELECT sender_id::text, count(*) FROM messages WHERE recipient_id = %s"
                    " AND read_at IS NULL GROUP BY 1",
                    (DEMO_USER,),
                ).fetchall()
            )
            calls = dict(
                conn.execute(
                    "SELECT caller_id::text, count(*) FROM calls WHERE callee_id = %s"
                    " AND status = 'missed' AND seen_at IS NULL GROUP BY 1",
                    (DEMO_USER,),
                ).fetchall()
            )
        want = {"unread_messages": unread_now, "missed_calls": calls}
        page.wait_for_function(
            """(want) => {
                const state = window.badges.state;
                const same = (a, b) => JSON.stringify(Object.entries(a).sort())
                    === JSON.stringify(Object.entries(b).sort());
                return same(state.unread_messages, want.unread_messages)
                    && same(state.missed_calls, want.missed_calls);
            }""",
            arg=want,
        )
        expect(total_unread(page)).to_have_text(str(sum(unread_now.values())))
        expect(total_missed(page)).to_have_text(str(sum(calls.values())))
        for sender, count in unread_now.items():
            expect(unread(page, sender).locator(".count")).to_have_text(str(count))
        kinds = page.evaluate("window.kinds")
        assert kinds[0] == "badges" and len(kinds) > 1
        assert set(kinds[1:]) == {"badges-change"}
