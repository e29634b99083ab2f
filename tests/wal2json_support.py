"""A PostgreSQL that has the wal2json plugin, for the wal2json tests and the capture script."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from replicator.pipeline.consumer import Consumer
from replicator.runtime.cluster import system_bindirs
from tests.support import running_consumer

MISSING = (
    "these tests need a PostgreSQL with the wal2json output plugin: run `make system-deps`"
    " (installs postgresql-15-wal2json), or point REPLICATOR_TEST_DSN at a server that has it"
)


def wal2json_bindir() -> Path | None:
    """The newest system PostgreSQL whose library directory holds wal2json."""
    for bindir in system_bindirs():
        if (bindir.parent / "lib" / "wal2json.so").exists():
            return bindir
    return None


def wal2json_problem(dsn: str) -> str | None:
    """Why logical decoding with wal2json fails on the server at ``dsn``; None if it works."""
    slot = f"replicator_probe_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A temporary slot goes away with the session, even if the test run dies here.
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json', true)", (slot,))
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    return None


def dsn_with_wal2json() -> str | None:
    """REPLICATOR_TEST_DSN, if it is set and its server has wal2json."""
    dsn = os.environ.get("REPLICATOR_TEST_DSN")
    if dsn and wal2json_problem(dsn) is None:
        return dsn
    return None


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop a test database and the replication slots that still point into it."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active",
            (name,),
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        for _ in range(50):
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = %s",
                    (name,),
                )
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@asynccontextmanager
async def running_wal2json_consumer(
    dsn: str, slot: str, *, status_interval: float = 10.0
) -> AsyncIterator[Consumer]:
    """A consumer on the wal2json decoder, streaming in the background for the block."""
    async with running_consumer(
        dsn, slot, status_interval=status_interval, decoder="wal2json"
    ) as consumer:
        yield consumer
