"""Demo data for the embedded default: a family's users and a slow trickle of changes."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import anyio
import psycopg
from psycopg_pool import PoolTimeout

from replicator.errors import BadRequest, ReplicatorError, one_line
from replicator.pg.lsn import parse_lsn

if TYPE_CHECKING:
    from replicator.runtime.monitor import Pool

logger = logging.getLogger(__name__)

DEMO_USER = "11111111-1111-4111-8111-111111111111"
#: the demo user's contacts, by id; the demo page shows these names
CONTACTS = {
    "22222222-2222-4222-8222-222222222222": "Mom",
    "33333333-3333-4333-8333-333333333333": "Dad",
    "44444444-4444-4444-8444-444444444444": "Grandma",
    "55555555-5555-4555-8555-555555555555": "Sam",
}
_LINES = (
    "are you home?",
    "dinner at 7",
    "call me back",
    "love you",
    "where are the keys?",
    "on my way",
    "did you feed the cat?",
    "👍",
)


def seed_demo(dsn: str) -> None:
    """A few unread messages and a missed call for the demo user, once."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        seeded = conn.execute(
            "SELECT 1 FROM messages WHERE recipient_id = %s LIMIT 1", (DEMO_USER,)
        ).fetchone()
        if seeded:
            return
        with conn.transaction():
            for sender, count in zip(CONTACTS, (2, 1, 0, 3), strict=True):
                for i in range(count):
                    conn.execute(
                        "INSERT INTO messages (sender_id, recipient_id, body) VALUES (%s, %s, %s)",
                        (sender, DEMO_USER, _LINES[i % len(_LINES)]),
                    )
            conn.execute(
                "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
                (next(iter(CONTACTS)), DEMO_USER),
            )
    logger.info("seeded demo data for user %s", DEMO_USER)


async def run_demo_traffic(pool: Pool, *, interval: float = 2.0, seed: int | None = None) -> None:
    """Every few seconds: a new message, a read, a missed call or a seen call for the demo user.

    Each change borrows a connection from the service's pool rather than opening one.
    """
    rng = random.Random(seed)
    while True:
        await anyio.sleep(interval * rng.uniform(0.5, 1.5))
        try:
            async with pool.connection(timeout=10) as conn:
                await _one_change(conn, rng)
        except (psycopg.Error, PoolTimeout) as exc:
            logger.debug("demo traffic paused: %s", exc)
            await anyio.sleep(5)


#: what the demo page's buttons do, each for the token's user: a message or a missed call
#: from a contact, reading a contact's messages, seeing every missed call
ACTIONS = {
    "message": (
        "INSERT INTO messages (sender_id, recipient_id, body) VALUES (%(contact)s, %(user)s,"
        " %(body)s)"
    ),
    "call": (
        "INSERT INTO calls (caller_id, callee_id, status) VALUES (%(contact)s, %(user)s, 'missed')"
    ),
    "read": (
        "UPDATE messages SET read_at = now()"
        " WHERE recipient_id = %(user)s AND sender_id = %(contact)s AND read_at IS NULL"
    ),
    "seen": "UPDATE calls SET seen_at = now() WHERE callee_id = %(user)s AND seen_at IS NULL",
}


async def _one_change(
    conn: psycopg.AsyncConnection[tuple[object, ...]], rng: random.Random
) -> None:
    """One of the demo page's ``ACTIONS``, for the demo user and a random contact."""
    contact = rng.choice(list(CONTACTS))
    action = rng.choices(["message", "read", "call", "seen"], weights=[50, 25, 15, 10])[0]
    params = {"user": DEMO_USER, "contact": contact, "body": rng.choice(_LINES)}
    await conn.execute(ACTIONS[action], params)


async def demo_action(pool: Pool, user: str, action: object, contact: object) -> int:
    """Do one of ``ACTIONS`` for ``user`` and return the WAL position after its commit, as an
    app reads it for read-your-writes (``min_lsn``)."""
    if action not in ACTIONS:
        raise BadRequest(f"action {str(action)[:40]!r} is not one of {', '.join(ACTIONS)}")
    if action != "seen" and contact not in CONTACTS:
        raise BadRequest(f"contact {str(contact)[:40]!r} is not one of the demo contacts")
    params = {"user": user, "contact": contact, "body": random.choice(_LINES)}
    try:
        async with pool.connection(timeout=10) as conn:
            await conn.execute(ACTIONS[str(action)], params)
            cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
            row = await cur.fetchone()
    except (psycopg.errors.InvalidTextRepresentation, psycopg.errors.UndefinedTable) as exc:
        raise BadRequest(
            "the demo writes to the default schema's messages and calls for uuid users;"
            f" this database or user does not fit: {one_line(exc)}"
        ) from None
    except (psycopg.Error, PoolTimeout) as exc:
        raise ReplicatorError(
            f"the database did not take the demo's write: {one_line(exc)}"
        ) from None
    assert row is not None
    return parse_lsn(str(row[0]))
