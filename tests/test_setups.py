"""Setups a DBA would choose, each counted exactly or refused with the fix: partitioned badge
tables, row security, invalidated and recreated slots, inheritance, renames and rewrites.

Each runs the random workload while the setup changes under a running service (or consumer),
then compares the end state with the badge queries and with what an open stream last showed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import psycopg
import pytest

from replicator.errors import DatabaseSetupError, SchemaError
from replicator.pg import ddl
from replicator.pipeline.consumer import Consumer, ConsumerOptions
from tests.conftest import Database
from tests.fault_support import assert_exact, resilient_workload, terminate_walsender
from tests.service_support import EventReader, RunningService, open_stream, running_service
from tests.support import (
    Counts,
    caught_up,
    database_counts,
    running_consumer,
    state_counts,
)
from tests.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PARTITIONED = """
ALTER PUBLICATION badges DROP TABLE messages;
DROP TABLE messages;
CREATE TABLE messages (
    id bigint GENERATED ALWAYS AS IDENTITY,
    sender_id uuid NOT NULL,
    recipient_id uuid NOT NULL,
    body text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at timestamptz,
    PRIMARY KEY (id)
) PARTITION BY RANGE (id);
ALTER TABLE messages REPLICA IDENTITY FULL;
CREATE TABLE messages_p0 PARTITION OF messages FOR VALUES FROM (MINVALUE) TO (400);
CREATE TABLE messages_p1 PARTITION OF messages FOR VALUES FROM (400) TO (800);
CREATE TABLE messages_rest PARTITION OF messages DEFAULT;
ALTER TABLE messages_p0 REPLICA IDENTITY FULL;
ALTER TABLE messages_p1 REPLICA IDENTITY FULL;
ALTER TABLE messages_rest REPLICA IDENTITY FULL;
CREATE INDEX idx_messages_read_at ON messages (recipient_id, sender_id) WHERE read_at IS NULL;
ALTER PUBLICATION badges ADD TABLE messages;
"""


async def sql(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement.encode())


async def without_ddl_signal(dsn: str) -> None:
    await sql(dsn, *(f"DROP EVENT TRIGGER {name}" for name in ddl.TRIGGERS))


async def stream_shows(stream: EventReader, user: str, expected: Counts) -> None:
    want = expected.get(user, ({}, {}))
    await stream.until(lambda d: (d["unread_messages"], d["missed_calls"]) == want, timeout=60)


@asynccontextmanager
async def watched(
    database: Database, user: str, **kwargs: Any
) -> AsyncIterator[tuple[RunningService, EventReader]]:
    with running_service(database.dsn, database.slot, **kwargs) as service:
        async with open_stream(service.url, service.token(user)) as stream:
            await stream.next_badges()
            yield service, stream
        assert service.process.poll() is None, "the service must not stop"


async def exact(service: RunningService, stream: EventReader, user: str, dsn: str) -> Counts:
    expected = await assert_exact(service, dsn)
    await stream_shows(stream, user, expected)
    return expected


# -- partitions ---------------------------------------------------------------------------------


async def snapshots(service: RunningService) -> float:
    return (await anyio.to_thread.run_sync(service.metrics))["replicator_snapshots_total"]


async def counted_afresh(service: RunningService, before: float) -> None:
    """Without the DDL signal a change is seen within the catalog check's interval."""
    with anyio.fail_after(60):
        while await snapshots(service) <= before:
            await anyio.sleep(0.05)


async def partition_lifecycle(database: Database, workload: Workload, *, signal: bool) -> None:
    dsn = database.dsn
    user = workload.people[1]
    async with watched(database, user) as (service, stream):

        async def afresh(*statements: str) -> None:
            before = await snapshots(service)
            await sql(dsn, *statements)
            if not signal:
                await counted_afresh(service, before)

        await workload.run(dsn, 30)
        await exact(service, stream, user, dsn)
        # a truncate of one partition leaves no row change behind: counted afresh
        await afresh("TRUNCATE messages_p0")
        await workload.run(dsn, 20)
        await exact(service, stream, user, dsn)
        # a new partition: its rows are followed from the first
        await sql(
            dsn,
            "CREATE TABLE messages_p9 PARTITION OF messages FOR VALUES FROM (100000) TO (200000)",
            *([] if signal else ["ALTER TABLE messages_p9 REPLICA IDENTITY FULL"]),
            "ALTER TABLE messages ALTER COLUMN id RESTART WITH 100000",
        )
        await workload.run(dsn, 30)
        expected = await exact(service, stream, user, dsn)
        assert expected
        # detached and dropped partitions take their rows away with no row change
        await afresh("ALTER TABLE messages DETACH PARTITION messages_p1")
        await workload.run(dsn, 10)
        await exact(service, stream, user, dsn)
        await afresh("DROP TABLE messages_p9")
        await sql(dsn, "ALTER TABLE messages ALTER COLUMN id RESTART WITH 300000")
        await workload.run(dsn, 20)
        # an existing table with rows attached: its rows join the counts
        await afresh(
            "ALTER TABLE messages ATTACH PARTITION messages_p1 FOR VALUES FROM (400) TO (800)"
        )
        await workload.run(dsn, 10)
        await exact(service, stream, user, dsn)
        assert await snapshots(service) >= 5
    assert "counting afresh from a new snapshot" in service.log


