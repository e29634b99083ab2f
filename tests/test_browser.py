"""The demo page and badges.js in a real headless Chromium, against a real service process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
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
