"""Fault-test helpers: a workload that survives server restarts, and exactness checks."""

from __future__ import annotations

import random
from typing import Any

import anyio
import httpx
import psycopg

from replicator.badges.spec import BadgeSpec
from replicator.pg.lsn import parse_lsn
from tests.service_support import RunningService
from tests.support import DEFAULT_SPECS, Counts, database_counts, sync_point
from tests.workload import Workload


async def resilient_workload(
    workload: Workload, dsn: str, transactions: int, *, stop: anyio.Event | None = None
) -> int:
    """Run ``transactions`` transactions, reconnecting whenever the server goes away."""
    done = 0
    with anyio.fail_after(600):
        while done < transactions and not (stop is not None and stop.is_set()):
            try:
                async with await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, connect_timeout=5
                ) as conn:
                    while done < transactions and not (stop is not None and stop.is_set()):
                        await workload.transaction(conn)
                        done += 1
                        if done % 10 == 0:
                            await anyio.sleep(random.uniform(0, 0.02))
            except psycopg.OperationalError:
                await anyio.sleep(0.2)
    return done


def admin_state(service: RunningService) -> dict[str, Any]:
    token = service.token("verify", admin=True)
    response = httpx.get(
        service.url + "/v1/admin/badges",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def service_counts(state: dict[str, Any], specs: list[BadgeSpec] | None = None) -> Counts:
    """``/v1/admin/badges`` users as the badge queries' form (a total as ``{'': n}``)."""
    names = [s.name for s in (DEFAULT_SPECS if specs is None else specs)]
    return {
        user: tuple(
            dict(held[name])
            if isinstance(held[name], dict)
            else {"": held[name]}
            if held[name]
            else {}
            for name in names
        )
        for user, held in state["users"].items()
    }


async def assert_exact(service: RunningService, dsn: str, timeout: float = 120) -> Counts:
    """Wait until the service has applied everything committed so far; compare with the SQL."""
    target = await sync_point(dsn)
    with anyio.fail_after(timeout):
        while True:
            state = await anyio.to_thread.run_sync(admin_state, service)
            if parse_lsn(state["applied_lsn"]) >= target:
                break
            await anyio.sleep(0.05)
    expected = await database_counts(dsn)
    assert service_counts(state) == expected
    return expected


async def slot_rows(dsn: str, slot: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT slot_name, active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        return await cur.fetchall()


async def terminate_walsender(dsn: str, slot: str) -> int:
    """Kill the walsender streaming from ``slot``; return its pid."""
    with anyio.fail_after(30):
        while True:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT active_pid, pg_terminate_backend(active_pid)"
                    " FROM pg_replication_slots WHERE slot_name = %s AND active",
                    (slot,),
                )
                row = await cur.fetchone()
                if row is not None and row[1]:
                    return int(row[0])  # type: ignore[call-overload]
            await anyio.sleep(0.05)
