"""Read-your-writes: ``min_lsn`` on the snapshot and the stream, through a real service."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.conftest import Database, Server, create_database, drop_database
from tests.service_support import EventReader, RunningService, running_service

SENDERS = [str(uuid.UUID(int=0x5E00 + i, version=4)) for i in range(3)]


@pytest.fixture(scope="module")
def shared(pg_server: Server) -> Iterator[tuple[Database, RunningService]]:
    """One database and one service for the tests that do not break either."""
    db = create_database(pg_server)
    try:
        with running_service(db.dsn, db.slot) as service:
            yield db, service
    finally:
        drop_database(db)


def counts(conn: psycopg.Connection[tuple[object, ...]], user: str) -> tuple[dict[str, int], int]:
    """What the badge queries say now: unread messages by sender, and missed calls."""
    unread = {
        str(sender): int(n)  # type: ignore[call-overload]
        for sender, n in conn.execute(
            "SELECT sender_id, count(*) FROM messages WHERE recipient_id = %s"
            " AND read_at IS NULL GROUP BY sender_id",
            (user,),
        )
    }
    row = conn.execute(
        "SELECT count(*) FROM calls WHERE callee_id = %s AND status = 'missed' AND seen_at IS NULL",
        (user,),
    ).fetchone()
    assert row is not None
    return unread, int(row[0])  # type: ignore[call-overload]


def write(conn: psycopg.Connection[tuple[object, ...]], user: str, rng: random.Random) -> None:
    sender = rng.choice(SENDERS)
    action = rng.choice(["message", "message", "read", "call", "seen"])
    if action == "message":
        conn.execute(
            "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)", (sender, user)
        )
    elif action == "read":
        conn.execute(
            "UPDATE messages SET read_at = now() WHERE recipient_id = %s AND sender_id = %s",
            (user, sender),
        )
    elif action == "call":
        conn.execute(
            "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
            (sender, user),
        )
    else:
        conn.execute("UPDATE calls SET seen_at = now() WHERE callee_id = %s", (user,))


def current_lsn(conn: psycopg.Connection[tuple[object, ...]], function: str) -> str:
    row = conn.execute(f"SELECT {function}()::text").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return str(row[0])


def badges(service: RunningService, user: str, **params: str) -> httpx.Response:
    return httpx.get(
        service.url + "/v1/badges",
        params=params,
        headers={"Authorization": f"Bearer {service.token(user)}"},
        timeout=30,
    )


def test_min_lsn_answers_with_the_write_on_the_first_call(
    shared: tuple[Database, RunningService],
) -> None:
    """After every write, the first answer for the LSN read after the commit shows it."""
    db, service = shared
    user = str(uuid.uuid4())
    rng = random.Random(13)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for i in range(60):
            write(conn, user, rng)
            # both functions an app may call after its commit
            lsn = current_lsn(conn, "pg_current_wal_lsn" if i % 2 else "pg_current_wal_insert_lsn")
            unread, missed = counts(conn, user)
            answer = badges(service, user, min_lsn=lsn)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["unread_messages"], body["total_missed_calls"]) == (unread, missed), i


@pytest.mark.anyio
async def test_min_lsn_on_the_stream_makes_its_first_event_show_the_write(
    shared: tuple[Database, RunningService],
) -> None:
    db, service = shared
    user = str(uuid.uuid4())
    rng = random.Random(31)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for i in range(10):
            write(conn, user, rng)
            lsn = current_lsn(conn, "pg_current_wal_insert_lsn")
            unread, missed = counts(conn, user)
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream(
                    "GET",
                    service.url + "/v1/badges/stream",
                    params={"min_lsn": lsn},
                    headers={"Authorization": f"Bearer {service.token(user)}"},
                ) as response:
                    assert response.status_code == 200
                    first = await EventReader(response).next_badges()
            assert (first.data["unread_messages"], first.data["total_missed_calls"]) == (
                unread,
                missed,
            ), i


def test_an_lsn_past_the_flushed_wal_is_reached_without_waiting_for_a_flush(
    shared: tuple[Database, RunningService],
) -> None:
    """Another session's transaction in progress has written WAL that nothing flushes yet:
    the LSN read after a commit lies past what the walsender may send, and no keepalive
    brings the stream there (they carry the position sent). The service writes a flushed
    message of its own, so the answer comes within the 5 s that min_lsn waits."""
    db, service = shared
    user = str(uuid.uuid4())
    with (
        psycopg.connect(db.dsn, autocommit=True) as conn,
        psycopg.connect(db.dsn) as other,
    ):
        conn.execute("CREATE TABLE IF NOT EXISTS elsewhere (id serial PRIMARY KEY)")
        for i in range(5):
            conn.execute(
                "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                (SENDERS[0], user),
            )
            other.execute("INSERT INTO elsewhere DEFAULT VALUES")
            row = conn.execute(
                "SELECT pg_current_wal_insert_lsn()::text,"
                " pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()"
            ).fetchone()
            assert row is not None and row[1], "the other session's WAL is flushed already"
            answer = badges(service, user, min_lsn=str(row[0]))
            assert answer.status_code == 200, answer.text
            assert answer.json()["total_unread_messages"] == i + 1
            other.rollback()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yesterday", "'yesterday' is not an LSN"),
        ("0/ZZ", "is not an LSN"),
        ("-1/0", "is not an LSN"),
        ("FFFFFFFF/FFFFFFFF", "is ahead of the database's WAL"),
    ],
)
def test_an_unusable_min_lsn_is_refused_with_the_reason(
    shared: tuple[Database, RunningService], value: str, message: str
) -> None:
    _, service = shared
    answer = badges(service, str(uuid.uuid4()), min_lsn=value)
    assert answer.status_code == 400
    assert message in answer.json()["message"]


def test_min_lsn_gets_503_with_retry_after_when_replication_has_stopped(
    database: Database,
) -> None:
    user = str(uuid.uuid4())
    with running_service(database.dsn, database.slot) as service:
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            # a badge column gone: the stream stops with an error rather than count wrongly
            conn.execute("ALTER TABLE calls DROP COLUMN seen_at")
            conn.execute(
                "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
                (SENDERS[0], user),
            )
            lsn = current_lsn(conn, "pg_current_wal_lsn")
        answer = badges(service, user, min_lsn=lsn)
        assert answer.status_code == 503, answer.text
        assert int(answer.headers["retry-after"]) > 0
        assert "replication has stopped" in answer.json()["message"]
        assert "seen_at" in answer.json()["message"]
