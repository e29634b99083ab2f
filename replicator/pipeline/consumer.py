"""The replication consumer: start-up in the exported snapshot, streaming, reconnects, shutdown."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import psycopg

from replicator.badges import spec as badge_spec
from replicator.badges.applier import Applier
from replicator.badges.catalog import bind_async, describe_async, empty_relations
from replicator.badges.spec import Badge, BadgeSpec
from replicator.badges.state import BadgeState, Changes
from replicator.badges.tables import TableMap, check_names, qualified
from replicator.badges.tables import changes as table_changes
from replicator.config.settings import DECODERS
from replicator.errors import (
    ConfigError,
    DatabaseSetupError,
    NeedsCatalog,
    ReplicationLost,
    ReplicatorError,
    SlotInUseError,
    SlotMissing,
    StartAfresh,
    one_line,
)
from replicator.pg import ddl
from replicator.pg.changes import Relation
from replicator.pg.decoding import wal2json
from replicator.pg.feed import PgoutputFeed, Wal2jsonFeed
from replicator.pg.lsn import format_lsn
from replicator.pg.slots import (
    check_publication,
    check_resumable,
    clear_leftover_slot,
    drop_slot,
    is_standby,
    reclaim_dead_slots,
)
from replicator.pg.walsender import LINGER_S, ReplicationConnection
from replicator.pg.wire import Keepalive, pg_time_to_unix
from replicator.pipeline.failures import explain, is_connection_error
from replicator.pipeline.snapshot import read_initial_state

logger = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


@dataclass
class Backoff:
    """1 s, doubling, capped, each wait jittered by ±10 %."""

    initial: float = 1.0
    cap: float = 30.0
    _next: float = 0.0

    def reset(self) -> None:
        self._next = 0.0

    def next(self) -> float:
        self._next = self.initial if not self._next else min(self._next * 2, self.cap)
        return self._next * random.uniform(0.9, 1.1)


@dataclass(frozen=True)
class ConsumerOptions:
    dsn: str
    slot: str = "replicator"
    publication: str = "badges"
    schema: str = "public"
    #: seconds between status updates, each asking the server for a keepalive in reply
    status_interval: float = 10.0
    #: seconds without a message from the server (though asked) after which the connection is
    #: taken for dead and replaced (a server gone without closing it)
    silence_timeout: float = 60.0
    #: ready while the last message from the server is at most this old ...
    ready_silence: float = 25.0
    #: ... and what is applied is at most this many WAL bytes behind what the server sent
    ready_lag_bytes: int = 1 << 20
    #: output plugin: pgoutput, or wal2json (format-version 2) on servers that have it
    decoder: str = "pgoutput"
    #: the badges to count (None: the built-in default, its tables in ``schema``)
    badges: Sequence[BadgeSpec] | None = None
    #: seconds changes arriving close together may wait to be read together (0: none)
    linger_s: float = LINGER_S
    #: seconds between looks at the catalog for changes the stream cannot show (partitions
    #: attached, detached or dropped, tables renamed); the DDL signal shows them at once
    catalog_check_s: float = 5.0
    #: the prefix shared by every instance's slot (REPLICATOR_SLOT); with it, slots of
    #: instances gone for ``slot_grace_s`` are dropped
    slot_prefix: str | None = None
    slot_grace_s: float = 300.0
    #: the primary, when ``dsn`` is a standby: for what must run there
    primary_dsn: str | None = None

    def specs(self) -> list[BadgeSpec]:
        if self.badges is not None:
            return list(self.badges)
        return badge_spec.load(None, schema=self.schema)


class Consumer:
    """Keeps a ``BadgeState`` equal to the database as of the last applied commit.

    ``on_commit(lsn, changes)`` is called after each transaction that changed users' counts,
    and after a fresh snapshot replaced the state; ``on_live(live)`` when streaming starts
    or stops.
    """

    def __init__(
        self,
        options: ConsumerOptions,
        *,
        on_commit: Callable[[int, Changes], None] | None = None,
        on_live: Callable[[bool], None] | None = None,
    ) -> None:
        if options.decoder not in DECODERS:
            raise ConfigError(f"decoder {options.decoder!r} is unknown; use pgoutput or wal2json")
        self.options = options
        self.specs = options.specs()
        self._on_commit = on_commit
        self._on_live = on_live
        # Counts need the columns' types, which binding reads from the catalog at start.
        self._use_state(self._empty_state(), 0, [], TableMap())
        self.database: str | None = None
        #: other instances' slots seen idle, and since when (for PostgreSQL before 17)
        self._idle_slots: dict[str, float] = {}
        #: new snapshots taken because the stream could not be followed (partitions, slots)
        self.fresh_starts = 0
        self.live = False
        self.error: str | None = None
        self.snapshot_seconds = 0.0
        self.snapshot_rows = 0
        self.reconnects = 0
        self.snapshots = 0
        #: the stream has been live at least once (errors before that end the service)
        self.started = False
        self._repl: ReplicationConnection | None = None
        #: the connection of the catalog looks, kept between them (see ``_look``)
        self._look_conn: Conn | None = None
        self._look_lock = anyio.Lock()
        self._slot_created = False
        #: (lsn, order, future) of requests waiting for the applied LSN to reach lsn
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.view = ConsumerView(self)

    # -- status ----------------------------------------------------------------------------

    @property
    def applied_lsn(self) -> int:
        return self.feed.applied_lsn

    @property
    def server_wal_end(self) -> int:
        return self._repl.server_wal_end if self._repl is not None else 0

    def lag_bytes(self) -> int:
        return max(0, self.server_wal_end - self.feed.applied_lsn)

    def lag_seconds(self) -> float:
        if not self.lag_bytes() or not self.feed.last_commit_time:
            return 0.0
        return max(0.0, time.time() - pg_time_to_unix(self.feed.last_commit_time))

    def caught_up(self) -> bool:
        return self.live and self.behind() is None

    def behind(self) -> str | None:
        """Why the live stream does not count as caught up, or None when it does.

        An idle database is caught up: every status update asks the server for a keepalive,
        which carries its WAL position, so the server is heard from every status interval.
        """
        repl = self._repl
        if repl is None:
            return "not streaming"
        silent = time.monotonic() - repl.heard_at
        if silent > self.options.ready_silence:
            return f"no message from the server for {silent:.0f} s"
        lag = self.lag_bytes()
        if lag > self.options.ready_lag_bytes:
            return f"applied WAL is {lag} bytes behind what the server sent"
        return None

    async def reached(self, lsn: int) -> bool:
        """Wait until everything up to ``lsn`` is applied (True), or replication has stopped
        for good (False)."""
        if self.feed.applied_lsn >= lsn:
            return True
        if self.error is not None:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (lsn, next(self._order), waiter)
        heapq.heappush(self._waiters, entry)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
        return self.feed.applied_lsn >= lsn

    def _wake(self) -> None:
        """Release the waiters whose LSN is applied (all of them once replication stopped)."""
        waiters = self._waiters
        applied = self.feed.applied_lsn
        stopped = self.error is not None
        while waiters and (stopped or waiters[0][0] <= applied):
            waiter = heapq.heappop(waiters)[2]
            if not waiter.done():
                waiter.set_result(None)

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
            self.started = self.started or live
            if self._on_live is not None:
                self._on_live(live)

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Stream until cancelled; reconnect on connection loss; raise on fatal errors."""
        backoff = Backoff()
        fresh = True
        while True:
            try:
                if fresh:
                    await self._start_fresh()
                    fresh = False
                else:
                    await self._resume()
                backoff.reset()
                self._set_live(True)
                pending: NeedsCatalog | None = None
                while True:
                    try:
                        if pending is not None:
                            found, pending = pending, None
                            await self._learn(found)
                            if found.again:
                                self.feed(found.payload, found.lsn)
                        await self._stream()
                    except NeedsCatalog as exc:
                        pending = exc
            except (ReplicationLost, psycopg.Error) as exc:
                if isinstance(exc, psycopg.Error) and not is_connection_error(exc):
                    error = explain(exc)
                    await self._stop(error)
                    raise error from exc
                self._set_live(False)
                await self._close_repl()
                self.feed.abandon()
                wait = backoff.next()
                logger.warning("%s; retrying in %.1f s", one_line(exc), wait)
                self.reconnects += 1
                await anyio.sleep(wait)
            except StartAfresh as exc:
                self._set_live(False)
                await self._close_repl()
                logger.warning("%s; counting afresh from a new snapshot", exc)
                fresh = True
                self.fresh_starts += 1
                if isinstance(exc, SlotMissing):
                    await anyio.sleep(backoff.next())
            except ReplicatorError as exc:
                await self._stop(exc)
                raise
            except Exception as exc:
                # A defect of ours: say so in one line; the traceback goes to the debug log.
                logger.debug("unexpected error in the consumer", exc_info=True)
                defect = ReplicatorError(
                    f"unexpected error: {type(exc).__name__}: {one_line(exc)}"
                    " (REPLICATOR_LOG_LEVEL=debug logs the traceback)"
                )
                await self._stop(defect)
                raise defect from exc

    async def _stop(self, error: ReplicatorError) -> None:
        """Stop streaming for good: ``error`` is what ``/readyz`` reports."""
        self.error = str(error)
        self._wake()
        self._set_live(False)
        await self._close_repl()

    def _empty_state(self) -> BadgeState:
        return BadgeState(
            [s.name for s in self.specs], [s.counterpart is not None for s in self.specs]
        )

    async def _stream(self) -> None:
        """Stream until something interrupts: the connection, a fatal error, a message that
        needs the catalog, or a catalog change the watcher found."""
        assert self._repl is not None
        repl = self._repl
        failure: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_catalog, tg.cancel_scope, failure)
            try:
                await repl.stream(
                    self.feed,
                    self._on_keepalive,
                    lambda: self.feed.applied_lsn,
                    status_interval=self.options.status_interval,
                    silence_timeout=self.options.silence_timeout,
                    on_idle=self._wake_if_waiting,
                    linger=self.options.linger_s,
                )
            except Exception as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()
        if failure:
            raise failure[0]

    async def _watch_catalog(self, scope: anyio.CancelScope, failure: list[Exception]) -> None:
        """Look at the catalog every ``catalog_check_s``; stop the stream on a change."""
        while True:
            await anyio.sleep(self.options.catalog_check_s)
            try:
                await self._learn(NeedsCatalog("a periodic look at the catalog"))
            except psycopg.OperationalError:
                continue  # the stream notices a lost server by itself
            except Exception as exc:
                failure.append(exc)
                scope.cancel()
                return
            await self._reclaim()

    async def _reclaim(self) -> None:
        """Drop the slots of instances that died (never fatal: the next look tries again)."""
        opts = self.options
        prefix = opts.slot_prefix
        if prefix is None:
            return
        try:
            await self._look(
                lambda admin: reclaim_dead_slots(
                    admin,
                    prefix=prefix,
                    own=opts.slot,
                    plugin=opts.decoder,
                    grace=opts.slot_grace_s,
                    seen=self._idle_slots,
                )
            )
        except psycopg.Error as exc:
            logger.debug("could not look for dead instances' slots: %s", one_line(exc))

    async def _look(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work`` on the connection for looks at the catalog, one look at a time. It is
        kept between looks (opening one every few seconds costs more than the look, here and
        in the server) and dropped after anything goes wrong; a look on a kept connection that
        the server has closed meanwhile is made again on a new one."""
        async with self._look_lock:
            kept = self._look_conn
            if kept is not None and not kept.closed:
                try:
                    return await self._look_on(kept, work)
                except psycopg.OperationalError:
                    pass  # closed by the server meanwhile: once more, on a new connection
            conn = await psycopg.AsyncConnection.connect(
                self.options.dsn, autocommit=True, connect_timeout=10
            )
            self._look_conn = conn
            return await self._look_on(conn, work)

    async def _look_on(self, conn: Conn, work: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            return await work(conn)
        except BaseException:
            self._look_conn = None
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise

    async def _learn(self, need: NeedsCatalog) -> None:
        """Look at the catalog for what the stream cannot say: a relation it has not seen, a
        DDL signal, or any change since the snapshot. Raises ``StartAfresh`` or
        ``SchemaError`` when the stream cannot go on as it is."""
        opts = self.options

        async def look(admin: Conn) -> tuple[TableMap, list[Badge], list[tuple[str, str]]]:
            tables = await describe_async(admin, self.applier.badges, opts.publication)
            check_names(self.tables, tables, self.applier.badges)
            badges = await bind_async(admin, self.specs, explain=False)
            known_oids = self.tables.oids()
            added = [m.key for m in tables.members.values() if m.oid not in known_oids]
            empty = await empty_relations(admin, added) if added else []
            return tables, badges, empty

        tables, badges, empty = await self._look(look)
        new_members = table_changes(
            self.tables,
            tables,
            self.applier.badges,
            badges,
            announced=opts.decoder == "pgoutput",
            empty=empty,
        )
        for member in new_members:
            logger.info("partition %s joined %s", qualified(member.key), qualified(member.root))
            self.applier.add_member(member.key, member.oid, member.root)
            self.tables.members[member.key] = member
        rel = need.relation
        if isinstance(rel, Relation) and (rel.namespace, rel.name) not in tables.members:
            self.applier.add_other((rel.namespace, rel.name))

    def _on_message(self, prefix: str, content: str) -> None:
        """A transactional logical message; the DDL signal's are looked at here."""
        if prefix != ddl.PREFIX:
            return
        signal = ddl.parse(content)
        if signal is None:
            return
        ours = self.tables.oids()
        ours.update({b.table_oid: (b.spec.schema, b.spec.table) for b in self.applier.badges})
        touched = [ours[oid] for oid in signal.oids if oid in ours]
        if not touched:
            return
        what = f"{signal.tag} on {qualified(touched[0])}"
        if signal.event == "table_rewrite":
            # a rewrite may change any value (ALTER COLUMN ... TYPE ... USING) without a row change
            raise StartAfresh(f"{what} rewrote the table")
        raise NeedsCatalog(what, oids=signal.oids)

    async def _start_fresh(self) -> None:
        opts = self.options
        async with await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True) as admin:
            badges = await bind_async(admin, self.specs)
            tables = await describe_async(admin, badges, opts.publication)
            tables.check()
            roots = list(dict.fromkeys((s.schema, s.table) for s in self.specs))
            await check_publication(
                admin,
                opts.publication,
                roots,
                tables.leaves(),
                partitioned=tables.partitioned(),
            )
            database = admin.info.dbname
            await clear_leftover_slot(admin, opts.slot, database=database, plugin=opts.decoder)
        self.database = database
        repl = await ReplicationConnection.open(opts.dsn)
        self._repl = repl
        started = time.monotonic()
        consistent_point, snapshot = await self._create_slot(repl)
        self._slot_created = True
        state = self._empty_state()
        # The exported snapshot dies with the replication connection's next command, so it
        # is read now, before START_REPLICATION.
        async with await psycopg.AsyncConnection.connect(opts.dsn) as conn:
            rows = await read_initial_state(conn, snapshot, badges, state, tables)
        state.lsn = consistent_point
        self.snapshot_seconds = time.monotonic() - started
        self.snapshot_rows = rows
        self.snapshots += 1
        logger.info(
            "snapshot at %s: %d users, %d (user, counterpart) counts in %.3f s",
            format_lsn(consistent_point),
            len(state),
            rows,
            self.snapshot_seconds,
        )
        self._replace_state(state, consistent_point, badges, tables)
        await self._start_streaming(consistent_point, first=True)

    async def _create_slot(self, repl: ReplicationConnection) -> tuple[int, str]:
        """Create our slot; on a standby, ask the primary meanwhile for the running-transactions
        record that slot creation there waits for."""
        async with await psycopg.AsyncConnection.connect(
            self.options.dsn, autocommit=True, connect_timeout=10
        ) as admin:
            standby = await is_standby(admin)
        if not standby:
            return await repl.create_slot(self.options.slot, self.options.decoder)
        failure: list[Exception] = []
        found: list[tuple[int, str]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._nudge_primary)
            try:
                found.append(await repl.create_slot(self.options.slot, self.options.decoder))
            except Exception as exc:
                failure.append(exc)
            tg.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return found[0]

    async def _nudge_primary(self) -> None:
        """``pg_log_standby_snapshot()`` on the primary, each second, while a slot is created
        on the standby; without it the standby waits for the primary's own (every 15 s)."""
        waiting = (
            "creating slot %r on a standby waits for the primary's next running-transactions"
            " record (up to 15 s); %s"
        )
        primary = self.options.primary_dsn
        if primary is None:
            logger.info(waiting, self.options.slot, "set REPLICATOR_PRIMARY_URL to speed it up")
            return
        try:
            async with await psycopg.AsyncConnection.connect(
                primary, autocommit=True, connect_timeout=10
            ) as conn:
                while True:
                    await conn.execute("SELECT pg_log_standby_snapshot()")
                    await anyio.sleep(1)
        except psycopg.errors.InsufficientPrivilege:
            logger.warning(
                waiting,
                self.options.slot,
                "the primary refuses pg_log_standby_snapshot() to this role: run GRANT EXECUTE"
                " ON FUNCTION pg_log_standby_snapshot() TO <role> there (as a superuser)",
            )
        except psycopg.Error as exc:
            logger.warning(waiting, self.options.slot, f"the primary: {one_line(exc)}")

    def _use_state(
        self, state: BadgeState, lsn: int, badges: Sequence[Badge], tables: TableMap
    ) -> None:
        """Apply the stream to ``state`` from ``lsn`` on, through the configured decoder."""
        self.state = state
        self.tables = tables
        self.applier = Applier(
            state, badges, tables=tables, on_commit=self._on_commit, on_message=self._on_message
        )
        #: takes each XLogData payload with its WAL position
        self.feed: PgoutputFeed | Wal2jsonFeed = (
            Wal2jsonFeed(self.applier, self.applier.tables(), applied_lsn=lsn)
            if self.options.decoder == "wal2json"
            else PgoutputFeed(self.applier, applied_lsn=lsn)
        )

    def _replace_state(
        self, state: BadgeState, lsn: int, badges: Sequence[Badge], tables: TableMap
    ) -> None:
        changed = self.state.differences(state)
        self._use_state(state, lsn, badges, tables)
        if changed and self._on_commit is not None:
            self._on_commit(lsn, changed)
        self._wake_if_waiting()

    async def _resume(self) -> None:
        opts = self.options
        async with await psycopg.AsyncConnection.connect(
            opts.dsn, autocommit=True, connect_timeout=10
        ) as admin:
            await check_resumable(
                admin,
                opts.slot,
                database=self.database or admin.info.dbname,
                plugin=opts.decoder,
                confirmed=self.feed.applied_lsn,
            )
        self._repl = await ReplicationConnection.open(self.options.dsn)
        await self._start_streaming(self.feed.applied_lsn, first=False)
        logger.info("replication resumed at %s", format_lsn(self.feed.applied_lsn))

    async def _start_streaming(self, lsn: int, *, first: bool) -> None:
        assert self._repl is not None
        if self.options.decoder == "wal2json":
            options = wal2json.stream_options(self.applier.tables())
        else:
            options = {
                "proto_version": "1",
                "publication_names": self.options.publication,
                "messages": "true",
            }
        try:
            await self._repl.start(self.options.slot, lsn, options)
        except SlotInUseError:
            if first:
                raise
            # Most likely our own previous walsender, which has not noticed it lost us yet.
            raise ReplicationLost(
                f"replication slot {self.options.slot!r} is still held by an earlier connection"
            ) from None
        except DatabaseSetupError as exc:
            if not first and "does not exist" in str(exc):
                raise SlotMissing(f"replication slot {self.options.slot!r} is gone") from exc
            raise

    def _wake_if_waiting(self) -> None:
        if self._waiters:
            self._wake()

    def _on_keepalive(self, keepalive: Keepalive) -> None:
        # Between transactions, everything that committed before wal_end has reached us.
        self.feed.advance(keepalive.wal_end)

    async def _close_repl(self) -> None:
        if self._repl is not None:
            repl, self._repl = self._repl, None
            with anyio.move_on_after(2, shield=True):
                await repl.close()

    async def shutdown(self) -> None:
        """Close the stream and drop the slot, so a stopped service never holds WAL."""
        self._set_live(False)
        with anyio.move_on_after(5, shield=True):
            await self._close_repl()
            if self._look_conn is not None:
                await self._look_conn.close()
                self._look_conn = None
            if not self._slot_created:
                return
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.options.dsn, autocommit=True, connect_timeout=3
                ) as admin:
                    if await drop_slot(admin, self.options.slot):
                        logger.info("dropped replication slot %r", self.options.slot)
                    else:
                        logger.warning("replication slot %r stayed busy", self.options.slot)
            except psycopg.Error as exc:
                logger.warning(
                    "could not drop replication slot %r: %s", self.options.slot, one_line(exc)
                )


