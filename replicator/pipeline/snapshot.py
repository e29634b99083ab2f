"""The initial state, read inside the slot's exported snapshot.

At a million users the snapshot is most of start-up, so it is read the cheap way: binary
results in chunks (the server sends while we build), uuids kept as their 16 bytes (the
state's compact form, with no text in between), and a ``work_mem`` for this transaction
only when the planned aggregate would spill to disk. Progress is logged while it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import ByteaBinaryLoader

from replicator.badges import queries
from replicator.badges.predicate import quote_name
from replicator.badges.spec import Badge
from replicator.badges.state import BadgeState
from replicator.badges.tables import TableMap
from replicator.errors import DatabaseSetupError, one_line

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]

#: rows per chunk from the server, and per hand-over to the state
CHUNK_ROWS = 20_000
#: seconds between progress lines
PROGRESS_S = 2.0
#: the most work_mem a snapshot asks for, whatever the plan estimates
MAX_WORK_MEM_KB = 1024 * 1024


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
    # uuids as their 16 bytes: what the state keeps, without building uuid objects or text
    conn.adapters.register_loader("uuid", ByteaBinaryLoader)
    await conn.set_autocommit(True)
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        await conn.execute("SET LOCAL row_security = off")
        started = last_log = time.monotonic()
        for badge in badges:
            query = queries.counts(badge, as_text=False)
            await _enough_memory(conn, badge, query)
            batch: list[Any] = []
            append = batch.append
            async for row in conn.cursor(binary=True).stream(query, size=CHUNK_ROWS):
                append(row)
                if len(batch) >= CHUNK_ROWS:
                    state.load(badge.index, batch)
                    rows += len(batch)
                    batch.clear()
                    now = time.monotonic()
                    if now - last_log >= PROGRESS_S:
                        last_log = now
                        logger.info(
                            "snapshot: %d rows read (%s), %d users, %.0f rows/s",
                            rows,
                            badge.name,
                            len(state),
                            rows / (now - started),
                        )
            state.load(badge.index, batch)
            rows += len(batch)
    finally:
        await conn.execute("COMMIT")
    release_memory()
    return rows


def release_memory() -> None:
    """Hand the memory the snapshot's rows and buffers took back to the system.

    Rows are freed as they are loaded, but the C heap keeps what it freed unless asked."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim(0)


async def _enough_memory(conn: Conn, badge: Badge, query: sql.Composable) -> None:
    """Give the aggregate the memory it is planned to need, when it would spill without it.

    A plan that streams groups from the badge's index needs none, and a larger work_mem could
    trade it for a hash aggregate: so only a plan that would spill gets more."""
    cur = await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(query))
    found = await cur.fetchone()
    assert found is not None
    plan = found[0][0]["Plan"]  # type: ignore[index]
    cur = await conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'work_mem'")
    setting = await cur.fetchone()
    assert setting is not None
    work_mem_kb = int(setting[0])  # type: ignore[call-overload]
    needed = _spilling_kb(plan, work_mem_kb)
    if needed is None:
        return
    grant = min(MAX_WORK_MEM_KB, needed)
    logger.info(
        "snapshot of %s: the planned aggregate would spill past work_mem (%d kB); using %d kB",
        badge.name,
        work_mem_kb,
        grant,
    )
    await conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(f"{grant}kB")))


def _spilling_kb(plan: dict[str, Any], work_mem_kb: int) -> int | None:
    """kB a hash aggregate or sort in ``plan`` needs in memory, when more than work_mem."""
    needed = 0
    kind = plan.get("Node Type")
    if kind == "Sort" or (kind == "Aggregate" and plan.get("Strategy") == "Hashed"):
        # rows times their width plus per-entry overhead, with room for the estimate's error
        estimate = int(plan.get("Plan Rows", 0)) * (int(plan.get("Plan Width", 0)) + 64) * 2
        if estimate // 1024 > work_mem_kb or plan.get("Planned Partitions", 0):
            needed = estimate // 1024 + 1
    for child in plan.get("Plans", ()):
        more = _spilling_kb(child, work_mem_kb)
        if more is not None:
            needed = max(needed, more)
    return needed or None
