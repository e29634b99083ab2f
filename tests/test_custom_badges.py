"""Badges files of teams' own schemas, end to end: exact counts under a random workload on
PostgreSQL 15 and 18 and both decoders, through open streams, and across schema changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from replicator.badges.spec import BadgeSpec
from replicator.pg.lsn import parse_lsn
from replicator.pipeline.consumer import Consumer
from tests.conftest import Database
from tests.custom_schemas import INBOX, OPS, PUBLICATION, SCHEMAS, CustomSchema, TableWorkload
from tests.fault_support import admin_state, service_counts
from tests.service_support import open_stream, running_service
from tests.support import (
    Counts,
    caught_up,
    database_counts,
    running_consumer,
    slot_env,
    state_counts,
    sync_point,
    wait_applied,
)

pytestmark = pytest.mark.anyio


async def consume_workload(
    db: Database, schema: CustomSchema, *, seed: int, decoder: str = "pgoutput"
) -> Consumer:
    await schema.create(db.dsn)
    specs = schema.specs()
    workload = TableWorkload(schema, seed)
    await workload.run(db.dsn, 25)
    async with running_consumer(
        db.dsn, db.slot, decoder=decoder, badges=specs, publication=PUBLICATION
    ) as consumer:
        assert state_counts(consumer.state) == await database_counts(db.dsn, specs)
        await workload.run(db.dsn, 150)
        await caught_up(consumer, db.dsn)
        expected = await database_counts(db.dsn, specs)
        assert state_counts(consumer.state) == expected
        assert expected, "the workload should leave badges behind"
        assert consumer.feed.transactions > 100
    return consumer


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_random_workload_is_exact(database: Database, name: str) -> None:
    await consume_workload(database, SCHEMAS[name], seed=len(name))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_random_workload_is_exact_with_wal2json(
    wal2json_database: Database, name: str
) -> None:
    await consume_workload(
        wal2json_database, SCHEMAS[name], seed=70 + len(name), decoder="wal2json"
    )


def expected_event(user: str, counts: Counts, specs: list[BadgeSpec]) -> dict[str, Any]:
    held = counts.get(user, tuple({} for _ in specs))
    event: dict[str, Any] = {"user_id": user}
    for spec, by in zip(specs, held, strict=True):
        if spec.counterpart is not None:
            event[spec.name] = by
    for spec, by in zip(specs, held, strict=True):
        event[f"total_{spec.name}"] = sum(by.values())
    return event


@pytest.mark.parametrize("schema", [INBOX, OPS], ids=lambda s: s.name)
async def test_streams_show_the_exact_counts(
    database: Database, schema: CustomSchema, tmp_path: Path
) -> None:
    """The service with a badges file: every user's stream ends on the badge queries' counts,
    its event shaped by the file (maps of grouped badges, then every total, in file order)."""
    await schema.create(database.dsn)
    specs = schema.specs()
    workload = TableWorkload(schema, seed=11)
    await workload.run(database.dsn, 20)
    env = {
        "REPLICATOR_BADGES": str(schema.write_badges(tmp_path)),
        "REPLICATOR_PUBLICATION": PUBLICATION,
    }
    with running_service(database.dsn, database.slot, env=env) as service:
        last: dict[str, dict[str, Any]] = {}

        async def follow(user: str) -> None:
            async with open_stream(service.url, service.token(user)) as reader:
                while True:
                    event = await reader.next_badges(timeout=120)
                    last[user] = event.data

        async with anyio.create_task_group() as tg:
            for user in schema.users:
                tg.start_soon(follow, user)
            await workload.run(database.dsn, 120)
            target = await sync_point(database.dsn)
            expected = await database_counts(database.dsn, specs)
            with anyio.fail_after(60):
                while True:
                    state = await anyio.to_thread.run_sync(admin_state, service)
                    if parse_lsn(state["applied_lsn"]) >= target:
                        break
                    await anyio.sleep(0.05)
            assert service_counts(state, specs) == expected
            want = {user: expected_event(user, expected, specs) for user in schema.users}
            with anyio.fail_after(60):
                while any(
                    {k: v for k, v in last.get(user, {}).items() if k != "lsn"} != want[user]
                    for user in schema.users
                ):
                    await anyio.sleep(0.05)
            for user in schema.users:
                assert list(last[user]) == ["user_id", "lsn", *list(want[user])[1:]]
            tg.cancel_scope.cancel()


# -- schema changes on a custom table ----------------------------------------------------------


async def test_added_column_and_rewritten_table_stay_exact(database: Database) -> None:
    db, schema = database, INBOX
    await schema.create(db.dsn)
    specs = schema.specs()
    workload = TableWorkload(schema, seed=3)
    async with running_consumer(db.dsn, db.slot, badges=specs, publication=PUBLICATION) as consumer:
        await workload.run(db.dsn, 30)
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute("ALTER TABLE inbox.notes ADD COLUMN tag text DEFAULT 'x'")
            await workload.run(db.dsn, 30)
            # a rewrite of the whole table, and a type change of a column no badge reads
            await conn.execute("ALTER TABLE inbox.notes ALTER COLUMN body TYPE varchar(200)")
            await conn.execute("VACUUM FULL inbox.notes")
            await workload.run(db.dsn, 30)
            await conn.execute("ALTER TABLE inbox.notes DROP COLUMN tag")
        await workload.run(db.dsn, 30)
        await caught_up(consumer, db.dsn)
        assert state_counts(consumer.state) == await database_counts(db.dsn, specs)
        assert consumer.error is None


async def test_a_dropped_badge_column_stops_with_one_clear_error(database: Database) -> None:
    db, schema = database, INBOX
    await schema.create(db.dsn)
    specs = schema.specs()
    workload = TableWorkload(schema, seed=4)
    async with running_consumer(
        db.dsn, db.slot, badges=specs, publication=PUBLICATION, stops=True
    ) as consumer:
        await workload.run(db.dsn, 20)
        await caught_up(consumer, db.dsn)
        before = state_counts(consumer.state)
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute("ALTER TABLE inbox.notes DROP COLUMN mentions_owner")
            await conn.execute(
                "INSERT INTO inbox.notes (owner_id, author_id, priority) VALUES (1, 2, 5)"
            )
        with anyio.fail_after(60):
            while consumer.error is None:
                await anyio.sleep(0.02)
        # the DDL signal (or a Relation message, without it) names the table and the column
        assert consumer.error in (
            "badge 'unread_mentions': table inbox.notes has no column 'mentions_owner';"
            " add it, or fix the badges file",
            "table inbox.notes has no column mentions_owner any more;"
            " the unread_mentions badge needs it",
        )
        assert not consumer.live
        # nothing of the transaction that could not be counted shows
        assert state_counts(consumer.state) == before


async def test_a_badge_column_retyped_is_counted_afresh_or_refused(database: Database) -> None:
    """A new type the badges can compare: a fresh snapshot, exact. One they cannot: a stop
    naming the badge and why."""
    db, schema = database, INBOX
    await schema.create(db.dsn)
    specs = schema.specs()
    workload = TableWorkload(schema, seed=8)
    async with running_consumer(
        db.dsn, db.slot, badges=specs, publication=PUBLICATION, stops=True
    ) as consumer:
        await workload.run(db.dsn, 20)
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute("ALTER TABLE inbox.notes ALTER COLUMN priority TYPE integer")
            await workload.run(db.dsn, 20)
            await caught_up(consumer, db.dsn)
            assert consumer.fresh_starts >= 1
            assert state_counts(consumer.state) == await database_counts(db.dsn, specs)
            await conn.execute("ALTER TABLE inbox.notes ALTER COLUMN priority TYPE text")
            await conn.execute(
                "INSERT INTO inbox.notes (owner_id, author_id, priority) VALUES (1, 2, '5')"
            )
        with anyio.fail_after(60):
            while consumer.error is None:
                await anyio.sleep(0.02)
        assert consumer.error == (
            "badge 'urgent': where: priority >= 3: >= works on numeric columns only,"
            " and priority (text) is not one"
        )


async def test_an_unrelated_table_in_the_publication_is_ignored(database: Database) -> None:
    db, schema = database, OPS
    await schema.create(db.dsn)
    specs = schema.specs()
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        await conn.execute(f"ALTER PUBLICATION {PUBLICATION} ADD TABLE public.messages")
    async with running_consumer(db.dsn, db.slot, badges=specs, publication=PUBLICATION) as consumer:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO messages (sender_id, recipient_id)"
                " VALUES (gen_random_uuid(), gen_random_uuid())"
            )
        await TableWorkload(schema, seed=5).run(db.dsn, 20)
        await wait_applied(consumer, await sync_point(db.dsn))
        assert state_counts(consumer.state) == await database_counts(db.dsn, specs)


# -- doctor and verify with a badges file ----------------------------------------------------


def command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


async def test_doctor_checks_a_custom_schema_and_its_script_fixes_it(
    database: Database, tmp_path: Path
) -> None:
    db, schema = database, OPS
    await schema.create(db.dsn)
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE ops.alerts REPLICA IDENTITY DEFAULT")
        await conn.execute(f"ALTER PUBLICATION {PUBLICATION} DROP TABLE ops.alerts")
    env = {
        "DATABASE_URL": db.dsn,
        **slot_env(db.slot),
        "REPLICATOR_PUBLICATION": PUBLICATION,
        "REPLICATOR_BADGES": str(schema.write_badges(tmp_path)),
    }
    run = command("doctor", **env)
    assert run.returncode == 1, run.stdout + run.stderr
    failed = [line.split()[1:3] for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [
        ["publication", "team_badges"],
        ["replica", "identity"],
        ["index", "open_alerts"],
        ["index", "noisy"],
    ]
    assert "ok    badges" in run.stdout
    assert (
        "fix: CREATE INDEX CONCURRENTLY idx_alerts_open_alerts ON ops.alerts"
        " (\"userName\", source) WHERE acked_at is null and level in ('warn', 'error')"
    ) in run.stdout

    script = command("doctor", "--sql", **env)
    assert script.returncode == 1
    statements = [
        line.rstrip(";")
        for line in script.stdout.splitlines()
        if line and not line.startswith("--")
    ]
    assert statements == [
        f"ALTER PUBLICATION {PUBLICATION} ADD TABLE ops.alerts",
        "ALTER TABLE ops.alerts REPLICA IDENTITY FULL",
        'CREATE INDEX CONCURRENTLY idx_alerts_open_alerts ON ops.alerts ("userName", source)'
        " WHERE acked_at is null and level in ('warn', 'error')",
        'CREATE INDEX CONCURRENTLY idx_alerts_noisy ON ops.alerts ("userName") WHERE level <>'
        " 'debug' and (score > 2.5 or score is null) and muted is not true",
    ]
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement.encode())
    run = command("doctor", **env)
    assert run.returncode == 0, run.stdout + run.stderr
    served = r"ok +index open_alerts +idx_alerts_open_alerts serves open_alerts"
    assert re.search(served, run.stdout)
    assert re.search(r"ok +index noisy +idx_alerts_noisy serves noisy", run.stdout)


async def test_verify_compares_a_custom_schema(database: Database, tmp_path: Path) -> None:
    db, schema = database, INBOX
    await schema.create(db.dsn)
    await TableWorkload(schema, seed=21).run(db.dsn, 40)
    path = schema.write_badges(tmp_path)
    env = {"REPLICATOR_BADGES": str(path), "REPLICATOR_PUBLICATION": PUBLICATION}
    with running_service(db.dsn, db.slot, env=env) as service:
        await TableWorkload(schema, seed=22).run(db.dsn, 40)
        run = command(
            "verify",
            "--url",
            service.url,
            DATABASE_URL=db.dsn,
            REPLICATOR_JWT_SECRET=service.secret,
            **env,
        )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith(f"ok    the service at {service.url} agrees with the database")
