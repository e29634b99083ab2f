"""The SSE service through a real uvicorn process: events, devices, isolation, limits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack

import anyio
import httpx
import psycopg
import pytest

from tests.conftest import Database
from tests.service_support import (
    EventReader,
    RunningService,
    open_stream,
    running_service,
    start_service,
)

pytestmark = pytest.mark.anyio

ALICE = str(uuid.UUID(int=1, version=4))
BOB = str(uuid.UUID(int=2, version=4))
CAROL = str(uuid.UUID(int=3, version=4))


@pytest.fixture
def service(database: Database) -> Iterator[RunningService]:
    with running_service(database.dsn, database.slot) as svc:
        yield svc


def sql(dsn: str, query: str, *params: object) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, params)  # type: ignore[arg-type]


async def test_events_follow_every_kind_of_change(
    database: Database, service: RunningService
) -> None:
    sql(database.dsn, "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)", BOB, ALICE)
    async with open_stream(service.url, service.token(ALICE)) as alice:
        # the insert may reach the service after the stream opened: the first state, or a
        # later one, shows it
        first = await alice.until(lambda d: d["unread_messages"] == {BOB: 1})
        assert alice.retry is not None and alice.retry > 0
        assert first.data["user_id"] == ALICE
        assert first.id == first.data["lsn"]

        sql(
            database.dsn,
            "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
            CAROL,
            ALICE,
        )
        event = await alice.next_badges()
        assert event.data["unread_messages"] == {BOB: 1, CAROL: 1}
        assert event.data["total_unread_messages"] == 2

        sql(database.dsn, "UPDATE messages SET read_at = now() WHERE sender_id = %s", BOB)
        event = await alice.next_badges()
        assert event.data["unread_messages"] == {CAROL: 1}

        sql(database.dsn, "DELETE FROM messages WHERE sender_id = %s", CAROL)
        event = await alice.next_badges()
        assert event.data["unread_messages"] == {}
        assert event.data["total_unread_messages"] == 0

        sql(
            database.dsn,
            "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
            BOB,
            ALICE,
        )
        event = await alice.next_badges()
        assert event.data["missed_calls"] == {BOB: 1}
        assert event.data["total_missed_calls"] == 1

        sql(database.dsn, "UPDATE calls SET seen_at = now() WHERE callee_id = %s", ALICE)
        event = await alice.next_badges()
        assert event.data["missed_calls"] == {}

        async with httpx.AsyncClient() as client:
            response = await client.get(
                service.url + "/v1/badges",
                headers={"Authorization": f"Bearer {service.token(ALICE)}"},
            )
        assert response.status_code == 200
        assert response.json() == event.data


async def test_two_devices_agree_and_other_users_see_nothing(
    database: Database, service: RunningService
) -> None:
    async with (
        open_stream(service.url, service.token(ALICE)) as phone,
        open_stream(service.url, service.token(ALICE), via="query") as laptop,
        open_stream(service.url, service.token(CAROL), via="cookie") as carol,
    ):
        assert (await phone.next_badges()).data == (await laptop.next_badges()).data
        carol_first = await carol.next_badges()
        assert carol_first.data["unread_messages"] == {}
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            for i in range(20):
                conn.execute(
                    "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)", (BOB, ALICE)
                )
                if i % 5 == 4:
                    conn.execute("UPDATE messages SET read_at = now() WHERE id % 3 = 0")
            cur = conn.execute(
                "SELECT count(*) FROM messages WHERE recipient_id = %s AND read_at IS NULL",
                (ALICE,),
            )
            row = cur.fetchone()
            assert row is not None
            expected = row[0]
        final_phone = await phone.until(lambda d: d["total_unread_messages"] == expected)
        final_laptop = await laptop.until(lambda d: d["total_unread_messages"] == expected)
        assert final_phone.data == final_laptop.data
        assert final_phone.id == final_laptop.id
        # Carol's stream carries nothing of Alice's: at most heartbeats until now.
        with anyio.move_on_after(1.0):
            event = await carol.next()
            raise AssertionError(f"Carol received {event}")


async def test_stream_limit_per_user_is_enforced(database: Database) -> None:
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_MAX_STREAMS_PER_USER": "2"}
    ) as service:
        async with (
            open_stream(service.url, service.token(ALICE)) as one,
            open_stream(service.url, service.token(ALICE)) as two,
        ):
            await one.next_badges()
            await two.next_badges()
            async with httpx.AsyncClient() as client:
                response = await client.get(
                    service.url + "/v1/badges/stream",
                    headers={"Authorization": f"Bearer {service.token(ALICE)}"},
                )
            assert response.status_code == 429
            assert response.json()["error"] == "too_many_streams"
        # Closed streams free their places.
        async with open_stream(service.url, service.token(ALICE)) as again:
            await again.next_badges()


async def test_heartbeat_comments_arrive_on_idle_streams(database: Database) -> None:
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_HEARTBEAT_S": "0.2"}
    ) as service:
        async with open_stream(service.url, service.token(ALICE)) as stream:
            await stream.next_badges()
            # nothing else is sent, so reading waits through heartbeats until it times out
            with anyio.fail_after(30):
                while stream.comments < 2:
                    with anyio.move_on_after(0.5):
                        await stream.next()


async def test_health_ready_and_metrics(service: RunningService) -> None:
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["live"] is True
        metrics = (await client.get("/metrics")).text
    for name in (
        "replicator_replication_lag_bytes",
        "replicator_replication_lag_seconds",
        "replicator_applied_lsn",
        "replicator_changes_applied_total",
        "replicator_transactions_applied_total",
        "replicator_events_sent_total",
        "replicator_streams_connected",
        "replicator_snapshot_duration_seconds",
    ):
        assert name in metrics


async def test_a_restart_tells_each_stream_when_to_come_back_and_with_which_ticket(
    database: Database,
) -> None:
    users = [str(uuid.uuid4()) for _ in range(6)]
    # six streams at ten a second: told to come back over 0.6 s, from 1 s on
    service = start_service(database.dsn, database.slot, env={"REPLICATOR_RECONNECT_RATE": "10"})
    told: dict[str, dict[str, object]] = {}

    async def last_event(user: str, stream: EventReader) -> None:
        event = await stream.next()
        while event.event != "reconnect":
            event = await stream.next()
        told[user] = event.data
        assert stream.retry == event.data["retry_ms"]  # for a plain EventSource too
        with pytest.raises(AssertionError, match="stream ended"):
            await stream.next()

    try:
        async with AsyncExitStack() as streams:
            readers = [
                await streams.enter_async_context(open_stream(service.url, service.token(u)))
                for u in users
            ]
            for reader in readers:
                await reader.next_badges()
            async with anyio.create_task_group() as tg:
                for user, reader in zip(users, readers, strict=True):
                    tg.start_soon(last_event, user, reader)
                await anyio.to_thread.run_sync(service.stop)
    finally:
        service.stop()
    assert set(told) == set(users)
    for data in told.values():
        assert data["reason"] == "shutdown"
        assert isinstance(data["retry_ms"], int) and 1000 <= data["retry_ms"] <= 1600
        assert isinstance(data["ticket"], str)

    # While the service is down, a message; the instance that answers next shares the secret.
    sql(
        database.dsn,
        "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
        BOB,
        users[0],
    )
    with running_service(database.dsn, database.slot) as again:
        ticket = str(told[users[0]]["ticket"])
        # the ticket alone opens the user's stream: one request, no token
        async with open_stream(again.url, None, params={"ticket": ticket}) as back:
            state = await back.until(lambda d: d["unread_messages"] == {BOB: 1})
            assert state.data["user_id"] == users[0]
        with pytest.raises(AssertionError, match="401"):
            async with open_stream(again.url, None, params={"ticket": ticket}):
                pass  # each ticket works once
        async with open_stream(
            again.url, None, params={"ticket": str(told[users[1]]["ticket"])}
        ) as other:
            assert (await other.next_badges()).data["user_id"] == users[1]
