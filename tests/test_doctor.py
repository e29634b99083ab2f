"""``replicator doctor`` on real PostgreSQL: a migrated database passes, each broken item fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from replicator.ops.doctor import FAIL, OK, WARN, Check, connect, run_checks
from replicator.ops.migrate import migrate
from replicator.runtime.cluster import PostgresCluster, embedded_bindir, free_port
from replicator.runtime.embedded import embedded_database
from tests.conftest import Database
from tests.support import DEFAULT_SPECS, slot_env

CHECKS = [
    "server",
    "wal_level",
    "badges",
    "publication",
    "replica identity",
    "row security",
    "index unread_messages",
    "index missed_calls",
    "standby",
    "replication slots",
    "instances",
    "wal senders",
    "replication role",
    "table access",
    "inactive slots",
    "max_slot_wal_keep_size",
    "ddl signal",
]


def checks(dsn: str, slot: str = "replicator_x") -> dict[str, Check]:
    """The checks for a service whose instance streams from ``slot``."""
    with connect(dsn) as conn:
        prefix = slot_env(slot)["REPLICATOR_SLOT"]
        found = run_checks(conn, publication="badges", slot=prefix, specs=DEFAULT_SPECS)
    assert [c.name for c in found] == CHECKS
    return {c.name: c for c in found}


def failed(result: dict[str, Check]) -> set[str]:
    return {name for name, check in result.items() if check.status == FAIL}


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REPLICATOR_") and k != "DATABASE_URL"
    }
    return {**env, **extra}


def doctor(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "doctor"],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_migrated_database_passes(database: Database) -> None:
    result = checks(database.dsn, database.slot)
    assert failed(result) == set(), result
    assert result["wal_level"].detail == "logical"
    assert result["replication role"].detail.endswith("(superuser)")
    assert "idx_messages_read_at" in result["index unread_messages"].detail
    assert "idx_calls_missed_unread" in result["index missed_calls"].detail
    assert result["inactive slots"].status == OK
    if result["max_slot_wal_keep_size"].detail.startswith("-1"):
        assert result["max_slot_wal_keep_size"].status == WARN
        assert "ALTER SYSTEM SET max_slot_wal_keep_size" in str(
            result["max_slot_wal_keep_size"].fix
        )


def test_command_passes_with_one_line_per_check(database: Database) -> None:
    run = doctor(DATABASE_URL=database.dsn, **slot_env(database.slot))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"checking database {database.name} on 127.0.0.1:")
    status_lines = [line for line in lines[1:-1] if not line.startswith(" ")]
    assert len(status_lines) == len(CHECKS)
    for line, name in zip(status_lines, CHECKS, strict=True):
        assert re.match(rf"^(ok|warn)\s+{re.escape(name)}\s+\S", line), line
    assert re.match(rf"^all {len(CHECKS)} checks passed, \d+ warnings?$", lines[-1]), lines[-1]


def test_command_fails_on_replica_identity_default(database: Database) -> None:
    sql(database.dsn, "ALTER TABLE messages REPLICA IDENTITY DEFAULT")
    run = doctor(DATABASE_URL=database.dsn, **slot_env(database.slot))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("FAIL"))
    assert re.match(
        r"^FAIL\s+replica identity\s+public\.messages has replica identity default$", lines[at]
    )
    assert lines[at + 1].strip() == "fix: ALTER TABLE public.messages REPLICA IDENTITY FULL"
    assert sum(line.startswith("FAIL") for line in lines) == 1
    assert re.match(rf"^1 of {len(CHECKS)} checks failed", lines[-1])


def test_publication_missing(database: Database) -> None:
    sql(database.dsn, "DROP PUBLICATION badges")
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"publication"}
    assert result["publication"].detail == "badges does not exist"
    assert "CREATE PUBLICATION badges FOR TABLE public.messages, public.calls" in str(
        result["publication"].fix
    )


def test_table_not_in_publication(database: Database) -> None:
    sql(database.dsn, "ALTER PUBLICATION badges DROP TABLE calls")
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"publication"}
    assert result["publication"].detail == "badges lacks public.calls"
    assert result["publication"].fix == "ALTER PUBLICATION badges ADD TABLE public.calls"


def test_publication_without_every_operation(database: Database) -> None:
    sql(database.dsn, "ALTER PUBLICATION badges SET (publish = 'insert, update')")
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"publication"}
    assert result["publication"].detail == "badges does not publish delete, truncate"


def test_replica_identity_default(database: Database) -> None:
    sql(database.dsn, "ALTER TABLE calls REPLICA IDENTITY DEFAULT")
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"replica identity"}
    assert result["replica identity"].detail == "public.calls has replica identity default"
    assert result["replica identity"].fix == "ALTER TABLE public.calls REPLICA IDENTITY FULL"


def test_index_dropped_and_an_equivalent_one(database: Database) -> None:
    sql(database.dsn, "DROP INDEX idx_calls_missed_unread")
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"index missed_calls"}
    assert "no partial index on public.calls" in result["index missed_calls"].detail
    assert str(result["index missed_calls"].fix).startswith(
        "CREATE INDEX CONCURRENTLY idx_calls_missed_calls ON public.calls (callee_id, caller_id)"
        " WHERE status = 'missed' and seen_at is null"
    )

    # Not equivalent: a different predicate, or the wrong leading column.
    sql(
        database.dsn,
        "CREATE INDEX calls_missed ON calls (callee_id) WHERE status = 'missed'",
        "CREATE INDEX calls_by_caller ON calls (caller_id, callee_id)"
        " WHERE seen_at IS NULL AND status = 'missed'",
    )
    assert failed(checks(database.dsn, database.slot)) == {"index missed_calls"}

    sql(
        database.dsn,
        "CREATE INDEX calls_badge ON calls (callee_id) WHERE seen_at IS NULL AND status = 'missed'",
    )
    result = checks(database.dsn, database.slot)
    assert failed(result) == set()
    assert result["index missed_calls"].detail == "calls_badge serves missed_calls"


def test_inactive_slots_holding_wal(database: Database) -> None:
    gone = f"{database.slot}_gone"
    sql(
        database.dsn,
        f"SELECT pg_create_logical_replication_slot('{gone}', 'pgoutput')",
        f"SELECT pg_create_logical_replication_slot('{database.slot}', 'pgoutput')",
        "INSERT INTO messages (sender_id, recipient_id)"
        " SELECT gen_random_uuid(), gen_random_uuid() FROM generate_series(1, 500)",
    )
    result = checks(database.dsn, database.slot)
    assert failed(result) == {"inactive slots"}
    inactive = result["inactive slots"]
    assert re.search(
        rf"{gone} \(logical, database {database.name}\) holds \d+ (bytes|kB|MB) of WAL",
        inactive.detail,
    ), inactive.detail
    assert f"{database.slot} (logical, database {database.name}, an instance of the service" in (
        inactive.detail
    )
    assert f"SELECT pg_drop_replication_slot('{gone}');" in str(inactive.fix)
    assert "(1 of them the service's" in result["replication slots"].detail
    assert result["instances"].detail.startswith(f"1: {database.slot} (idle, ")


def test_role_that_may_not_replicate(database: Database) -> None:
    role = "doctor_" + uuid.uuid4().hex[:10]
    sql(database.dsn, f"CREATE ROLE {role} LOGIN PASSWORD 'doctor-pw'")
    conninfo = psycopg.conninfo.conninfo_to_dict(database.dsn)
    conninfo["user"] = role
    conninfo["password"] = "doctor-pw"
    dsn = psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]
    try:
        result = checks(dsn, database.slot)
        assert failed(result) == {"replication role", "table access"}, result
        assert result["replication role"].detail == f"{role} may not replicate"
        assert result["replication role"].fix is not None
        assert f'ALTER ROLE "{role}" REPLICATION' in result["replication role"].fix
        assert result["table access"].fix == (
            f'GRANT SELECT ON public.messages, public.calls TO "{role}"'
        )

        sql(
            database.dsn,
            f"GRANT SELECT ON messages, calls TO {role}",
            f"ALTER ROLE {role} REPLICATION",
        )
        result = checks(dsn, database.slot)
        assert failed(result) == set()
        assert result["replication role"].detail == f"{role} may replicate (REPLICATION attribute)"
    finally:
        sql(database.dsn, f"DROP OWNED BY {role}")
        sql(database.server.admin_dsn, f"DROP ROLE {role}")


@pytest.fixture
def replica_cluster(tmp_path: Path) -> Iterator[PostgresCluster]:
    """A server that cannot feed the service: no logical WAL, no senders, its one slot taken."""
    cluster = PostgresCluster(
        embedded_bindir(),
        tmp_path / "pgdata",
        settings={
            "wal_level": "replica",
            "max_wal_senders": "0",
            "max_replication_slots": "1",
            "max_slot_wal_keep_size": "1GB",
        },
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


def test_server_not_set_up_for_logical_replication(replica_cluster: PostgresCluster) -> None:
    dsn = replica_cluster.dsn()
    migrate(dsn)
    sql(
        dsn,
        "SELECT pg_create_physical_replication_slot('standby_gone', true)",
        "INSERT INTO messages (sender_id, recipient_id)"
        " SELECT gen_random_uuid(), gen_random_uuid() FROM generate_series(1, 500)",
    )
    result = checks(dsn)
    assert failed(result) == {"wal_level", "replication slots", "wal senders", "inactive slots"}
    assert result["wal_level"].detail == "replica; logical replication needs logical"
    assert (
        result["wal_level"].fix == "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
    )
    assert result["replication slots"].detail.startswith("1 of 1 used, 0 free")
    assert result["wal senders"].detail.startswith("0 of 0 active, 0 free")
    assert result["inactive slots"].detail.startswith("standby_gone (physical) holds ")
    assert result["max_slot_wal_keep_size"].status == OK
    assert result["max_slot_wal_keep_size"].detail.startswith("1GB")

    run = doctor(DATABASE_URL=dsn)
    assert run.returncode == 1
    fail_lines = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert [line.split()[1] for line in fail_lines] == [
        "wal_level",
        "replication",
        "wal",
        "inactive",
    ]


def test_unreachable_database_is_one_line() -> None:
    port = free_port()
    run = doctor(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/app")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"replicator: cannot connect to the database at 127.0.0.1:{port}/app:"
    )


@pytest.mark.slow
def test_embedded_default(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = doctor(REPLICATOR_DATA_DIR=str(data_dir))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith(f"all {len(CHECKS)} checks passed")
    cluster = PostgresCluster(embedded_bindir(), data_dir / "pgdata")
    assert not cluster.is_running(), "doctor left the server it started running"

    # A server already running there (a `replicator serve`) is checked and left running.
    try:
        with embedded_database(data_dir) as db:
            run = doctor(REPLICATOR_DATA_DIR=str(data_dir))
            assert run.returncode == 0, run.stdout + run.stderr
            assert db.cluster.is_running()
    finally:
        cluster.remove()
