"""The initial state, read inside the slot's exported snapshot."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg
from psycopg import sql

from replicator.badges import queries
from replicator.badges.predicate import quote_name
from replicator.badges.spec import Badge
from replicator.badges.state import BadgeState
from replicator.badges.tables import TableMap
from replicator.errors import DatabaseSetupError, one_line

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def read_initial_state(
    conn: Conn,
    snapshot: str,
    badges: Sequence[Badge],
    state: BadgeState,
    tables: TableMap | None = None,
) -> int:
    """Load the badge counts as of the exported snapshot; return the number of (user, pair) rows.

    Row security is off for the read: the stream is not filtered by it, so a snapshot that it
    would filter fails here, loudly, instead of counting less than the stream applies.
    """
    try:
        return await _read(conn, snapshot, badges, state)
    except psycopg.errors.InsufficientPrivilege as exc:
        role = conn.info.user
        if "row-level security" in str(exc) or "row security" in str(exc):
            raise DatabaseSetupError(
                f"{one_line(exc)}: the stream is not filtered by row security, so the snapshot"
                f" must not be either; run ALTER ROLE {quote_name(role)} BYPASSRLS (as a"
                " superuser), or run the service as the tables' owner"
            ) from None
        raise DatabaseSetupError(
            f"{one_line(exc)}; run GRANT SELECT ON the badge tables TO {quote_name(role)}"
        ) from None


async def _read(conn: Conn, snapshot: str, badges: Sequence[Badge], state: BadgeState) -> int:
    rows = 0
    await conn.set_autocommit(True)
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        await conn.execute("SET LOCAL row_security = off")
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
