"""An error before the stream ever ran: the slot dropped, one line with the fix, exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import anyio
import psycopg
import pytest

from replicator.pipeline.failures import explain, is_connection_error
from tests.conftest import Database
from tests.fault_support import slot_rows
from tests.service_support import SECRET
from tests.support import slot_env

pytestmark = pytest.mark.anyio


def serve_once(dsn: str, slot: str) -> subprocess.CompletedProcess[str]:
    """``replicator serve`` until it exits by itself (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "replicator", "serve"],
        env={
            **os.environ,
            "DATABASE_URL": dsn,
            **slot_env(slot),
            "REPLICATOR_JWT_SECRET": SECRET,
            "REPLICATOR_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_exit(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "Traceback" not in output and "ExceptionGroup" not in output, output
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("replicator: "), output
    for fragment in fragments:
        assert fragment in last, last
    return last


def with_role(dsn: str, role: str, password: str) -> str:
    conninfo = psycopg.conninfo.conninfo_to_dict(dsn)
    conninfo.update(user=role, password=password)
    conninfo.pop("passfile", None)
    return psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


async def test_badge_column_renamed_while_stopped(database: Database) -> None:
    sql(database.dsn, "ALTER TABLE calls RENAME COLUMN status TO state")
    run = await anyio.to_thread.run_sync(serve_once, database.dsn, database.slot)
    assert_one_line_exit(run, "table public.calls has no column 'status'", "badges file")
    assert await slot_rows(database.dsn, database.slot) == [], "no slot may stay"


async def test_badge_table_missing(database: Database) -> None:
    sql(database.dsn, "DROP TABLE messages")
    run = await anyio.to_thread.run_sync(serve_once, database.dsn, database.slot)
    assert_one_line_exit(run, "table public.messages does not exist", "create it")
    assert await slot_rows(database.dsn, database.slot) == []


async def test_role_without_read_access(database: Database) -> None:
    role = "nosel_" + uuid.uuid4().hex[:8]
    sql(database.dsn, f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'pw-{role}'")
    try:
        dsn = with_role(database.dsn, role, f"pw-{role}")
        run = await anyio.to_thread.run_sync(serve_once, dsn, database.slot)
        assert_one_line_exit(run, "permission denied for table", "grant the role read access")
        assert await slot_rows(database.dsn, database.slot) == []
    finally:
        sql(database.dsn, f"DROP OWNED BY {role}")
        sql(database.server.admin_dsn, f"DROP ROLE {role}")


async def test_unexpected_server_error(database: Database) -> None:
    """A server error the service has no special words for (a lock timeout here)."""
    conninfo = psycopg.conninfo.conninfo_to_dict(database.dsn)
    conninfo["options"] = "-c lock_timeout=200"
    dsn = psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]
    async with await psycopg.AsyncConnection.connect(database.dsn) as holder:
        await holder.execute("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
        run = await anyio.to_thread.run_sync(serve_once, dsn, database.slot)
        await holder.rollback()
    # PostgreSQL 15 times out creating the slot (it waits for the locking transaction),
    # 18 reading the snapshot: either way one line, and the slot does not stay
    assert_one_line_exit(run, "canceling statement due to lock timeout", "SQLSTATE 55P03")
    assert await slot_rows(database.dsn, database.slot) == []


@pytest.mark.parametrize(
    ("query", "fatal"),
    [
        ("SELECT 'not a uuid'::uuid", True),  # DataError
        ("SELECT * FROM no_such_table", True),  # ProgrammingError
        ("SELECT pg_terminate_backend(pg_backend_pid())", False),  # the connection is gone
    ],
)
async def test_errors_are_sorted_into_retry_or_stop(
    database: Database, query: str, fatal: bool
) -> None:
    caught: list[psycopg.Error] = []
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        try:
            await conn.execute(query)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            caught.append(exc)
    assert caught, f"{query} should fail"
    assert is_connection_error(caught[0]) is not fatal
    message = str(explain(caught[0]))
    assert "\n" not in message and message.startswith("the database refused")
