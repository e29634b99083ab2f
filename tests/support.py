"""Shared test helpers: run a consumer, wait until it caught up, compare with the badge SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import psycopg

from replicator.badges import predicate, queries
from replicator.badges import spec as badge_spec
from replicator.badges.applier import Applier
from replicator.badges.catalog import bind_async
from replicator.badges.spec import Badge, BadgeSpec, Table
from replicator.badges.state import BadgeState
from replicator.errors import ReplicatorError
from replicator.pg.lsn import parse_lsn
from replicator.pipeline.consumer import Consumer, ConsumerOptions


def slot_env(slot: str) -> dict[str, str]:
    """The settings that make ``replicator serve`` stream from exactly ``slot``: the prefix
    (REPLICATOR_SLOT) and this instance's id, instead of one derived from host and port."""
    prefix, _, instance = slot.rpartition("_")
    if not prefix:
        # a bare prefix: the instance's id is derived, as in a deployment
        return {"REPLICATOR_SLOT": slot}
    return {"REPLICATOR_SLOT": prefix, "REPLICATOR_INSTANCE": instance}


#: user -> one {counterpart: count} per badge, in file order
Counts = dict[str, tuple[dict[str, int], ...]]

DEFAULT_SPECS = badge_spec.load(None)
UNREAD, MISSED = 0, 1


def _column(type_name: str, kind: str, oid: int) -> predicate.Column:
    return predicate.Column(type_name, kind, oid)


#: the default schema's tables as the catalog describes them
DEFAULT_TABLES = {
    ("public", "messages"): Table(
        "r",
        "f",
        {
            "id": _column("bigint", predicate.INTEGER, 20),
            "sender_id": _column("uuid", predicate.UUID, 2950),
            "recipient_id": _column("uuid", predicate.UUID, 2950),
            "body": _column("text", predicate.TEXT, 25),
            "created_at": _column("timestamp with time zone", predicate.OTHER, 1184),
            "read_at": _column("timestamp with time zone", predicate.OTHER, 1184),
        },
    ),
    ("public", "calls"): Table(
        "r",
        "f",
        {
            "id": _column("bigint", predicate.INTEGER, 20),
            "caller_id": _column("uuid", predicate.UUID, 2950),
            "callee_id": _column("uuid", predicate.UUID, 2950),
            "status": _column("text", predicate.TEXT, 25),
            "created_at": _column("timestamp with time zone", predicate.OTHER, 1184),
            "seen_at": _column("timestamp with time zone", predicate.OTHER, 1184),
        },
    ),
}


def default_badges(schema: str = "public") -> list[Badge]:
    """The default badges bound to the default schema's types, without a database."""
    specs = badge_spec.load(None, schema=schema)
    tables = {(schema, table): info for (_, table), info in DEFAULT_TABLES.items()}
    return badge_spec.bind(specs, tables)


def empty_state(specs: list[BadgeSpec] | list[Badge]) -> BadgeState:
    found = [s.spec if isinstance(s, Badge) else s for s in specs]
    return BadgeState([s.name for s in found], [s.counterpart is not None for s in found])


def default_applier(schema: str = "public") -> Applier:
    badges = default_badges(schema)
    return Applier(empty_state(badges), badges)


async def database_counts(dsn: str, specs: list[BadgeSpec] | None = None) -> Counts:
    """What the badge queries return now: user -> one map per badge."""
    specs = DEFAULT_SPECS if specs is None else specs
    counts: Counts = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for badge in await bind_async(conn, specs):
            cur = await conn.execute(queries.counts(badge))
            for user, counterpart, count in await cur.fetchall():
                held = counts.setdefault(str(user), tuple({} for _ in specs))
                held[badge.index][str(counterpart)] = int(count)
    return counts


def state_counts(state: BadgeState) -> Counts:
    return {user: tuple(dict(by) for by in c) for user, c in state.items()}


async def sync_point(dsn: str, timeout: float = 60) -> int:
    """An LSN after every commit so far: a non-transactional logical message.

    Retried while the server cannot be reached (the fault tests restart it).
    """
    with anyio.fail_after(timeout):
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    cur = await conn.execute(
                        "SELECT pg_logical_emit_message(false, 'replicator.sync', '')::text"
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    return parse_lsn(str(row[0]))
            except psycopg.OperationalError:
                await anyio.sleep(0.2)


async def wait_applied(consumer: Consumer, lsn: int, timeout: float = 120) -> None:
    with anyio.fail_after(timeout):
        while consumer.applied_lsn < lsn:
            if consumer.error:
                raise AssertionError(f"consumer stopped: {consumer.error}")
            await anyio.sleep(0.02)


async def caught_up(consumer: Consumer, dsn: str, timeout: float = 120) -> None:
    await wait_applied(consumer, await sync_point(dsn), timeout)


async def wait_live(consumer: Consumer, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while not consumer.live:
            if consumer.error:
                raise AssertionError(f"consumer stopped: {consumer.error}")
            await anyio.sleep(0.01)


@asynccontextmanager
async def running_consumer(
    dsn: str,
    slot: str,
    *,
    status_interval: float = 10.0,
    wait: bool = True,
    decoder: str = "pgoutput",
    badges: list[BadgeSpec] | None = None,
    publication: str = "badges",
    stops: bool = False,
) -> AsyncIterator[Consumer]:
    """A consumer streaming in the background for the duration of the block.

    With ``stops``, the block expects the stream to stop on an error (``consumer.error``)."""
    options = ConsumerOptions(
        dsn=dsn,
        slot=slot,
        status_interval=status_interval,
        decoder=decoder,
        badges=badges,
        publication=publication,
    )
    consumer = Consumer(options)

    async def run() -> None:
        try:
            await consumer.run()
        except ReplicatorError:
            if not stops:
                raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            if wait:
                await wait_live(consumer)
            yield consumer
        finally:
            tg.cancel_scope.cancel()
    await consumer.shutdown()


async def check_writes_during_startup(dsn: str, slot: str, *, seed: int, decoder: str) -> None:
    """Writes running while the slot is created and the snapshot read are counted once."""
    from tests.workload import Workload

    workload = Workload(seed=seed)
    stop = anyio.Event()

    async def keep_writing() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            with anyio.fail_after(120):
                while not stop.is_set():
                    await workload.transaction(conn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_writing)
        await anyio.sleep(0.3)
        async with running_consumer(dsn, slot, decoder=decoder) as consumer:
            await anyio.sleep(0.5)
            stop.set()
            await anyio.sleep(0.1)
            await caught_up(consumer, dsn)
            assert state_counts(consumer.state) == await database_counts(dsn)
            assert consumer.feed.transactions > 0, "some writes should arrive by streaming"
    assert workload.committed > 20


#: the default schema's columns as pgoutput announces them: (name, type oid)
MESSAGES_COLUMNS = [
    ("id", 20),
    ("sender_id", 2950),
    ("recipient_id", 2950),
    ("body", 25),
    ("created_at", 1184),
    ("read_at", 1184),
]
CALLS_COLUMNS = [
    ("id", 20),
    ("caller_id", 2950),
    ("callee_id", 2950),
    ("status", 25),
    ("created_at", 1184),
    ("seen_at", 1184),
]
