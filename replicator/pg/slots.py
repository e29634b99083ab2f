"""Slots and publications, on an ordinary connection: checks, leftover slots, dropping."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
import psycopg

from replicator.errors import DatabaseSetupError, SlotInUseError, SlotMissing
from replicator.pg.lsn import format_lsn, parse_lsn

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]

#: the server's WAL position as SQL: its current one, or on a standby its replay position
WAL_POSITION = (
    "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END"
)


def _quote(name: str) -> str:
    return (
        name
        if name.isidentifier() and name == name.lower()
        else '"' + name.replace('"', '""') + '"'
    )


def _name(key: tuple[str, str]) -> str:
    return f"{_quote(key[0])}.{_quote(key[1])}"


async def check_publication(
    conn: Conn,
    publication: str,
    tables: list[tuple[str, str]],
    leaves: list[tuple[str, str]] | None = None,
    *,
    partitioned: bool = False,
) -> None:
    """Fail with a fix-it message unless the publication streams every row of ``tables``.

    ``leaves`` are the relations the rows live in (the tables themselves, or their
    partitions): each must be published, whole (no row filter), with every operation.
    """
    names = ", ".join(_name(table) for table in tables)
    pub = _quote(publication)
    version = conn.info.server_version
    cur = await conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate,"
        + (" pubviaroot" if version >= 130000 else " false")
        + " FROM pg_publication WHERE pubname = %s",
        (publication,),
    )
    row = await cur.fetchone()
    if row is None:
        raise DatabaseSetupError(
            f"publication {publication!r} does not exist; run `replicator migrate`"
            f" or CREATE PUBLICATION {pub} FOR TABLE {names}"
        )
    if not all(row[:4]):
        raise DatabaseSetupError(
            f"publication {publication!r} does not publish every operation;"
            f" run ALTER PUBLICATION {pub} SET (publish = 'insert, update, delete, truncate')"
        )
    if row[4] and partitioned:
        raise DatabaseSetupError(
            f"publication {publication!r} publishes partitions as their root, which hides a"
            " TRUNCATE of one partition from the stream; run ALTER PUBLICATION"
            f" {pub} SET (publish_via_partition_root = false)"
        )
    filtered = ", rowfilter IS NOT NULL" if version >= 150000 else ", false"
    cur = await conn.execute(
        f"SELECT schemaname, tablename{filtered} FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    )
    published = {(str(r[0]), str(r[1])): bool(r[2]) for r in await cur.fetchall()}
    wanted = tables if leaves is None else leaves
    missing = [_name(key) for key in wanted if key not in published]
    if missing:
        lacking = ", ".join(missing)
        add = ", ".join(_name(t) for t in tables if leaves is None or t not in published)
        raise DatabaseSetupError(
            f"publication {publication!r} lacks {lacking};"
            f" run ALTER PUBLICATION {pub} ADD TABLE {add or lacking}"
        )
    rows_filtered = [_name(key) for key in wanted if published.get(key)]
    if rows_filtered:
        raise DatabaseSetupError(
            f"publication {publication!r} filters the rows of {', '.join(rows_filtered)},"
            " which the snapshot would count; run ALTER PUBLICATION"
            f" {pub} SET TABLE {names} (with no WHERE)"
        )
    cur = await conn.execute("SHOW wal_level")
    level = await cur.fetchone()
    if level is None or level[0] != "logical":
        raise DatabaseSetupError(
            f"wal_level is {level[0] if level else '?'!r}, logical replication needs 'logical';"
            " set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )


@dataclass(frozen=True)
class SlotState:
    """What ``pg_replication_slots`` says of a slot."""

    database: str | None
    plugin: str | None
    active: bool
    active_pid: int | None
    confirmed_flush: int | None
    #: why the server will not stream from it any more, or None
    invalid: str | None


async def slot_state(conn: Conn, slot: str) -> SlotState | None:
    version = conn.info.server_version
    conflicting = "conflicting" if version >= 160000 else "NULL::bool"
    reason = "invalidation_reason" if version >= 170000 else "NULL::text"
    cur = await conn.execute(
        "SELECT database, plugin, active, active_pid, confirmed_flush_lsn::text, wal_status,"
        f" {conflicting}, {reason} FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    database, plugin, active, pid, confirmed, wal_status, conflict, why = row
    invalid = None
    if why:
        invalid = f"invalidated: {why}"
    elif conflict:
        invalid = "invalidated by a conflict with recovery"
    elif wal_status == "lost":
        invalid = "invalidated: the WAL it needs is gone (max_slot_wal_keep_size)"
    return SlotState(
        None if database is None else str(database),
        None if plugin is None else str(plugin),
        bool(active),
        None if pid is None else int(pid),  # type: ignore[call-overload]
        None if confirmed is None else parse_lsn(str(confirmed)),
        invalid,
    )


def refuse_foreign(slot: str, state: SlotState, *, database: str, plugin: str) -> None:
    """A slot of our name made for another database or plugin is never ours to drop."""
    if state.database != database or state.plugin != plugin:
        raise DatabaseSetupError(
            f"replication slot {slot!r} exists for database {state.database!r} with plugin"
            f" {state.plugin!r}, not {database!r} with {plugin!r}; it is not this service's:"
            " set REPLICATOR_SLOT to another name"
        )


async def check_resumable(
    conn: Conn, slot: str, *, database: str, plugin: str, confirmed: int
) -> None:
    """Before streaming again from our slot: raise ``SlotMissing`` (after dropping what is
    ours and dead) when streaming from it would skip changes or cannot work any more.

    ``confirmed`` is the most we may have confirmed: a slot already past it was recreated or
    streamed from by someone else, and the server would silently start where they left off.
    """
    state = await slot_state(conn, slot)
    if state is None:
        raise SlotMissing(f"replication slot {slot!r} is gone")
    refuse_foreign(slot, state, database=database, plugin=plugin)
    if state.invalid is not None:
        if not state.active:
            await _drop_when_released(conn, slot, 0)
        raise SlotMissing(f"replication slot {slot!r} was {state.invalid}")
    if state.confirmed_flush is not None and state.confirmed_flush > confirmed and not state.active:
        await _drop_when_released(conn, slot, 0)
        raise SlotMissing(
            f"replication slot {slot!r} is at {format_lsn(state.confirmed_flush)}, past what"
            f" this service applied ({format_lsn(confirmed)}): it was recreated or used by"
            " another process"
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


async def clear_leftover_slot(
    conn: Conn,
    slot: str,
    *,
    database: str | None = None,
    plugin: str | None = None,
    wait: float = 5.0,
) -> bool:
    """Drop our slot if a previous run left it inactive; refuse if someone streams from it,
    or if it was made for another database or plugin.

    A killed predecessor's walsender lets go of the slot as soon as it sees the socket close,
    so an active slot gets ``wait`` seconds before it counts as another instance's.
    """
    if database is not None and plugin is not None:
        state = await slot_state(conn, slot)
        if state is not None:
            refuse_foreign(slot, state, database=database, plugin=plugin)
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


async def reclaim_dead_slots(
    conn: Conn,
    *,
    prefix: str,
    own: str,
    plugin: str,
    grace: float,
    seen: dict[str, float],
) -> list[str]:
    """Drop the slots of instances that died: ``<prefix>_<id>`` slots of this database and
    plugin, not ``own``, inactive for ``grace`` seconds. PostgreSQL 17 and later say since when
    (``inactive_since``); before, ``seen`` keeps when this instance first saw each one idle,
    so a live instance that is only reconnecting (idle for seconds) is never taken for dead.
    """
    since = "extract(epoch FROM now() - inactive_since)::float8"
    idle = since if conn.info.server_version >= 170000 else "NULL::float8"
    cur = await conn.execute(
        f"SELECT slot_name, active, {idle} FROM pg_replication_slots"
        " WHERE database = current_database() AND slot_type = 'logical' AND plugin = %s"
        " AND slot_name ~ %s AND slot_name <> %s",
        (plugin, f"^{prefix}_[a-z0-9]+$", own),
    )
    rows = await cur.fetchall()
    now = time.monotonic()
    for name in set(seen) - {str(r[0]) for r in rows}:
        del seen[name]
    dropped = []
    for row_name, active, idle_s in rows:
        name = str(row_name)
        if active:
            seen.pop(name, None)
            continue
        first = seen.setdefault(name, now)
        idle_for = float(idle_s) if idle_s is not None else now - first  # type: ignore[arg-type]
        if idle_for < grace:
            continue
        try:
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
            continue  # it came back, or another instance was first
        seen.pop(name, None)
        dropped.append(name)
        logger.warning(
            "dropped replication slot %r: its instance has been gone for %.0f s", name, idle_for
        )
    return dropped


async def is_standby(conn: Conn) -> bool:
    cur = await conn.execute("SELECT pg_is_in_recovery()")
    row = await cur.fetchone()
    return bool(row and row[0])
