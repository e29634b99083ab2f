"""The initial state, read inside the slot's exported snapshot."""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from replicator.badges.queries import BADGE_QUERIES
from replicator.badges.state import MISSED, UNREAD, BadgeState

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]


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
