"""More than one instance on PostgreSQL's own replication: identical settings, a dead instance's
slot reclaimed, rolling restarts, decoding on a standby (and its promotion), and nginx in
front of two instances while one dies."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from replicator.runtime.cluster import PostgresCluster, embedded_bindir, free_port
from tests.conftest import TEST_SETTINGS, Database, Server, create_database, drop_database
from tests.fault_support import assert_exact, resilient_workload
from tests.service_support import EventReader, running_service, start_service
from tests.support import Counts
from tests.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


async def slots(dsn: str, prefix: str) -> list[tuple[str, bool]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT slot_name, active FROM pg_replication_slots WHERE slot_name ~ %s"
            " ORDER BY slot_name",
            (f"^{prefix}_[a-z0-9]+$",),
        )
        return [(str(name), bool(active)) for name, active in await cur.fetchall()]


async def wait_for(condition: Any, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.1)


def same_settings(prefix: str, **extra: str) -> dict[str, str]:
    """What every instance of one deployment shares; nobody names a slot by hand."""
    return {"REPLICATOR_SLOT": prefix, "REPLICATOR_SLOT_GRACE_S": "2", **extra}


# -- several instances on one primary --------------------------------------------------------


async def test_instances_with_identical_settings_each_stream_from_their_own_slot(
    database: Database,
) -> None:
    workload = Workload(seed=1201)
    await workload.run(database.dsn, 20)
    prefix = f"inst{uuid.uuid4().hex[:6]}"
    env = same_settings(prefix)
    with running_service(database.dsn, None, env=env) as a:
        with running_service(database.dsn, None, env=env) as b:
            found = await slots(database.dsn, prefix)
            assert len(found) == 2 and all(active for _, active in found), found
            await workload.run(database.dsn, 40)
            await assert_exact(a, database.dsn)
            await assert_exact(b, database.dsn)
            # an instance killed: the other one drops its slot after the grace period,
            # while it keeps streaming
            a.stop(signal.SIGKILL)

            async def reclaimed() -> bool:
                return len(await slots(database.dsn, prefix)) == 1

            await resilient_workload(workload, database.dsn, 20)
            await wait_for(reclaimed)
            await assert_exact(b, database.dsn)
            assert "its instance has been gone for" in b.log
            # a rolling restart: the new instance starts while the old one still runs
            with running_service(database.dsn, None, env=env) as c:
                await workload.run(database.dsn, 20)
                b.stop()
                await workload.run(database.dsn, 20)
                await assert_exact(c, database.dsn)
                remaining = await slots(database.dsn, prefix)
                assert len(remaining) == 1 and remaining[0][1], remaining
            assert await slots(database.dsn, prefix) == []


async def test_an_instance_id_given_twice_is_refused(database: Database) -> None:
    env = same_settings("pinned", REPLICATOR_INSTANCE="one")
    with running_service(database.dsn, None, env=env) as first:
        second = start_service(database.dsn, None, env=env, wait_ready=False)
        assert second.process.wait(60) == 1
        second.stop()
        assert "replication slot 'pinned_one' is in use" in second.log
        await Workload(seed=1202).run(database.dsn, 20)
        await assert_exact(first, database.dsn)


# -- decoding on a standby ---------------------------------------------------------------------


@contextmanager
def primary_and_standby(root: Path, name: str) -> Iterator[tuple[Server, PostgresCluster]]:
    """PostgreSQL 18 (the embedded binaries) and a physical standby of it (pg_basebackup)."""
    primary = PostgresCluster(embedded_bindir(), root / f"{name}-primary", settings=TEST_SETTINGS)
    standby = PostgresCluster(embedded_bindir(), root / f"{name}-standby", settings=TEST_SETTINGS)
    try:
        primary.start()
        standby.init_standby(primary, f"{name}_physical")
        standby.start()
        yield Server("primary", primary.dsn(), primary, 18), standby
    finally:
        standby.remove()
        primary.remove()


@asynccontextmanager
async def on_standby(
    server: Server, standby: PostgresCluster
) -> AsyncIterator[tuple[Database, str]]:
    """A fresh database on the primary, and its DSN on the standby once it got there."""
    db = create_database(server)
    standby_dsn = standby.dsn(db.name)

    async def arrived() -> bool:
        try:
            async with await psycopg.AsyncConnection.connect(standby_dsn) as conn:
                cur = await conn.execute("SELECT to_regclass('public.messages') IS NOT NULL")
                return bool((await cur.fetchone() or [False])[0])
        except psycopg.OperationalError:
            return False

    await wait_for(arrived)
    try:
        yield db, standby_dsn
    finally:
        drop_database(db)


async def test_two_instances_decode_on_a_standby(tmp_root: Path) -> None:
    with primary_and_standby(tmp_root, "pair") as (server, standby):
        async with on_standby(server, standby) as (db, standby_dsn):
            workload = Workload(seed=1203)
            await workload.run(db.dsn, 20)
            env = same_settings("standby", REPLICATOR_PRIMARY_URL=db.dsn)
            with running_service(standby_dsn, None, env=env) as a:
                with running_service(standby_dsn, None, env=env) as b:
                    await workload.run(db.dsn, 40)
                    # sync points and the badge queries run on the primary
                    await assert_exact(a, db.dsn)
                    await assert_exact(b, db.dsn)
                    assert len(await slots(standby_dsn, "standby")) == 2
                    assert await slots(db.dsn, "standby") == [], "the primary decodes nothing"
                    # read-your-writes: the position comes from the primary, as an app reads it
                    async with await psycopg.AsyncConnection.connect(db.dsn) as conn:
                        cur = await conn.execute("SELECT pg_current_wal_insert_lsn()::text")
                        lsn = str((await cur.fetchone() or [""])[0])
                    answer = httpx.get(
                        a.url + "/v1/badges",
                        params={"min_lsn": lsn},
                        headers={"Authorization": f"Bearer {a.token(workload.people[0])}"},
                        timeout=30,
                    )
                    assert answer.status_code == 200, answer.text
            assert "pg_log_standby_snapshot" not in a.log, "the primary answered the nudge"


async def test_a_standby_promoted_keeps_the_service_exact(tmp_root: Path) -> None:
    with primary_and_standby(tmp_root, "promoted") as (server, standby):
        async with on_standby(server, standby) as (db, standby_dsn):
            workload = Workload(seed=1204)
            await workload.run(db.dsn, 20)
            env = same_settings("promo", REPLICATOR_PRIMARY_URL=db.dsn)
            with running_service(standby_dsn, None, env=env) as service:
                await workload.run(db.dsn, 20)
                await assert_exact(service, db.dsn)
                await anyio.to_thread.run_sync(standby.promote)
                # the old primary is out of the picture: writes go to the promoted server
                await resilient_workload(workload, standby_dsn, 40)
                await assert_exact(service, standby_dsn)
                assert service.process.poll() is None


# -- nginx in front --------------------------------------------------------------------------


def nginx_config(port: int, upstreams: list[str], home: Path) -> str:
    """docker/nginx.conf, listening on ``port`` in front of ``upstreams``."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    servers = "".join(f"        server {u} max_fails=1 fail_timeout=5s;\n" for u in upstreams)
    text = re.sub(
        r"(    upstream replicator \{\n)(?:        server .*\n)+", rf"\g<1>{servers}", text
    )
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("pid /tmp/replicator-nginx.pid;", f"pid {home}/nginx.pid;")
    temp = "".join(
        f"    {kind}_temp_path {home}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {\n", "http {\n" + temp, 1)


