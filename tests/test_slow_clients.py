"""A client that stops reading costs one pending state, never memory growth or others' events."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest

from tests.conftest import Database
from tests.service_support import open_stream, running_service, stalled_stream

pytestmark = pytest.mark.anyio

ALICE = str(uuid.UUID(int=21, version=4))
BOB = str(uuid.UUID(int=22, version=4))
CHANGES = 10_000


def commit_each(conn: psycopg.Connection[Any], sender: str, recipient: str, count: int) -> None:
    """``count`` messages, each in a transaction of its own (so each is one event)."""
    conn.execute(
        "DO $$ BEGIN FOR i IN 1.."  # type: ignore[arg-type]
        + str(count)
        + f" LOOP INSERT INTO messages (sender_id, recipient_id, body) VALUES ({sender},"
        f" '{recipient}', repeat('x', 200)); COMMIT; END LOOP; END $$"
    )


@pytest.mark.slow
async def test_client_that_never_reads_does_not_hold_back_others(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        stalled = [stalled_stream(service.url, service.token(ALICE)) for _ in range(3)]
        try:
            async with (
                open_stream(service.url, service.token(ALICE)) as alice,
                open_stream(service.url, service.token(BOB)) as bob,
            ):
                await alice.next_badges()
                await bob.next_badges()
                before = service.metrics()
                assert before["replicator_streams_connected"] == 5
                with psycopg.connect(database.dsn, autocommit=True) as conn:
                    commit_each(conn, f"'{BOB}'", ALICE, CHANGES)
                    conn.execute(
                        "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                        (ALICE, BOB),
                    )
                final = await alice.until(
                    lambda d: d["total_unread_messages"] == CHANGES, timeout=120
                )
                assert final.data["unread_messages"] == {BOB: CHANGES}
                await bob.until(lambda d: d["unread_messages"] == {ALICE: 1})
                after = service.metrics()
                grown = (
                    after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
                )
                # 10,000 events of ~400 bytes for each stalled stream would be 12 MB if they
                # queued; a latest-state slot keeps it to socket buffers.
                assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
                assert (
                    after["replicator_events_published_total"]
                    >= before["replicator_events_published_total"] + 1
                )
        finally:
            for sock in stalled:
                sock.close()
        # The stalled streams go away with their sockets: nothing leaks.
        with anyio.fail_after(30):
            while service.metrics()["replicator_streams_connected"] != 0:
                await anyio.sleep(0.1)


async def test_stream_blocked_past_the_send_timeout_is_closed(database: Database) -> None:
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_SEND_TIMEOUT_S": "1"}
    ) as service:
        # whole states, so that each event is larger than the last
        stalled = stalled_stream(service.url, service.token(ALICE), "events=full")
        try:
            async with open_stream(service.url, service.token(BOB)) as bob:
                await bob.next_badges()
                with anyio.fail_after(60):
                    while service.metrics()["replicator_streams_connected"] != 2:
                        await anyio.sleep(0.05)
                with psycopg.connect(database.dsn, autocommit=True) as conn:
                    # a new sender each time: Alice's state, and so each event, keeps growing
                    commit_each(conn, "gen_random_uuid()", ALICE, 2000)
                blocked_seen = False
                with anyio.fail_after(60):
                    while True:
                        metrics = service.metrics()
                        blocked_seen |= metrics["replicator_streams_blocked"] >= 1
                        if metrics["replicator_streams_connected"] == 1:
                            break
                        await anyio.sleep(0.05)
                assert blocked_seen
                # Bob's stream, the one that reads, is still there and still served
                with psycopg.connect(database.dsn, autocommit=True) as conn:
                    conn.execute(
                        "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                        (ALICE, BOB),
                    )
                await bob.until(lambda d: d["unread_messages"] == {ALICE: 1})
        finally:
            stalled.close()
    assert "the client stopped reading" in service.log
