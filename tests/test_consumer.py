"""The replication core against a real PostgreSQL: exact counts at every commit."""

from __future__ import annotations

import anyio
import psycopg
import pytest

from replicator.errors import DatabaseSetupError
from replicator.pg.lsn import parse_lsn
from replicator.pg.walsender import ReplicationConnection
from replicator.pipeline.consumer import Consumer, ConsumerOptions
from tests.conftest import Database
from tests.support import (
    caught_up,
    check_writes_during_startup,
    database_counts,
    running_consumer,
    state_counts,
    sync_point,
    wait_applied,
)
from tests.workload import Workload

pytestmark = pytest.mark.anyio


async def test_snapshot_counts_existing_rows(database: Database) -> None:
    workload = Workload(seed=1)
    await workload.run(database.dsn, 40)
    async with running_consumer(database.dsn, database.slot) as consumer:
        assert consumer.snapshot_rows > 0
        assert state_counts(consumer.state) == await database_counts(database.dsn)


async def test_random_workload_is_exact(database: Database) -> None:
    """Several hundred random transactions, a TRUNCATE and a 100,000-row transaction."""
    workload = Workload(seed=20261124)
    await workload.run(database.dsn, 30)
    async with running_consumer(database.dsn, database.slot) as consumer:
        await workload.run(database.dsn, 400, truncate_at=150, big_at=300)
        await caught_up(consumer, database.dsn)
        expected = await database_counts(database.dsn)
        assert state_counts(consumer.state) == expected
        assert expected, "the workload should leave badges behind"
        assert workload.rolled_back > 0
        assert consumer.feed.transactions > 300


async def test_each_commit_matches_the_database_as_of_that_commit(database: Database) -> None:
    """After every single transaction the state equals the badge queries, not only at the end."""
    workload = Workload(seed=7)
    async with running_consumer(database.dsn, database.slot) as consumer:
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            for _ in range(60):
                await workload.transaction(conn)
                await caught_up(consumer, database.dsn)
                assert state_counts(consumer.state) == await database_counts(database.dsn)


async def test_writes_during_startup_are_counted_once(database: Database) -> None:
    await check_writes_during_startup(database.dsn, database.slot, seed=99, decoder="pgoutput")


async def test_confirmed_flush_never_passes_applied_state(database: Database) -> None:
    workload = Workload(seed=5)
    confirmed_seen: list[int] = []
    async with running_consumer(database.dsn, database.slot, status_interval=0.05) as consumer:
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as admin:

            async def watch() -> None:
                while True:
                    cur = await admin.execute(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        (database.slot,),
                    )
                    row = await cur.fetchone()
                    assert row is not None and row[0] is not None
                    confirmed = parse_lsn(str(row[0]))
                    # applied_lsn only grows, so reading it after the slot is the strict check
                    assert confirmed <= consumer.applied_lsn
                    confirmed_seen.append(confirmed)
                    await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await workload.run(database.dsn, 150, big_at=50, big_rows=30_000)
                await caught_up(consumer, database.dsn)
                await anyio.sleep(0.3)
                tg.cancel_scope.cancel()
    assert len(set(confirmed_seen)) > 3, "the slot should have advanced while we watched"


async def test_idle_consumer_confirms_past_unrelated_wal(database: Database) -> None:
    """Writes to tables outside the publication must not pin WAL behind the slot."""
    async with running_consumer(database.dsn, database.slot, status_interval=0.1) as consumer:
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            await conn.execute("CREATE TABLE unrelated (x int)")
            await conn.execute("INSERT INTO unrelated SELECT generate_series(1, 1000)")
        target = await sync_point(database.dsn)
        await wait_applied(consumer, target)
        with anyio.fail_after(30):
            while True:
                async with await psycopg.AsyncConnection.connect(database.dsn) as conn:
                    cur = await conn.execute(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        (database.slot,),
                    )
                    row = await cur.fetchone()
                assert row is not None
                if parse_lsn(str(row[0])) >= target:
                    break
                await anyio.sleep(0.05)


async def test_clean_shutdown_drops_the_slot(database: Database) -> None:
    async with running_consumer(database.dsn, database.slot):
        pass
    async with await psycopg.AsyncConnection.connect(database.dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (database.slot,)
        )
        assert await cur.fetchone() == (0,)


async def test_missing_output_plugin_is_a_setup_error(database: Database) -> None:
    """Not a connection loss to retry forever: one clear error naming the plugin."""
    repl = await ReplicationConnection.open(database.dsn)
    try:
        with pytest.raises(DatabaseSetupError, match="output plugin 'no_such_plugin'"):
            await repl.create_slot(database.slot, "no_such_plugin")
    finally:
        await repl.close()


async def test_missing_publication_is_a_setup_error(database: Database) -> None:
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        await conn.execute("DROP PUBLICATION badges")
    consumer = Consumer(ConsumerOptions(dsn=database.dsn, slot=database.slot))
    with pytest.raises(DatabaseSetupError, match="publication 'badges' does not exist"):
        await consumer.run()
    assert consumer.error is not None


async def test_connection_lost_mid_transaction_counts_it_once(database: Database) -> None:
    """The server resends a transaction cut off by a lost connection from its Begin."""
    workload = Workload(seed=12)
    async with running_consumer(database.dsn, database.slot) as consumer:
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            await workload.big_transaction(conn, 300_000)
        with anyio.fail_after(120):
            while not (consumer.feed.in_transaction and consumer.feed.rows > 1000):
                await anyio.sleep(0.001)
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (database.slot,),
            )
        await workload.run(database.dsn, 10)
        await caught_up(consumer, database.dsn)
        assert consumer.reconnects >= 1
        assert state_counts(consumer.state) == await database_counts(database.dsn)


async def _batches(database: Database, linger: float, commits: int) -> int:
    """Read ``commits`` one-row transactions committed back to back, lingering ``linger``
    seconds between batches; how many batches it took (every commit must arrive)."""
    repl = await ReplicationConnection.open(database.dsn)
    try:
        lsn, _ = await repl.create_slot(database.slot, "pgoutput")
        await repl.start(database.slot, lsn, {"proto_version": "1", "publication_names": "badges"})
        seen, batches = [0], [0]
        done = anyio.Event()

        def on_xlogdata(payload: memoryview, start: int) -> None:
            if payload[0] == ord("C"):
                seen[0] += 1
                if seen[0] == commits:
                    done.set()

        def on_idle() -> None:
            batches[0] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: repl.stream(
                    on_xlogdata, lambda k: None, lambda: lsn, on_idle=on_idle, linger=linger
                )
            )
            async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as c:
                for i in range(commits):
                    await c.execute(
                        "INSERT INTO messages (sender_id, recipient_id, body)"
                        " VALUES (gen_random_uuid(), gen_random_uuid(), %s)",
                        (str(i),),
                    )
            with anyio.fail_after(60):
                await done.wait()
            tg.cancel_scope.cancel()
        return batches[0]
    finally:
        await repl.close()


async def test_changes_coming_close_together_are_read_in_batches(database: Database) -> None:
    """Commits back to back (well over 100 a second): with a linger, each wake-up reads the
    changes that gathered meanwhile, and every one of them arrives."""
    commits = 300
    assert await _batches(database, 0.05, commits) < commits / 4