class ConsumerView:
    """What the HTTP layer and metrics read of a consumer: its status and its state, read-only."""

    __slots__ = ("_consumer",)

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    @property
    def live(self) -> bool:
        return self._consumer.live

    @property
    def error(self) -> str | None:
        return self._consumer.error

    @property
    def state(self) -> BadgeState:
        """The counts as of the last applied commit (a fresh snapshot replaces the object)."""
        return self._consumer.state

    @property
    def applied_lsn(self) -> int:
        return self._consumer.applied_lsn

    async def reached(self, lsn: int) -> bool:
        """Wait until every transaction that committed at or before ``lsn`` is applied
        (True), or replication has stopped for good (False). Bound it with a cancel scope."""
        return await self._consumer.reached(lsn)

    def lag_bytes(self) -> int:
        return self._consumer.lag_bytes()

    def lag_seconds(self) -> float:
        return self._consumer.lag_seconds()

    def caught_up(self) -> bool:
        return self._consumer.caught_up()

    def behind(self) -> str | None:
        return self._consumer.behind()

    @property
    def snapshot_seconds(self) -> float:
        return self._consumer.snapshot_seconds

    @property
    def snapshots(self) -> int:
        return self._consumer.snapshots

    @property
    def reconnects(self) -> int:
        return self._consumer.reconnects

    @property
    def changes_applied(self) -> int:
        return self._consumer.feed.rows

    @property
    def transactions_applied(self) -> int:
        return self._consumer.feed.transactions


async def log_progress(consumer: Consumer, interval: float = 5.0) -> None:
    """Log the applied LSN and the rows/s rate every ``interval`` seconds."""
    last_rows, last_at = consumer.feed.rows, time.monotonic()
    while True:
        await anyio.sleep(interval)
        now = time.monotonic()
        rows = consumer.feed.rows
        rate = (rows - last_rows) / (now - last_at)
        last_rows, last_at = rows, now
        logger.info(
            "applied %s (%s): %d rows, %d transactions, %.0f rows/s, %d users with badges,"
            " lag %d bytes",
            format_lsn(consumer.applied_lsn),
            "live" if consumer.live else "not streaming",
            rows,
            consumer.feed.transactions,
            rate,
            len(consumer.state),
            consumer.lag_bytes(),
        )
