"""A logical message on the primary that moves the replication stream past a WAL position."""

from __future__ import annotations

import logging

import anyio
import psycopg
from psycopg_pool import PoolTimeout

from replicator.errors import one_line
from replicator.pg.lsn import parse_lsn
from replicator.runtime.monitor import Pool

logger = logging.getLogger(__name__)

PREFIX = "replicator.sync"
#: PostgreSQL 17 flushes a message itself when asked; before that only a commit with a
#: transaction id flushes, so the message is written in a transaction that takes one
FLUSH_ARGUMENT_FROM = 170000


class WalNudge:
    """Writes a non-transactional logical message when a reader waits for an LSN that the
    stream would otherwise only pass at its next keepalive (when nothing else is written,
    that is up to ``wal_sender_timeout / 2`` away).

    A walsender sends only flushed WAL, so the message is flushed. The stream then carries it
    between transactions, and the consumer counts everything before it as applied. One
    message serves every request for a position at or before the one read just before it
    was written, so a crowd of readers costs one message.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        #: every position up to this will be passed by the stream (a message follows it)
        self.covered = 0
        #: messages written
        self.messages = 0
        self._lock = anyio.Lock()
        self._warned = False

    async def past(self, lsn: int) -> int | None:
        """Make sure a flushed message follows ``lsn`` in the WAL.

        Returns the server's WAL position after the message when one was written for this
        call (a ``lsn`` beyond it was never written), the position already covered when an
        earlier message serves, or None when no message could be written (a standby, a
        database that is down): the stream's keepalives still pass ``lsn``, later.
        """
        if lsn <= self.covered:
            return self.covered
        async with self._lock:
            if lsn <= self.covered:
                return self.covered
            return await self._write()

    async def _write(self) -> int | None:
        try:
            async with self.pool.connection(timeout=5) as conn:
                if conn.info.server_version >= FLUSH_ARGUMENT_FROM:
                    cur = await conn.execute(
                        "SELECT pg_current_wal_insert_lsn()::text,"
                        " pg_logical_emit_message(false, %s, '', true)::text",
                        (PREFIX,),
                    )
                    row = await cur.fetchone()
                else:
                    async with conn.transaction():
                        await conn.execute("SET LOCAL synchronous_commit = on")
                        cur = await conn.execute(
                            "SELECT pg_current_wal_insert_lsn()::text,"
                            " pg_logical_emit_message(false, %s, '')::text,"
                            " pg_current_xact_id()",
                            (PREFIX,),
                        )
                        row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot write a sync message to move the stream on (%s); readers asking"
                    " for min_lsn wait for the next keepalive instead",
                    one_line(exc),
                )
            return None
        assert row is not None
        before, after = parse_lsn(str(row[0])), parse_lsn(str(row[1]))
        self.covered = max(self.covered, before)
        self.messages += 1
        return after
