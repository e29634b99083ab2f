"""Never wrong, never stuck: each fault happens while the random workload runs, then exactness."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest

from replicator.ops.migrate import migrate
from replicator.runtime.cluster import PostgresCluster, embedded_bindir
from tests.conftest import TEST_SETTINGS, Database
from tests.fault_support import (
    assert_exact,
    resilient_workload,
    slot_rows,
    terminate_walsender,
)
from tests.service_support import (
    EventReader,
    RunningService,
    open_stream,
    running_service,
    stalled_stream,
    start_service,
)
from tests.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
#: these tests hold thousands of streams from one loopback address
ONE_ADDRESS = {"REPLICATOR_MAX_STREAMS_PER_ADDRESS": "100000"}


async def next_status(stream: EventReader, live: bool, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            event = await stream.next(timeout)
            if event.event == "status" and event.data["live"] is live:
                return


async def stream_shows(
    stream: EventReader, user: str, expected: dict[str, tuple[dict[str, int], dict[str, int]]]
) -> None:
    """The stream's latest state equals the database's counts for ``user``."""
    want = expected.get(user, ({}, {}))
    await stream.until(lambda d: (d["unread_messages"], d["missed_calls"]) == want, timeout=60)


def restartable(database: Database) -> PostgresCluster:
    cluster = database.server.cluster
    if cluster is None:
        pytest.skip("restarting PostgreSQL needs a server the tests started (--pg embedded/system)")
    return cluster


async def test_walsender_terminated_mid_stream(database: Database) -> None:
    workload = Workload(seed=401)
    await workload.run(database.dsn, 20)
    user = workload.people[0]
    with running_service(database.dsn, database.slot) as service:
        async with open_stream(service.url, service.token(user)) as stream:
            await stream.next_badges()
            async with anyio.create_task_group() as tg:
                tg.start_soon(resilient_workload, workload, database.dsn, 250)
                await anyio.sleep(0.3)
                await terminate_walsender(database.dsn, database.slot)
                await next_status(stream, live=False)
                await next_status(stream, live=True)
            expected = await assert_exact(service, database.dsn)
            await stream_shows(stream, user, expected)
        metrics = service.metrics()
    assert metrics["replicator_snapshots_total"] == 1, "a reconnect must not take a new snapshot"
    assert metrics["replicator_reconnects_total"] >= 1
    assert "retrying in" in service.log


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarts(database: Database, mode: str) -> None:
    cluster = restartable(database)
    workload = Workload(seed=402)
    await workload.run(database.dsn, 20)
    user = workload.people[1]
    with running_service(database.dsn, database.slot) as service:
        async with open_stream(service.url, service.token(user)) as stream:
            await stream.next_badges()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(resilient_workload, workload, database.dsn, 250)
                    await anyio.sleep(0.4)
                    await anyio.to_thread.run_sync(cluster.stop, mode)
                    await next_status(stream, live=False)
                    await anyio.sleep(0.5)
                    await anyio.to_thread.run_sync(cluster.start)
                    await next_status(stream, live=True)
            finally:
                if not cluster.is_running():
                    cluster.start()
            expected = await assert_exact(service, database.dsn)
            await stream_shows(stream, user, expected)
        metrics = service.metrics()
    assert metrics["replicator_snapshots_total"] == 1, "a restart must not take a new snapshot"


@contextmanager
def own_cluster(tmp_path: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(embedded_bindir(), tmp_path / "pg", settings=TEST_SETTINGS)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


async def test_postgres_down_when_the_service_starts(tmp_path: Path) -> None:
    with own_cluster(tmp_path) as cluster:
        dsn = cluster.dsn()
        migrate(dsn)
        workload = Workload(seed=403)
        await workload.run(dsn, 30)
        cluster.stop()
        service = start_service(dsn, "down_at_start", wait_ready=False)
        try:
            async with httpx.AsyncClient(base_url=service.url) as client:
                with anyio.fail_after(60):
                    while service.log.count("retrying in") < 2:
                        assert (await client.get("/healthz")).status_code == 200
                        assert (await client.get("/readyz")).status_code == 503
                        await anyio.sleep(0.2)
                cluster.start()
                with anyio.fail_after(120):
                    while (await client.get("/readyz")).status_code != 200:
                        await anyio.sleep(0.1)
            await workload.run(dsn, 50)
            await assert_exact(service, dsn)
            retries = [line for line in service.lines if "retrying in" in line]
            assert all("connection" in line.lower() for line in retries), retries
        finally:
            service.stop()


async def settled(service: RunningService, baseline: dict[str, float]) -> dict[str, float]:
    """The metrics once every stream has closed and what the streams held is released (or,
    after a bounded wait, as they are, for the caller's assertions to report)."""
    deadline = time.monotonic() + 60
    while True:
        after = service.metrics()
        if time.monotonic() > deadline or (
            after["replicator_streams_connected"] == 0
            and after["process_open_fds"] <= baseline["process_open_fds"] + 5
            and after["replicator_tasks"] <= baseline["replicator_tasks"] + 5
        ):
            return after
        await anyio.sleep(0.1)


def open_idle_streams(url: str, tokens: list[str], count: int) -> list[socket.socket]:
    return [stalled_stream(url, tokens[i % len(tokens)]) for i in range(count)]


async def test_sigterm_under_load_exits_promptly_and_drops_the_slot(database: Database) -> None:
    workload = Workload(seed=404, users=40)
    service = start_service(
        database.dsn, database.slot, env={"REPLICATOR_MAX_STREAMS_PER_USER": "100", **ONE_ADDRESS}
    )
    tokens = [service.token(u) for u in workload.people]
    socks = open_idle_streams(service.url, tokens, 2000)
    try:
        with anyio.fail_after(60):
            while service.metrics()["replicator_streams_connected"] < 2000:
                await anyio.sleep(0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(resilient_workload, workload, database.dsn, 100_000)
            await anyio.sleep(1.0)
            code = await anyio.to_thread.run_sync(lambda: service.stop(signal.SIGTERM, 15))
            tg.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()
    assert code == 0, service.log[-2000:]
    assert await slot_rows(database.dsn, database.slot) == []
    assert "dropped replication slot" in service.log


async def test_sigkill_then_restart_starts_afresh(database: Database) -> None:
    workload = Workload(seed=405)
    service = start_service(database.dsn, database.slot)
    async with anyio.create_task_group() as tg:
        tg.start_soon(resilient_workload, workload, database.dsn, 150)
        await anyio.sleep(0.5)
        service.stop(signal.SIGKILL)
    assert await slot_rows(database.dsn, database.slot) != [], "SIGKILL leaves the slot behind"
    await workload.run(database.dsn, 30)
    with running_service(database.dsn, database.slot) as again:
        await workload.run(database.dsn, 30)
        await assert_exact(again, database.dsn)
    assert "dropped leftover replication slot" in again.log


async def test_slot_dropped_by_an_administrator(database: Database) -> None:
    workload = Workload(seed=406)
    await workload.run(database.dsn, 30)
    user = workload.people[2]
    with running_service(database.dsn, database.slot) as service:
        async with open_stream(service.url, service.token(user)) as stream:
            await stream.next_badges()
            async with await psycopg.AsyncConnection.connect(
                database.dsn, autocommit=True
            ) as admin:
                with anyio.fail_after(30):
                    while True:
                        await terminate_walsender(database.dsn, database.slot)
                        try:
                            await admin.execute(
                                "SELECT pg_drop_replication_slot(%s)", (database.slot,)
                            )
                            break
                        except psycopg.errors.ObjectInUse:
                            await anyio.sleep(0.01)
                # changes while no slot exists reach clients through the fresh snapshot
                await admin.execute(
                    "INSERT INTO messages (sender_id, recipient_id)"
                    " SELECT %s, %s FROM generate_series(1, 7)",
                    (workload.people[3], user),
                )
            await resilient_workload(workload, database.dsn, 60)
            expected = await assert_exact(service, database.dsn)
            await stream_shows(stream, user, expected)
            metrics = service.metrics()
            assert metrics["replicator_snapshots_total"] == 2
            assert httpx.get(service.url + "/readyz", timeout=10).status_code == 200
        assert service.process.poll() is None, "the service must not crash"
    assert "is gone; counting afresh from a new snapshot" in service.log


async def test_schema_changes_that_keep_the_badge_columns(database: Database) -> None:
    workload = Workload(seed=407)
    await workload.run(database.dsn, 30)
    with running_service(database.dsn, database.slot) as service:
        steps = [
            "ALTER TABLE messages ADD COLUMN edited_at timestamptz",
            "ALTER TABLE calls ADD COLUMN duration_s int DEFAULT 0",
            "ALTER TABLE messages DROP COLUMN edited_at",
            # body dropped and added back: now it is the last column, after read_at
            "ALTER TABLE messages DROP COLUMN body;"
            " ALTER TABLE messages ADD COLUMN body text NOT NULL DEFAULT ''",
            # a rewrite of the whole table under a column type change
            "ALTER TABLE messages ALTER COLUMN created_at TYPE timestamp",
            "VACUUM FULL calls",
        ]
        for step in steps:
            async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
                for statement in step.split(";"):
                    await conn.execute(statement)  # type: ignore[arg-type]
            await workload.run(database.dsn, 25)
            await assert_exact(service, database.dsn)
        assert httpx.get(service.url + "/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ("ALTER TABLE messages DROP COLUMN read_at", "read_at"),
        ("ALTER TABLE calls RENAME COLUMN status TO state", "status"),
    ],
)
async def test_badge_column_lost_stops_with_a_clear_error(
    database: Database, change: str, column: str
) -> None:
    workload = Workload(seed=408)
    await workload.run(database.dsn, 20)
    user = workload.people[0]
    table = "messages" if "messages" in change else "calls"
    with running_service(database.dsn, database.slot) as service:
        async with open_stream(service.url, service.token(user)) as stream:
            before = (await stream.next_badges()).data
            async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
                await conn.execute(change)  # type: ignore[arg-type]
                if table == "messages":
                    await conn.execute(
                        "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                        (workload.people[1], user),
                    )
                else:
                    await conn.execute(
                        "INSERT INTO calls (caller_id, callee_id, state) VALUES (%s, %s, 'missed')",
                        (workload.people[1], user),
                    )
            await next_status(stream, live=False)
            with anyio.fail_after(30):
                while True:
                    ready = httpx.get(service.url + "/readyz", timeout=10)
                    if ready.status_code == 503 and ready.json().get("error"):
                        break
                    await anyio.sleep(0.1)
            message = ready.json()["error"]
            assert f"public.{table}" in message and column in message
            # nothing wrong is sent: the badges the stream shows stay those of before
            with anyio.move_on_after(1.0):
                event = await stream.next_badges()
                raise AssertionError(f"a badges event after the schema error: {event}")
            assert httpx.get(service.url + "/healthz", timeout=10).status_code == 200
            now = httpx.get(
                service.url + "/v1/badges",
                headers={"Authorization": f"Bearer {service.token(user)}"},
                timeout=10,
            ).json()
            assert now == before
    errors = [line for line in service.lines if "replication stopped" in line]
    assert len(errors) == 1 and f"public.{table}" in errors[0] and column in errors[0]


async def test_a_million_row_transaction_is_exact(database: Database) -> None:
    workload = Workload(seed=409)
    with running_service(database.dsn, database.slot) as service:
        await workload.run(database.dsn, 10)
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            await workload.big_transaction(conn, 1_000_000)
        await workload.run(database.dsn, 10)
        await assert_exact(service, database.dsn, timeout=300)


async def test_unexpected_row_values_count_for_nobody(database: Database) -> None:
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        # a user's own schema may allow what ours does not
        await conn.execute("ALTER TABLE messages ALTER COLUMN recipient_id DROP NOT NULL")
        await conn.execute("ALTER TABLE calls DROP CONSTRAINT calls_status_check")
    workload = Workload(seed=411)
    a, b = workload.people[:2]
    with running_service(database.dsn, database.slot) as service:
        async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, NULL) RETURNING id",
                (a,),
            )
            null_id = (await cur.fetchone() or [0])[0]
            cur = await conn.execute(
                "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'voicemail')"
                " RETURNING id",
                (a, b),
            )
            odd_id = (await cur.fetchone() or [0])[0]
            await conn.execute("UPDATE messages SET recipient_id = %s WHERE id = %s", (b, null_id))
            await conn.execute("UPDATE calls SET status = 'missed' WHERE id = %s", (odd_id,))
        await workload.run(database.dsn, 30)
        expected = await assert_exact(service, database.dsn)
        assert expected[b][0].get(a, 0) >= 1 and expected[b][1].get(a, 0) >= 1
        assert service.process.poll() is None
    log = service.log
    assert f"public.messages row id={null_id}" in log and "recipient_id" in log
    # a status no badge expects simply counts for nobody, as the badge query says
    assert f"public.calls row id={odd_id}" not in log


