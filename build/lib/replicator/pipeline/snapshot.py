"""Start-up reads on an ordinary connection: prerequisites, slot housekeeping, the initial state."""

from __future__ import annotations

import logging
import time

import anyio
import psycopg
from psycopg import sql

from replicator.badges.state import BADGE_QUERIES, MISSED, UNREAD, BadgeState
from replicator.errors import DatabaseSetupError, SlotInUseError

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def check_publication(conn: Conn, publication: str, schema: str) -> None:
    """Fail with a fix-it message unless the publication exists and holds both tables."""
    cur = await conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = %s",
        (publication,),
    )
    row = await cur.fetchone()
    if row is None:
        raise DatabaseSetupError(
            f"publication {publication!r} does not exist; run `replicator migrate`"
            f" or CREATE PUBLICATION {publication} FOR TABLE {schema}.messages, {schema}.calls"
        )
    if not all(row):
        raise DatabaseSetupError(
            f"publication {publication!r} does not publish every operation;"
            f" run ALTER PUBLICATION {publication}"
            " SET (publish = 'insert, update, delete, truncate')"
        )
    cur = await conn.execute(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s",
        (publication, schema),
    )
    tables = {str(r[0]) for r in await cur.fetchall()}
    missing = sorted({"messages", "calls"} - tables)
    if missing:
        names = ", ".join(f"{schema}.{t}" for t in missing)
        raise DatabaseSetupError(
            f"publication {publication!r} lacks {names};"
            f" run ALTER PUBLICATION {publication} ADD TABLE {names}"
        )
    cur = await conn.execute("SHOW wal_level")
    level = await cur.fetchone()
    if level is None or level[0] != "logical":
        raise DatabaseSetupError(
            f"wal_level is {level[0] if level else '?'!r}, logical replication needs 'logical';"
            " set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )


async def _drop_when_released(conn: Conn, slot: str, wait: float) -> bool:
    """Drop the slot as soon as no walsender holds it; False if there is no such slot.

    Raises ``SlotInUseError``, naming the walsender, if the slot is still held after ``wait``
    seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        cur = await conn.execute(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        row = await cur.fetchone()
        if row is None:
            return False
        active, pid = row
        if not active:
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return True
            except psycopg.errors.UndefinedObject:
                return False
            except psycopg.errors.ObjectInUse:
                pass  # taken again between the look and the drop
        elif time.monotonic() >= deadline:
            raise SlotInUseError(
                f"replication slot {slot!r} is in use by another process (walsender pid {pid});"
                " is another replicator running? set REPLICATOR_SLOT to another name"
            )
        await anyio.sleep(0.1)


async def clear_leftover_slot(conn: Conn, slot: str, *, wait: float = 5.0) -> bool:
    """Drop our slot if a previous run left it inactive; refuse if someone streams from it.

    A killed predecessor's walsender lets go of the slot as soon as it sees the socket close,
    so an active slot gets ``wait`` seconds before it counts as another instance's.
    """
    dropped = await _drop_when_released(conn, slot, wait)
    if dropped:
        logger.info("dropped leftover replication slot %r from an earlier run", slot)
    return dropped


async def drop_slot(conn: Conn, slot: str, *, wait: float = 5.0) -> bool:
    """Drop our slot once its walsender has let go of it; False if it stayed busy."""
    try:
        await _drop_when_released(conn, slot, wait)
    except SlotInUseError:
        return False
    return True


async def read_initial_state(conn: Conn, snapshot: str, schema: str, state: BadgeState) -> int:
    """Load the badge counts as of the exported snapshot; return the number of (user, pair) rows."""
    rows = 0
    await conn.set_autocommit(True)
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        for badge in (UNREAD, MISSED):
            query = sql.SQL(BADGE_QUERIES[badge]).format(schema=sql.Identifier(schema))
            batch: list[tuple[str, str, int]] = []
            async for user, counterpart, count in conn.cursor().stream(query):
                batch.append((str(user), str(counterpart), int(count)))  # type: ignore[call-overload]
                if len(batch) >= 10_000:
                    state.load(badge, batch)
                    rows += len(batch)
                    batch = []
            state.load(badge, batch)
            rows += len(batch)
    finally:
        await conn.execute("COMMIT")
    return rows
