"""The initial state, read inside the slot's exported snapshot."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg
from psycopg import sql

from replicator.badges import queries
from replicator.badges.spec import Badge
from replicator.badges.state import BadgeState

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def read_initial_state(
    conn: Conn, snapshot: str, badges: Sequence[Badge], state: BadgeState
) -> int:
    """Load the badge counts as of the exported snapshot; return the number of (user, pair) rows."""
    rows = 0
    await conn.set_autocommit(True)
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        for badge in badges:
            batch: list[tuple[str, str, int]] = []
            async for user, counterpart, count in conn.cursor().stream(queries.counts(badge)):
                batch.append((str(user), str(counterpart), int(count)))  # type: ignore[call-overload]
                if len(batch) >= 10_000:
                    state.load(badge.index, batch)
                    rows += len(batch)
                    batch = []
            state.load(badge.index, batch)
            rows += len(batch)
    finally:
        await conn.execute("COMMIT")
    return rows