async def test_idle_clients_that_never_read_leak_nothing(database: Database) -> None:
    workload = Workload(seed=412, users=50)
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_MAX_STREAMS_PER_USER": "100", **ONE_ADDRESS}
    ) as service:
        await workload.run(database.dsn, 10)
        baseline = service.metrics()
        tokens = [service.token(u) for u in workload.people]
        socks = open_idle_streams(service.url, tokens, 1000)
        try:
            with anyio.fail_after(60):
                while service.metrics()["replicator_streams_connected"] < 1000:
                    await anyio.sleep(0.1)
            async with open_stream(service.url, tokens[0]) as reader:
                await reader.next_badges()
                await workload.run(database.dsn, 300)
                expected = await assert_exact(service, database.dsn)
                await stream_shows(reader, workload.people[0], expected)
            loaded = service.metrics()
        finally:
            for sock in socks:
                sock.close()
        after = await settled(service, baseline)
    grown = loaded["process_resident_memory_bytes"] - baseline["process_resident_memory_bytes"]
    # a queue per stream would hold ~300 events x 1,000 streams; a latest-state slot holds one
    assert grown < 80 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB for 1,000 idle streams"
    assert after["process_open_fds"] <= baseline["process_open_fds"] + 5
    assert after["replicator_tasks"] <= baseline["replicator_tasks"] + 5
    assert after["replicator_streams_opened_total"] == after["replicator_streams_closed_total"]


