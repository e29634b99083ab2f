"""A periodic look at the server from outside the stream: the WAL our slot makes it keep."""

from __future__ import annotations

import logging

import anyio
import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from replicator.errors import one_line
from replicator.pg.slots import WAL_POSITION

logger = logging.getLogger(__name__)

#: short connections opened again and again (slot checks, demo writes) come from this pool
Pool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]


def open_pool(dsn: str) -> Pool:
    """A small pool of autocommit connections, opened on first use (so a database that is
    down at start only delays what needs it); ``await pool.open()`` before use."""
    return AsyncConnectionPool(
        dsn,
        min_size=0,
        max_size=2,
        open=False,
        kwargs={"autocommit": True, "application_name": "replicator-admin"},
        name="replicator",
    )


#: WAL the slot keeps on the server: from its restart_lsn to the server's current position
#: (on a standby, its replay position)
RETAINED_QUERY = (
    f"SELECT pg_wal_lsn_diff({WAL_POSITION}, restart_lsn)::bigint"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


class SlotMonitor:
    """Every ``interval`` seconds, through the shared pool, how much WAL the slot retains."""

    def __init__(self, pool: Pool, slot: str, *, interval: float = 15.0) -> None:
        self.pool = pool
        self.slot = slot
        self.interval = interval
        #: bytes of WAL kept for the slot at the last look (0 while it does not exist)
        self.retained_bytes = 0
        self.checks = 0
        self.failures = 0

    async def check(self) -> None:
        try:
            async with self.pool.connection(timeout=10) as conn:
                cur = await conn.execute(RETAINED_QUERY, (self.slot,))
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            self.failures += 1
            logger.debug("slot check failed: %s", one_line(exc))
            return
        self.retained_bytes = int(row[0]) if row is not None and row[0] is not None else 0
        self.checks += 1

    async def run(self) -> None:
        while True:
            await self.check()
            await anyio.sleep(self.interval)