async def test_partitioned_table_with_the_ddl_signal(database: Database) -> None:
    await sql(database.dsn, PARTITIONED)
    await partition_lifecycle(database, Workload(seed=801), signal=True)


async def test_partitioned_table_with_the_catalog_watcher(database: Database) -> None:
    await without_ddl_signal(database.dsn)
    await sql(database.dsn, PARTITIONED)
    await partition_lifecycle(database, Workload(seed=802), signal=False)


async def test_partitioned_table_with_wal2json(wal2json_database: Database) -> None:
    db = wal2json_database
    await sql(db.dsn, PARTITIONED)
    workload = Workload(seed=803)
    await workload.run(db.dsn, 20)
    async with running_consumer(db.dsn, db.slot, decoder="wal2json") as consumer:
        await workload.run(db.dsn, 30)
        await sql(db.dsn, "TRUNCATE messages_p0")
        await sql(
            db.dsn,
            "CREATE TABLE messages_p9 PARTITION OF messages FOR VALUES FROM (100000) TO (200000)",
            "ALTER TABLE messages ALTER COLUMN id RESTART WITH 100000",
        )
        await workload.run(db.dsn, 30)
        await sql(db.dsn, "ALTER TABLE messages DETACH PARTITION messages_p1")
        await workload.run(db.dsn, 20)
        await caught_up(consumer, db.dsn)
        expected = await database_counts(db.dsn)
        assert state_counts(consumer.state) == expected and expected
        assert consumer.fresh_starts >= 1


async def test_a_partition_without_full_identity_stops_with_the_fix(database: Database) -> None:
    await without_ddl_signal(database.dsn)
    await sql(database.dsn, PARTITIONED)
    async with running_consumer(database.dsn, database.slot, stops=True) as consumer:
        await sql(
            database.dsn,
            "CREATE TABLE messages_p9 PARTITION OF messages FOR VALUES FROM (100000) TO (200000)",
            "ALTER TABLE messages ALTER COLUMN id RESTART WITH 100000",
            "INSERT INTO messages (sender_id, recipient_id)"
            " VALUES (gen_random_uuid(), gen_random_uuid())",
        )
        with anyio.fail_after(60):
            while consumer.error is None:
                await anyio.sleep(0.02)
    assert "ALTER TABLE public.messages_p9 REPLICA IDENTITY FULL" in consumer.error
    assert not consumer.live


async def test_publish_via_partition_root_is_refused_with_the_fix(database: Database) -> None:
    await sql(
        database.dsn, PARTITIONED, "ALTER PUBLICATION badges SET (publish_via_partition_root)"
    )
    with pytest.raises(DatabaseSetupError, match=r"publish_via_partition_root = false\)$"):
        await Consumer(ConsumerOptions(dsn=database.dsn, slot=database.slot)).run()


# -- row security -------------------------------------------------------------------------------


