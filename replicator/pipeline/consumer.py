"""The replication consumer: start-up in the exported snapshot, streaming, reconnects, shutdown."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import psycopg

from replicator.badges import spec as badge_spec
from replicator.badges.applier import Applier
from replicator.badges.catalog import bind_async
from replicator.badges.spec import Badge, BadgeSpec
from replicator.badges.state import BadgeState, Changes
from replicator.config.settings import DECODERS
from replicator.errors import (
    ConfigError,
    DatabaseSetupError,
    ReplicationLost,
    ReplicatorError,
    SlotInUseError,
    SlotMissing,
    one_line,
)
from replicator.pg.decoding import wal2json
from replicator.pg.feed import PgoutputFeed, Wal2jsonFeed
from replicator.pg.lsn import format_lsn
from replicator.pg.slots import check_publication, clear_leftover_slot, drop_slot
from replicator.pg.walsender import ReplicationConnection
from replicator.pg.wire import Keepalive, pg_time_to_unix
from replicator.pipeline.snapshot import read_initial_state

logger = logging.getLogger(__name__)


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
    status_interval: float = 10.0
    #: seconds without draining the socket after which the stream no longer counts as caught up
    caught_up_window: float = 5.0
    #: output plugin: pgoutput, or wal2json (format-version 2) on servers that have it
    decoder: str = "pgoutput"
    #: the badges to count (None: the built-in default, its tables in ``schema``)
    badges: Sequence[BadgeSpec] | None = None

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
        self._use_state(self._empty_state(), 0, [])
        self.live = False
        self.error: str | None = None
        self.snapshot_seconds = 0.0
        self.snapshot_rows = 0
        self.reconnects = 0
        self.snapshots = 0
        self._repl: ReplicationConnection | None = None
        self._slot_created = False
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
        repl = self._repl
        if not self.live or repl is None:
            return False
        return time.monotonic() - repl.idle_at < self.options.caught_up_window

    def _set_live(self, live: bool) -> None:
        if live != self.live:
            self.live = live
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
                assert self._repl is not None
                await self._repl.stream(
                    self.feed,
                    self._on_keepalive,
                    lambda: self.feed.applied_lsn,
                    status_interval=self.options.status_interval,
                )
            except (ReplicationLost, psycopg.OperationalError) as exc:
                self._set_live(False)
                await self._close_repl()
                self.feed.abandon()
                wait = backoff.next()
                logger.warning("%s; retrying in %.1f s", one_line(exc), wait)
                self.reconnects += 1
                await anyio.sleep(wait)
            except SlotMissing as exc:
                self._set_live(False)
                await self._close_repl()
                logger.error("%s; starting afresh with a new snapshot", exc)
                fresh = True
                await anyio.sleep(backoff.next())
            except ReplicatorError as exc:
                self.error = str(exc)
                self._set_live(False)
                await self._close_repl()
                raise

    def _empty_state(self) -> BadgeState:
        return BadgeState(
            [s.name for s in self.specs], [s.counterpart is not None for s in self.specs]
        )

    async def _start_fresh(self) -> None:
        opts = self.options
        async with await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True) as admin:
            badges = await bind_async(admin, self.specs)
            tables = list(dict.fromkeys((s.schema, s.table) for s in self.specs))
            await check_publication(admin, opts.publication, tables)
            await clear_leftover_slot(admin, opts.slot)
        repl = await ReplicationConnection.open(opts.dsn)
        self._repl = repl
        started = time.monotonic()
        consistent_point, snapshot = await repl.create_slot(opts.slot, opts.decoder)
        self._slot_created = True
        state = self._empty_state()
        # The exported snapshot dies with the replication connection's next command, so it
        # is read now, before START_REPLICATION.
        async with await psycopg.AsyncConnection.connect(opts.dsn) as conn:
            rows = await read_initial_state(conn, snapshot, badges, state)
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
        self._replace_state(state, consistent_point, badges)
        await self._start_streaming(consistent_point, first=True)

    def _use_state(self, state: BadgeState, lsn: int, badges: Sequence[Badge]) -> None:
        """Apply the stream to ``state`` from ``lsn`` on, through the configured decoder."""
        self.state = state
        self.applier = Applier(state, badges, on_commit=self._on_commit)
        #: takes each XLogData payload with its WAL position
        self.feed: PgoutputFeed | Wal2jsonFeed = (
            Wal2jsonFeed(self.applier, self.applier.tables(), applied_lsn=lsn)
            if self.options.decoder == "wal2json"
            else PgoutputFeed(self.applier, applied_lsn=lsn)
        )

    def _replace_state(self, state: BadgeState, lsn: int, badges: Sequence[Badge]) -> None:
        changed = self.state.differences(state)
        self._use_state(state, lsn, badges)
        if changed and self._on_commit is not None:
            self._on_commit(lsn, changed)

    async def _resume(self) -> None:
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

    def lag_bytes(self) -> int:
        return self._consumer.lag_bytes()

    def lag_seconds(self) -> float:
        return self._consumer.lag_seconds()

    def caught_up(self) -> bool:
        return self._consumer.caught_up()

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
