"""``replicator verify`` against a real service and database: agreement, differences, errors."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from replicator.badges.catalog import bind_sync
from replicator.errors import ReplicatorError
from replicator.ops.doctor import connect
from replicator.ops.verify import Difference, ServiceClient, compare, verify
from replicator.pg.lsn import parse_lsn
from replicator.runtime.cluster import PostgresCluster, embedded_bindir, free_port
from replicator.web.auth import mint_token
from tests.conftest import Database
from tests.service_support import SECRET, RunningService, running_service
from tests.support import DEFAULT_SPECS
from tests.workload import Workload


@pytest.fixture
def service(database: Database) -> Iterator[RunningService]:
    asyncio.run(Workload(11).run(database.dsn, 300))
    with running_service(database.dsn, database.slot) as svc:
        yield svc


def run_verify(url: str, dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REPLICATOR_") and k != "DATABASE_URL"
    }
    environ.update({"DATABASE_URL": dsn, "REPLICATOR_JWT_SECRET": SECRET, **env})
    return subprocess.run(
        [sys.executable, "-m", "replicator", "verify", "--url", url],
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


def client(service: RunningService, secret: str = SECRET) -> ServiceClient:
    return ServiceClient(service.url, mint_token(secret, "verify-test", admin=True))


def test_compare_names_every_difference() -> None:
    service = {("u", "unread_messages", "a"): 2, ("u", "missed_calls", "b"): 1}
    database = {("u", "unread_messages", "a"): 3, ("v", "unread_messages", "a"): 1}
    assert compare(service, database) == [
        Difference("u", "missed_calls", "b", 1, 0),
        Difference("u", "unread_messages", "a", 2, 3),
        Difference("v", "unread_messages", "a", 0, 1),
    ]
    assert compare(service, dict(service)) == []


def test_agrees_after_a_workload(database: Database, service: RunningService) -> None:
    run = run_verify(service.url, database.dsn)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith(f"ok    the service at {service.url} agrees with the database: ")

    with connect(database.dsn, statement_timeout=None) as conn:
        badges = bind_sync(conn, DEFAULT_SPECS)
        outcomes = [verify(conn, client(service), badges) for _ in range(3)]
        users = conn.execute(
            "SELECT count(DISTINCT recipient_id) FROM messages WHERE read_at IS NULL"
        ).fetchone()
    assert [o.differences for o in outcomes] == [[], [], []]
    # Nothing writes: the comparison is exact at once (barring a stray autovacuum commit).
    assert any(o.exact and o.attempts == 1 for o in outcomes)
    assert users is not None and 0 < users[0] <= outcomes[0].users


def test_agrees_while_the_database_changes(database: Database, service: RunningService) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    async def churn() -> None:
        workload = Workload(12)
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            while not stop.is_set():
                await workload.transaction(conn)
                await asyncio.sleep(0.002)

    def writer() -> None:
        try:
            asyncio.run(churn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with connect(database.dsn, statement_timeout=None) as conn:
            badges = bind_sync(conn, DEFAULT_SPECS)
            outcomes = [verify(conn, client(service), badges) for _ in range(3)]
    finally:
        stop.set()
        thread.join(60)
    assert not errors
    assert [o.differences for o in outcomes] == [[], [], []]


def test_reports_every_difference(database: Database, service: RunningService) -> None:
    # A copy of the tables outside the publication: verify reads it, the service never sees it.
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shadow")
        conn.execute("CREATE TABLE shadow.messages AS TABLE public.messages")
        conn.execute("CREATE TABLE shadow.calls AS TABLE public.calls")
    run = run_verify(service.url, database.dsn, REPLICATOR_SCHEMA="shadow")
    assert run.returncode == 0, run.stdout + run.stderr

    with psycopg.connect(database.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT recipient_id::text, sender_id::text, count(*) FROM shadow.messages"
            " WHERE read_at IS NULL GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 1"
        ).fetchone()
        assert row is not None
        recipient, sender, unread = row
        conn.execute(
            "UPDATE shadow.messages SET read_at = now() WHERE ctid = (SELECT ctid FROM"
            " shadow.messages WHERE recipient_id = %s AND sender_id = %s AND read_at IS NULL"
            " LIMIT 1)",
            (recipient, sender),
        )
        callee, caller = str(uuid.uuid4()), str(uuid.uuid4())
        conn.execute(
            "INSERT INTO shadow.calls (id, caller_id, callee_id, status, created_at)"
            " VALUES (-1, %s, %s, 'missed', now())",
            (caller, callee),
        )

    run = run_verify(service.url, database.dsn, REPLICATOR_SCHEMA="shadow")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(
        [
            f"differ  user={recipient} badge=unread_messages counterpart={sender}"
            f" service={unread} database={unread - 1}",
            f"differ  user={callee} badge=missed_calls counterpart={caller} service=0 database=1",
        ]
    )
    assert lines[-1].startswith(
        f"FAIL  2 differences between the service at {service.url} and the database (exact"
    )

    # The service itself still agrees with the tables it streams.
    assert run_verify(service.url, database.dsn).returncode == 0


def test_wrong_secret(database: Database, service: RunningService) -> None:
    run = run_verify(service.url, database.dsn, REPLICATOR_JWT_SECRET="another-secret-" + "x" * 32)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"replicator: the service at {service.url} refused the token"
        " (token signature does not verify); set REPLICATOR_JWT_SECRET"
    )


def test_service_unreachable(database: Database) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = run_verify(url, database.dsn)
    assert run.returncode == 2
    assert (
        run.stderr.strip() == f"replicator: cannot reach the service at {url}: connection refused"
    )


def test_database_unreachable(service: RunningService) -> None:
    port = free_port()
    run = run_verify(service.url, f"postgresql://postgres@127.0.0.1:{port}/app")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"replicator: cannot connect to the database at 127.0.0.1:{port}/app:"
    )


def test_sync_point_never_reached(service: RunningService) -> None:
    with pytest.raises(ReplicatorError) as caught:
        client(service).wait_applied(parse_lsn("FF/0"), timeout=0.2)
    assert re.fullmatch(
        r"the service at \S+ did not apply sync point FF/0 within 0\.2 s"
        r" \(applied [0-9A-F]+/[0-9A-F]+, streaming\)",
        str(caught.value),
    ), str(caught.value)


@pytest.mark.slow
def test_embedded_default_with_demo_traffic(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    embedded = {
        "DATABASE_URL": "",
        "REPLICATOR_JWT_SECRET": "",
        "REPLICATOR_DATA_DIR": str(data_dir),
        "REPLICATOR_DEMO_TRAFFIC": "true",
    }
    try:
        verify_and_doctor_on_the_embedded_default(data_dir, embedded)
    finally:
        # as root from a private directory the cluster lives under /var/lib/replicator
        PostgresCluster(embedded_bindir(), data_dir / "pgdata").remove()


def verify_and_doctor_on_the_embedded_default(data_dir: Path, embedded: dict[str, str]) -> None:
    with running_service("", "replicator", env=embedded) as svc:
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("REPLICATOR_") and k != "DATABASE_URL"
        }
        environ["REPLICATOR_DATA_DIR"] = str(data_dir)
        # The secret comes from the data directory, the database from the running server.
        verified = subprocess.run(
            [sys.executable, "-m", "replicator", "verify", "--url", svc.url],
            env=environ,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "agrees with the database" in verified.stdout

        checked = subprocess.run(
            [sys.executable, "-m", "replicator", "doctor"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert re.search(
            r"^ok\s+wal senders\s+.*\(1 streaming for the service\)$", checked.stdout, re.M
        )
        # Neither command stopped the server the service runs on.
        assert httpx.get(svc.url + "/readyz", timeout=10).status_code == 200