@contextmanager
def service_role(database: Database, *attributes: str) -> Iterator[str]:
    """A login role that may replicate and read the badge tables, as a service would run."""
    role = f"svc_{database.name}"
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        extra = " ".join(attributes)
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'svc-pw' {extra}".encode())
        conn.execute(f"GRANT SELECT ON messages, calls TO {role}".encode())
    conninfo = psycopg.conninfo.conninfo_to_dict(database.dsn)
    conninfo["user"] = role
    conninfo["password"] = "svc-pw"
    conninfo.pop("passfile", None)
    try:
        yield psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]
    finally:
        with psycopg.connect(database.server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


ROW_SECURITY = (
    "ALTER TABLE messages ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY own_messages ON messages USING (recipient_id::text = current_user)",
)


async def test_row_security_that_would_filter_the_snapshot_is_refused(database: Database) -> None:
    await Workload(seed=811).run(database.dsn, 20)
    await sql(database.dsn, *ROW_SECURITY)
    with service_role(database) as dsn:
        with pytest.raises(DatabaseSetupError) as caught:
            await Consumer(ConsumerOptions(dsn=dsn, slot=database.slot)).run()
    assert str(caught.value).startswith(
        "row-level security on public.messages would hide rows from role"
    )
    assert "BYPASSRLS" in str(caught.value)


async def test_row_security_bypassed_counts_every_row(database: Database) -> None:
    workload = Workload(seed=812)
    await workload.run(database.dsn, 20)
    await sql(database.dsn, *ROW_SECURITY)
    with service_role(database, "BYPASSRLS") as dsn:
        async with running_consumer(dsn, database.slot) as consumer:
            await workload.run(database.dsn, 40)
            await caught_up(consumer, database.dsn)
            expected = await database_counts(database.dsn)
            assert state_counts(consumer.state) == expected and expected


# -- slots --------------------------------------------------------------------------------------


@asynccontextmanager
async def locked_out(database: Database, dsn: str) -> AsyncIterator[None]:
    """The service's role may not connect for the block; its walsender is gone."""
    role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
    await sql(database.dsn, f"ALTER ROLE {role} NOLOGIN")
    try:
        await terminate_walsender(database.dsn, database.slot)
        yield
    finally:
        await sql(database.dsn, f"ALTER ROLE {role} LOGIN")


async def test_an_invalidated_slot_is_counted_afresh(database: Database) -> None:
    workload = Workload(seed=821)
    admin = database.server.admin_dsn
    with service_role(database) as dsn:
        async with running_consumer(dsn, database.slot) as consumer:
            await workload.run(database.dsn, 20)
            await caught_up(consumer, database.dsn)
            async with locked_out(database, dsn):
                await sql(admin, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
                await sql(admin, "SELECT pg_reload_conf()")
                try:
                    await workload.run(database.dsn, 20)
                    with anyio.fail_after(60):
                        while True:
                            # WAL past the limit, then a checkpoint, invalidate the slot
                            await sql(
                                database.dsn,
                                "INSERT INTO messages (sender_id, recipient_id, body)"
                                " SELECT gen_random_uuid(), gen_random_uuid(), repeat('x', 500)"
                                " FROM generate_series(1, 4000)",
                                "SELECT pg_switch_wal()",
                                "CHECKPOINT",
                            )
                            async with await psycopg.AsyncConnection.connect(admin) as conn:
                                cur = await conn.execute(
                                    "SELECT wal_status FROM pg_replication_slots"
                                    " WHERE slot_name = %s",
                                    (database.slot,),
                                )
                                row = await cur.fetchone()
                            if row is not None and row[0] == "lost":
                                break
                finally:
                    await sql(admin, "ALTER SYSTEM RESET max_slot_wal_keep_size")
                    await sql(admin, "SELECT pg_reload_conf()")
            await workload.run(database.dsn, 20)
            await caught_up(consumer, database.dsn)
            assert consumer.fresh_starts == 1
            assert state_counts(consumer.state) == await database_counts(database.dsn)


async def test_a_recreated_slot_of_our_name_is_counted_afresh(database: Database) -> None:
    workload = Workload(seed=822)
    with service_role(database) as dsn:
        async with running_consumer(dsn, database.slot) as consumer:
            await workload.run(database.dsn, 20)
            await caught_up(consumer, database.dsn)
            async with locked_out(database, dsn):
                await workload.run(database.dsn, 20)
                # another instance with our slot name drops ours and streams past us
                await sql(
                    database.dsn,
                    f"SELECT pg_drop_replication_slot('{database.slot}')",
                    f"SELECT pg_create_logical_replication_slot('{database.slot}', 'pgoutput')",
                )
                await workload.run(database.dsn, 20)
                await sql(
                    database.dsn,
                    "SELECT count(*) FROM pg_logical_slot_get_binary_changes("
                    f"'{database.slot}', NULL, NULL, 'proto_version', '1',"
                    " 'publication_names', 'badges')",
                )
            await workload.run(database.dsn, 20)
            await caught_up(consumer, database.dsn)
            assert consumer.fresh_starts == 1
            assert state_counts(consumer.state) == await database_counts(database.dsn)


async def test_a_slot_of_our_name_for_another_plugin_is_never_dropped(
    database: Database,
) -> None:
    await sql(
        database.dsn,
        f"SELECT pg_create_logical_replication_slot('{database.slot}', 'test_decoding')",
    )
    with pytest.raises(DatabaseSetupError, match="with plugin 'test_decoding'"):
        await Consumer(ConsumerOptions(dsn=database.dsn, slot=database.slot)).run()
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (database.slot,)
        )
        assert await cur.fetchone() == ("test_decoding",)


# -- inheritance, renames, rewrites, publications ------------------------------------------------


async def test_an_inheritance_child_is_refused(database: Database) -> None:
    await sql(database.dsn, "CREATE TABLE messages_archive () INHERITS (messages)")
    with pytest.raises(SchemaError, match=r"NO INHERIT public\.messages$"):
        await Consumer(ConsumerOptions(dsn=database.dsn, slot=database.slot)).run()


@pytest.mark.parametrize("signal", [True, False], ids=["ddl-signal", "catalog-watcher"])
async def test_a_renamed_badge_table_stops_the_stream(database: Database, signal: bool) -> None:
    if not signal:
        await without_ddl_signal(database.dsn)
    workload = Workload(seed=831)
    async with running_consumer(database.dsn, database.slot, stops=True) as consumer:
        await workload.run(database.dsn, 20)
        await sql(database.dsn, "CREATE SCHEMA old", "ALTER TABLE calls SET SCHEMA old")
        with anyio.fail_after(60):
            while consumer.error is None:
                await anyio.sleep(0.02)
    assert consumer.error == (
        "badge table public.calls is now old.calls (renamed or moved);"
        " change the badges file (or the name back) and restart"
    )


async def test_a_rewrite_with_using_is_counted_afresh(database: Database) -> None:
    workload = Workload(seed=832)
    user = workload.people[0]
    async with watched(database, user) as (service, stream):
        await workload.run(database.dsn, 30)
        # same type, new values, not one row change in the stream
        await sql(
            database.dsn,
            "ALTER TABLE calls DROP CONSTRAINT calls_status_check",
            "ALTER TABLE calls ALTER COLUMN status TYPE text"
            " USING CASE status WHEN 'missed' THEN 'answered' ELSE 'missed' END",
        )
        await resilient_workload(workload, database.dsn, 30)
        await exact(service, stream, user, database.dsn)
    assert "rewrote the table; counting afresh from a new snapshot" in service.log


async def test_a_row_filter_in_the_publication_is_refused(database: Database) -> None:
    if database.server.version < 15:
        pytest.skip("row filters exist from PostgreSQL 15 on")
    await sql(
        database.dsn,
        "ALTER PUBLICATION badges SET TABLE messages WHERE (read_at IS NULL), calls",
    )
    with pytest.raises(DatabaseSetupError, match=r"filters the rows of public\.messages"):
        await Consumer(ConsumerOptions(dsn=database.dsn, slot=database.slot)).run()


async def test_wal2json_follows_tables_with_dots_and_commas_in_their_names(
    wal2json_database: Database,
) -> None:
    from replicator.badges import spec as badge_spec

    db = wal2json_database
    table = '"odd, one"."to.do*list"'
    await sql(
        db.dsn,
        'CREATE SCHEMA "odd, one"',
        f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY"
        " PRIMARY KEY, owner text, done boolean NOT NULL DEFAULT false)",
        f"ALTER TABLE {table} REPLICA IDENTITY FULL",
        f"CREATE PUBLICATION odd FOR TABLE {table}",
    )
    specs = badge_spec.parse(
        '[[badge]]\nname = "todo"\ntable = "odd, one.to.do*list"\nuser = "owner"\n'
        'where = "done = false"\n'
    )
    insert = f"INSERT INTO {table} (owner, done) VALUES (%s, %s)"
    async with running_consumer(
        db.dsn, db.slot, decoder="wal2json", badges=specs, publication="odd"
    ) as consumer:
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
            for i in range(30):
                await conn.execute(insert, (f"u{i % 4}", i % 3 == 0))
            await conn.execute(f"UPDATE {table} SET done = true WHERE id % 5 = 0")
        await caught_up(consumer, db.dsn)
        expected = await database_counts(db.dsn, specs)
        assert state_counts(consumer.state) == expected and expected


def test_doctor_names_what_each_setup_needs(database: Database) -> None:
    from replicator.ops.doctor import FAIL, OK, WARN, connect, run_checks
    from tests.support import DEFAULT_SPECS

    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute(PARTITIONED.encode())
        for name in ddl.TRIGGERS:
            conn.execute(f"DROP EVENT TRIGGER {name}".encode())
        conn.execute(
            b"CREATE TABLE messages_p9 PARTITION OF messages FOR VALUES FROM (100000) TO (200000)"
        )
        conn.execute(b"ALTER PUBLICATION badges SET (publish_via_partition_root)")
        for statement in ROW_SECURITY:
            conn.execute(statement.encode())
    with service_role(database) as dsn, connect(dsn) as conn:
        checks = {
            c.name: c for c in run_checks(conn, publication="badges", slot="s", specs=DEFAULT_SPECS)
        }
    assert checks["publication"].status == FAIL
    assert (
        "ALTER PUBLICATION badges SET (publish_via_partition_root = false)"
        in checks["publication"].sql
    )
    assert checks["replica identity"].status == FAIL
    assert checks["replica identity"].sql == (
        "ALTER TABLE public.messages_p9 REPLICA IDENTITY FULL",
    )
    assert checks["row security"].status == FAIL
    assert checks["row security"].detail.startswith("public.messages would hide rows from svc_")
    assert checks["ddl signal"].status == WARN
    assert (
        checks["ddl signal"].sql[0].startswith("CREATE OR REPLACE FUNCTION replicator_ddl_signal")
    )
    assert checks["badges"].status == OK