async def test_connect_disconnect_storm_leaks_nothing(database: Database) -> None:
    workload = Workload(seed=413, users=100)
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_MAX_STREAMS_PER_USER": "1000", **ONE_ADDRESS}
    ) as service:
        baseline = service.metrics()
        tokens = [service.token(u) for u in workload.people]
        host, port = service.url.removeprefix("http://").split(":")
        cycles = 10_000
        received = 0

        async def one(i: int) -> None:
            nonlocal received
            stream = await anyio.connect_tcp(host, int(port))
            async with stream:
                await stream.send(
                    f"GET /v1/badges/stream HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {tokens[i % len(tokens)]}\r\n\r\n".encode()
                )
                data = b""
                while b"event: badges" not in data and len(data) < 65536:
                    chunk = await stream.receive()
                    data += chunk
                    if i % 3 == 0:
                        break  # some leave before the first event arrives
                if b"event: badges" in data:
                    received += 1

        with anyio.fail_after(600):
            for start in range(0, cycles, 200):
                async with anyio.create_task_group() as tg:
                    for i in range(start, min(start + 200, cycles)):
                        tg.start_soon(one, i)
        after = await settled(service, baseline)
        await workload.run(database.dsn, 20)
        await assert_exact(service, database.dsn)
    assert received >= cycles * 0.6
    assert (
        after["replicator_streams_opened_total"] - baseline["replicator_streams_opened_total"]
        == cycles
    )
    assert after["replicator_streams_opened_total"] == after["replicator_streams_closed_total"]
    assert after["process_open_fds"] <= baseline["process_open_fds"] + 5
    assert after["replicator_tasks"] <= baseline["replicator_tasks"] + 5
