"""Readiness: steady on an idle database; a server gone without closing is noticed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import psycopg
import pytest

from replicator.pipeline.consumer import Consumer, ConsumerOptions
from tests.conftest import Database
from tests.service_support import running_service
from tests.support import caught_up, database_counts, state_counts, wait_live

pytestmark = pytest.mark.anyio

#: longer than every window readiness depends on (status every 10 s, 25 s of server silence)
IDLE_POLL_S = 35.0


async def test_ready_all_along_on_an_idle_database(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        answers: list[tuple[int, str]] = []
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            deadline = time.monotonic() + IDLE_POLL_S
            while time.monotonic() < deadline:
                response = await client.get("/readyz")
                answers.append((response.status_code, response.text))
                await anyio.sleep(0.5)
    not_ready = [a for a in answers if a[0] != 200]
    assert len(answers) > 50 and not not_ready, not_ready[:3]


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can go silent on its open connections without closing
    them (as a server that lost power, or a dropped network path, looks); new connections
    still pass."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._generation = 0
        self._frozen_below = 0
        self._released = anyio.Event()

    def freeze(self) -> None:
        self._frozen_below = self._generation

    def release(self) -> None:
        """Close the frozen connections (the server's side notices, as after its timeout)."""
        self._released.set()

    async def _pump(
        self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, generation: int
    ) -> None:
        try:
            async for chunk in source:
                if generation < self._frozen_below:
                    await self._released.wait()
                    return
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await sink.aclose()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self._generation += 1
        generation = self._generation
        async with client, await anyio.connect_tcp("127.0.0.1", self.upstream_port) as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, generation)
                tg.start_soon(self._pump, server, client, generation)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FreezingProxy]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()


async def test_a_server_gone_silent_is_noticed_and_replaced(database: Database) -> None:
    conninfo = psycopg.conninfo.conninfo_to_dict(database.dsn)
    async with FreezingProxy(int(conninfo["port"])).running() as proxy:  # type: ignore[arg-type]
        conninfo["port"] = str(proxy.port)
        dsn = psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]
        options = ConsumerOptions(
            dsn=dsn,
            slot=database.slot,
            status_interval=0.3,
            ready_silence=1.5,
            silence_timeout=3.0,
        )
        consumer = Consumer(options)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run)
            await wait_live(consumer)
            with anyio.fail_after(30):
                while not consumer.caught_up():
                    await anyio.sleep(0.05)
            proxy.freeze()
            with anyio.fail_after(30):
                while consumer.caught_up():
                    await anyio.sleep(0.05)
            reason = consumer.behind()
            assert reason is not None and "no message from the server" in reason
            with anyio.fail_after(60):
                while consumer.reconnects == 0:
                    await anyio.sleep(0.05)
            # The server's walsender holds the slot until it notices too (wal_sender_timeout);
            # here it is told at once by closing its side.
            proxy.release()
            with anyio.fail_after(60):
                while not consumer.caught_up():
                    await anyio.sleep(0.05)
            assert consumer.error is None and consumer.snapshots == 1
            async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as c:
                await c.execute(
                    "INSERT INTO messages (sender_id, recipient_id)"
                    " VALUES (gen_random_uuid(), gen_random_uuid())"
                )
            await caught_up(consumer, database.dsn)
            assert state_counts(consumer.state) == await database_counts(database.dsn)
            tg.cancel_scope.cancel()
        await consumer.shutdown()