@contextmanager
def nginx(upstreams: list[str], home: Path) -> Iterator[str]:
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "nginx.conf").write_text(nginx_config(port, upstreams, home))
    process = subprocess.Popen(
        ["/usr/sbin/nginx", "-p", str(home), "-c", str(home / "nginx.conf"), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    error = process.stderr.read() if process.stderr else ""
                    raise AssertionError(f"nginx did not start: {error}") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(30)


async def test_nginx_in_front_of_two_instances_while_one_dies(
    database: Database, tmp_path: Path
) -> None:
    workload = Workload(seed=1205)
    await workload.run(database.dsn, 20)
    users = workload.people[:6]
    env = same_settings(f"lb{uuid.uuid4().hex[:6]}")
    with (
        running_service(database.dsn, None, env=env) as a,
        running_service(database.dsn, None, env=env) as b,
    ):
        upstreams = [x.url.removeprefix("http://") for x in (a, b)]
        with nginx(upstreams, tmp_path / "nginx") as url:
            last: dict[str, Any] = {}
            connects: dict[str, int] = {u: 0 for u in users}

            async def follow(user: str) -> None:
                # as badges.js does: reconnect whenever the stream ends
                while True:
                    try:
                        async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
                            async with client.stream(
                                "GET",
                                url + "/v1/badges/stream",
                                headers={"Authorization": f"Bearer {a.token(user)}"},
                            ) as response:
                                if response.status_code != 200:
                                    await anyio.sleep(0.2)
                                    continue
                                connects[user] += 1
                                reader = EventReader(response)
                                while True:
                                    event = await reader.next_badges(timeout=60)
                                    last[user] = event.data
                    except (httpx.HTTPError, AssertionError):
                        await anyio.sleep(0.2)

            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(follow, user)
                await workload.run(database.dsn, 30)
                a.stop(signal.SIGKILL)
                await resilient_workload(workload, database.dsn, 30)
                expected = await assert_exact(b, database.dsn)
                await wait_for(lambda: _all_show(last, users, expected))
                assert all(n >= 1 for n in connects.values())
                tg.cancel_scope.cancel()


async def _all_show(last: dict[str, Any], users: list[str], expected: Counts) -> bool:
    for user in users:
        want = expected.get(user, ({}, {}))
        got = last.get(user)
        if got is None or (got["unread_messages"], got["missed_calls"]) != want:
            return False
    return True
