"""The streaming replication connection: the only module that touches libpq's copy-both mode.

psycopg 3 has no replication API. A connection opened with ``replication="database"`` runs
walsender commands through ``execute``; ``START_REPLICATION`` leaves it in copy-both mode,
which we drive through ``pgconn``: ``get_copy_data(1)`` until it returns 0, then wait for the
socket and ``consume_input()``; status updates go out with ``put_copy_data`` and ``flush``.
Walsender connections accept only the simple query protocol, so commands carry no parameters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import anyio
import psycopg
from psycopg import pq, sql

from replicator.errors import (
    DatabaseSetupError,
    ProtocolError,
    ReplicationLost,
    SlotInUseError,
    SlotMissing,
    one_line,
)
from replicator.pg.lsn import format_lsn, parse_lsn
from replicator.pg.retry import is_connection_error
from replicator.pg.wire import (
    XLOGDATA_HEADER,
    XLOGDATA_POSITIONS,
    Keepalive,
    parse_keepalive,
    standby_status,
)

logger = logging.getLogger(__name__)

_XLOGDATA, _KEEPALIVE = 0x77, 0x6B
#: how long the reader may hold the event loop before letting other tasks run
_SLICE_S = 0.01
#: while batches of changes come less than two of these apart, the reader lets the next one
#: gather for this long before it reads it (see ``_Reader``)
LINGER_S = 0.005
#: A server that vanished without closing the connection (power loss, a dropped network
#: path) is noticed by the kernel: TCP keepalives while nothing is in flight, and a bound on
#: how long sent data may stay unacknowledged. A DSN's own values win.
TCP_OPTIONS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def _string(value: str) -> str:
    """A string as the walsender's command grammar reads it: quotes doubled, no E'' form
    (which it does not know), backslashes as they are."""
    if "\0" in value:
        raise ValueError("a replication option cannot hold a NUL byte")
    return "'" + value.replace("'", "''") + "'"


class _Reader:
    """Reads the copy-both stream in the event loop's reader callback.

    At a thousand changes a second each change arrives alone, and is followed by the
    keepalive the walsender sends before it sleeps: two wake-ups per change. Reading in the
    reader callback itself makes a wake-up cost the reading and nothing else; waking a task
    for it (a future, a task step, and a cancel scope for the status deadline) used to cost
    more than decoding and applying the change. The streaming task only sends status updates
    and raises what the reading ran into.

    A wake-up costs more than its reading: a process woken for one change finds its caches
    cold (the server's processes ran meanwhile), and reading one change then costs several
    times what it costs in a batch. So while changes come close together (a batch ended
    less than two ``linger`` periods after the one before), the reader stops watching the
    socket for ``linger`` seconds after each batch and then reads what gathered: at a
    thousand changes a second and the default 5 ms, a wake-up per five changes or so
    instead of one per change, for at most ``linger`` more latency. Changes that come
    apart are read at once.
    """

    def __init__(
        self,
        conn: ReplicationConnection,
        on_xlogdata: Callable[[memoryview, int], None],
        on_keepalive: Callable[[Keepalive], None],
        on_idle: Callable[[], None] | None = None,
        *,
        linger: float = LINGER_S,
    ) -> None:
        self._conn = conn
        self._on_xlogdata = on_xlogdata
        self._on_keepalive = on_keepalive
        self._on_idle = on_idle
        self._loop = asyncio.get_running_loop()
        self._fd = conn._pgconn.socket
        #: the task waits on this; set when it has something to do
        self._waiter: asyncio.Future[None] | None = None
        #: what the reading ran into, for the task to raise
        self.error: BaseException | None = None
        #: the server asked for a reply
        self.reply_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._linger = linger
        #: when the last batch was read, and the timer of a linger in progress
        self._batch_at = 0.0
        self._lingering: asyncio.TimerHandle | None = None
        self._loop.add_reader(self._fd, self.on_readable)
        # libpq may hold messages already, which the socket will not announce
        self._loop.call_soon(self.on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
        if self._lingering is not None:
            self._lingering.cancel()

    def _after_batch(self, now: float) -> None:
        """A batch has been read: linger before the next one if they come close together."""
        if self._linger and self._lingering is None and now - self._batch_at < 2 * self._linger:
            self._loop.remove_reader(self._fd)
            self._lingering = self._loop.call_later(self._linger, self._resume)
        self._batch_at = now

    def _resume(self) -> None:
        self._lingering = None
        if self.error is None:
            self._loop.add_reader(self._fd, self.on_readable)
            self.on_readable()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, deadline: float) -> None:
        """Until the task has something to do, or ``deadline`` (``time.monotonic()``)."""
        if deadline != self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._deadline = deadline
            self._timer = self._loop.call_later(deadline - time.monotonic(), self._wake)
        if self.error is not None or self.reply_due:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def on_readable(self) -> None:
        if self.error is not None:
            return
        try:
            self._read()
        except Exception as exc:  # handed to the streaming task, which raises it
            self.error = exc
            self._loop.remove_reader(self._fd)
            self._wake()

    def _read(self) -> None:
        conn = self._conn
        pgconn = conn._pgconn
        get_copy_data = pgconn.get_copy_data
        unpack_positions = XLOGDATA_POSITIONS.unpack_from
        on_xlogdata = self._on_xlogdata
        monotonic = time.monotonic
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise ReplicationLost(f"replication stream broke: {exc}") from exc
        slice_end = monotonic() + _SLICE_S
        count = 0
        while True:
            try:
                nbytes, data = get_copy_data(1)
            except psycopg.Error as exc:
                raise ReplicationLost(f"replication stream broke: {exc}") from exc
            if nbytes > 0:
                tag = data[0]
                if tag == _XLOGDATA:
                    if nbytes < XLOGDATA_HEADER:
                        raise ProtocolError(f"XLogData message of {nbytes} bytes is too short")
                    start, end = unpack_positions(data, 1)
                    conn.server_wal_end = end
                    on_xlogdata(data[XLOGDATA_HEADER:], start)
                elif tag == _KEEPALIVE:
                    keepalive = parse_keepalive(data)
                    if keepalive.wal_end > conn.server_wal_end:
                        conn.server_wal_end = keepalive.wal_end
                    self._on_keepalive(keepalive)
                    if keepalive.reply_requested:
                        self.reply_due = True
                        self._wake()
                else:
                    raise ProtocolError(
                        f"unknown copy-both message type {tag:#04x} ({chr(tag)!r})"
                        f" after {format_lsn(conn.server_wal_end)}"
                    )
                count += 1
                if count & 127 == 0 and monotonic() > slice_end:
                    conn.heard_at = slice_end
                    if self._on_idle is not None:
                        self._on_idle()
                    # Let other callbacks run; what libpq holds is read right after them.
                    self._loop.call_soon(self.on_readable)
                    return
            elif nbytes == 0:
                # Everything received is applied; more data makes the socket readable.
                if count:
                    conn.heard_at = now = monotonic()
                    if self._on_idle is not None:
                        self._on_idle()
                    self._after_batch(now)
                return
            else:
                message = pgconn.error_message.decode(errors="replace").strip()
                raise ReplicationLost(
                    f"replication stream ended: {message or 'the server ended the copy'}"
                )


class ReplicationConnection:
    """One walsender connection, from slot creation through copy-both streaming."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        #: the server's WAL end as last reported (XLogData or keepalive)
        self.server_wal_end = 0
        #: monotonic time when the last message from the server was read
        self.heard_at = 0.0
        self.last_status_at = 0.0

    @classmethod
    async def open(cls, dsn: str) -> ReplicationConnection:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
        tcp = {k: v for k, v in TCP_OPTIONS.items() if k not in given}
        try:
            conn = await psycopg.AsyncConnection.connect(
                psycopg.conninfo.make_conninfo(dsn, **tcp),
                replication="database",
                autocommit=True,
                application_name="replicator",
            )
        except psycopg.OperationalError as exc:
            raise ReplicationLost(f"cannot open a replication connection: {exc}") from exc
        return cls(conn)

    @property
    def server_version(self) -> int:
        return self._pgconn.server_version

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    async def create_slot(self, slot: str, plugin: str) -> tuple[int, str]:
        """Create a logical slot exporting its snapshot; return (consistent point, snapshot).

        The exported snapshot lives only until this connection runs its next command.
        """
        ident = sql.Identifier(slot)
        if self.server_version >= 150000:
            query = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL {} (SNAPSHOT 'export')")
        else:
            query = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL {} EXPORT_SNAPSHOT")
        try:
            cur = await self._conn.execute(query.format(ident, sql.Identifier(plugin)))
        except psycopg.errors.DuplicateObject as exc:
            raise SlotInUseError(
                f"replication slot {slot!r} already exists; another replicator may be using it"
                " (set REPLICATOR_SLOT to another name)"
            ) from exc
        except (psycopg.errors.UndefinedFile, psycopg.errors.InsufficientPrivilege) as exc:
            # the plugin's library is missing, or the name is not an output plugin
            raise DatabaseSetupError(
                f"output plugin {plugin!r} is not available on the server: {one_line(exc)};"
                + (
                    " install postgresql-NN-wal2json or use REPLICATOR_DECODER=pgoutput"
                    if plugin == "wal2json"
                    else ""
                )
            ) from exc
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            raise DatabaseSetupError(f"cannot create replication slot {slot!r}: {exc}") from exc
        except psycopg.OperationalError as exc:
            if is_connection_error(exc):
                raise ReplicationLost(f"creating replication slot {slot!r} failed: {exc}") from exc
            raise DatabaseSetupError(
                f"cannot create replication slot {slot!r}: {one_line(exc)}"
                f" (SQLSTATE {exc.sqlstate}); `replicator doctor` checks the set-up"
            ) from exc
        row = await cur.fetchone()
        assert row is not None
        _, consistent_point, snapshot, _ = row
        return parse_lsn(str(consistent_point)), str(snapshot)

    async def start(self, slot: str, lsn: int, options: dict[str, str]) -> None:
        opts = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.SQL(_string(v)))
            for k, v in options.items()
        )
        query = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(lsn)), opts
        )
        try:
            await self._conn.execute(query)
        except psycopg.errors.ObjectInUse as exc:
            raise SlotInUseError(
                f"replication slot {slot!r} is in use by another process: {exc}".rstrip()
                + "; is another replicator running? set REPLICATOR_SLOT to another name"
            ) from exc
        except psycopg.errors.UndefinedObject as exc:
            raise DatabaseSetupError(f"cannot stream from slot {slot!r}: {exc}") from exc
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            # 55000: the slot was invalidated (WAL removed, a conflict on a standby, idle)
            raise SlotMissing(f"cannot stream from slot {slot!r}: {one_line(exc)}") from exc
        except psycopg.OperationalError as exc:
            if is_connection_error(exc):
                raise ReplicationLost(f"START_REPLICATION failed: {exc}") from exc
            raise DatabaseSetupError(
                f"cannot stream from slot {slot!r}: {one_line(exc)} (SQLSTATE {exc.sqlstate})"
            ) from exc
        if self._pgconn.transaction_status == pq.TransactionStatus.UNKNOWN:
            raise ReplicationLost("the server closed the connection at START_REPLICATION")
        self.last_status_at = self.heard_at = time.monotonic()

    async def stream(
        self,
        on_xlogdata: Callable[[memoryview, int], None],
        on_keepalive: Callable[[Keepalive], None],
        feedback_lsn: Callable[[], int],
        *,
        status_interval: float = 10.0,
        silence_timeout: float = 60.0,
        on_idle: Callable[[], None] | None = None,
        linger: float = LINGER_S,
    ) -> None:
        """Read copy-both messages until the connection breaks (``ReplicationLost``).

        ``on_xlogdata(payload, wal_start)`` gets each pgoutput message. Status updates carry
        ``feedback_lsn()``; they go out at once when the server asks, and at least every
        ``status_interval`` seconds, each asking the server for a keepalive in reply: so even
        an idle server says something every ``status_interval``, and one that has said nothing
        for ``silence_timeout`` seconds is taken for gone (a half-open connection).
        ``on_idle()`` is called whenever what has arrived is handled, before waiting for more
        (and between slices of a long burst): once per batch rather than once per message.
        While messages come close together, each batch waits ``linger`` seconds for the next
        (see ``_Reader``).
        """
        reader = _Reader(self, on_xlogdata, on_keepalive, on_idle, linger=linger)
        try:
            while True:
                deadline = min(
                    self.last_status_at + status_interval, self.heard_at + silence_timeout
                )
                await reader.wait(deadline)
                if reader.error is not None:
                    raise reader.error
                now = time.monotonic()
                if now - self.heard_at > silence_timeout:
                    raise ReplicationLost(
                        f"no message from the server in {now - self.heard_at:.0f} s"
                        " although asked for one; the connection is taken for dead"
                    )
                asked = reader.reply_due
                if asked or now - self.last_status_at >= status_interval:
                    reader.reply_due = False
                    # what arrived is applied first (and a quiet stream counts as read)
                    reader.on_readable()
                    if reader.error is not None:
                        raise reader.error
                    # our own periodic update asks for a keepalive back: an idle server
                    # then still says something every status_interval
                    await self.send_status(feedback_lsn(), reply=not asked)
        finally:
            reader.close()

    async def send_status(self, lsn: int, *, reply: bool = False) -> None:
        """Confirm ``lsn`` as written, flushed and applied; ``reply`` asks for a keepalive."""
        pgconn = self._pgconn
        try:
            while not pgconn.put_copy_data(standby_status(lsn, reply_requested=reply)):
                await anyio.wait_writable(pgconn.socket)
            while pgconn.flush():
                await anyio.wait_writable(pgconn.socket)
        except psycopg.Error as exc:
            raise ReplicationLost(f"sending a status update failed: {exc}") from exc
        self.last_status_at = time.monotonic()
        logger.debug("confirmed %s", format_lsn(lsn))

    async def close(self) -> None:
        await self._conn.close()
