"""The replication consumer: start-up in the exported snapshot, streaming, reconnects, shutdown."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import psycopg

from replicator.badges.state import Applier, BadgeState
from replicator.config.settings import DECODERS
from replicator.errors import (
    ConfigError,
    DatabaseSetupError,
    ReplicationLost,
    ReplicatorError,
    SlotInUseError,
    one_line,
)
from replicator.pg.decoding import wal2json
from replicator.pg.lsn import format_lsn
from replicator.pg.walsender import ReplicationConnection
from replicator.pg.wire import Keepalive, pg_time_to_unix
from replicator.pipeline.failures import explain, is_connection_error
from replicator.pipeline.snapshot import (
    check_publication,
    clear_leftover_slot,
    drop_slot,
    read_initial_state,
)

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


class Consumer:
    """Keeps a ``BadgeState`` equal to the database as of the last applied commit.

    ``on_commit(lsn, users)`` is called after each transaction that changed users' counts,
    and after a fresh snapshot replaced the state; ``on_live(live)`` when streaming starts
    or stops.
    """

    def __init__(
        self,
        options: ConsumerOptions,
        *,
        on_commit: Callable[[int, set[str]], None] | None = None,
        on_live: Callable[[bool], None] | None = None,
    ) -> None:
        if options.decoder not in DECODERS:
            raise ConfigError(f"decoder {options.decoder!r} is unknown; use pgoutput or wal2json")
        self.options = options
        self._on_commit = on_commit
        self._on_live = on_live
        self._use_state(BadgeState(), 0)
        self.live = False
        self.error: str | None = None
        self.snapshot_seconds = 0.0
        self.snapshot_rows = 0
        self.reconnects = 0
        self.snapshots = 0
        #: the stream has been live at least once (errors before that end the service)
        self.started = False
        self._repl: ReplicationConnection | None = None
        self._slot_created = False
        self.view = ConsumerView(self)

    # -- status ----------------------------------------------------------------------------

    @property
    def applied_lsn(self) -> int:
        return self.applier.applied_lsn

    @property
    def server_wal_end(self) -> int:
        return self._repl.server_wal_end if self._repl is not None else 0

    def lag_bytes(self) -> int:
        return max(0, self.server_wal_end - self.applier.applied_lsn)

    def lag_seconds(self) -> float:
        if not self.lag_bytes() or not self.applier.last_commit_time:
            return 0.0
        return max(0.0, time.time() - pg_time_to_unix(self.applier.last_commit_time))

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
                assert self._repl is not None
                await self._repl.stream(
                    self.feed,
                    self._on_keepalive,
                    lambda: self.applier.applied_lsn,
                    status_interval=self.options.status_interval,
                    silence_timeout=self.options.silence_timeout,
                )
            except (ReplicationLost, psycopg.Error) as exc:
                if isinstance(exc, psycopg.Error) and not is_connection_error(exc):
                    error = explain(exc)
                    await self._stop(error)
                    raise error from exc
                self._set_live(False)
                await self._close_repl()
                self.applier.abandon_transaction()
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
        self._set_live(False)
        await self._close_repl()

    async def _start_fresh(self) -> None:
        opts = self.options
        async with await psycopg.AsyncConnection.connect(opts.dsn, autocommit=True) as admin:
            await check_publication(admin, opts.publication, opts.schema)
            await clear_leftover_slot(admin, opts.slot)
        repl = await ReplicationConnection.open(opts.dsn)
        self._repl = repl
        started = time.monotonic()
        consistent_point, snapshot = await repl.create_slot(opts.slot, opts.decoder)
        self._slot_created = True
        state = BadgeState()
        # The exported snapshot dies with the replication connection's next command, so it
        # is read now, before START_REPLICATION.
        async with await psycopg.AsyncConnection.connect(opts.dsn) as conn:
            rows = await read_initial_state(conn, snapshot, opts.schema, state)
        state.lsn = consistent_point
        self.snapshot_seconds = time.monotonic() - started
        self.snapshot_rows = rows
        self.snapshots += 1
        logger.info(
            "snapshot at %s: %d users, %d (user, counterpart) counts in %.3f s",
            format_lsn(consistent_point),
            len(state.users),
            rows,
            self.snapshot_seconds,
        )
        self._replace_state(state, consistent_point)
        await self._start_streaming(consistent_point, first=True)

    def _use_state(self, state: BadgeState, lsn: int) -> None:
        """Apply the stream to ``state`` from ``lsn`` on, through the configured decoder."""
        self.state = state
        self.applier = Applier(state, schema=self.options.schema, on_commit=self._on_commit)
        self.applier.applied_lsn = lsn
        #: takes each XLogData payload with its WAL position
        self.feed: Callable[[bytes | memoryview, int], None] = (
            wal2json.attach(self.applier)
            if self.options.decoder == "wal2json"
            else self.applier.apply
        )

    def _replace_state(self, state: BadgeState, lsn: int) -> None:
        old = self.state
        changed = {u for u in old.users.keys() | state.users.keys() if old.view(u) != state.view(u)}
        self._use_state(state, lsn)
        if changed and self._on_commit is not None:
            self._on_commit(lsn, changed)

    async def _resume(self) -> None:
        self._repl = await ReplicationConnection.open(self.options.dsn)
        await self._start_streaming(self.applier.applied_lsn, first=False)
        logger.info("replication resumed at %s", format_lsn(self.applier.applied_lsn))

    async def _start_streaming(self, lsn: int, *, first: bool) -> None:
        assert self._repl is not None
        if self.options.decoder == "wal2json":
            options = wal2json.stream_options(self.options.schema)
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
        self.applier.advance(keepalive.wal_end)

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
        return self._consumer.applier.rows

    @property
    def transactions_applied(self) -> int:
        return self._consumer.applier.transactions


class SlotMissing(ReplicatorError):
    """Our slot disappeared while we were away (an administrator dropped it)."""


async def log_progress(consumer: Consumer, interval: float = 5.0) -> None:
    """Log the applied LSN and the rows/s rate every ``interval`` seconds."""
    last_rows, last_at = consumer.applier.rows, time.monotonic()
    while True:
        await anyio.sleep(interval)
        now = time.monotonic()
        rows = consumer.applier.rows
        rate = (rows - last_rows) / (now - last_at)
        last_rows, last_at = rows, now
        logger.info(
            "applied %s (%s): %d rows, %d transactions, %.0f rows/s, %d users with badges,"
            " lag %d bytes",
            format_lsn(consumer.applied_lsn),
            "live" if consumer.live else "not streaming",
            rows,
            consumer.applier.transactions,
            rate,
            len(consumer.state.users),
            consumer.lag_bytes(),
        )
