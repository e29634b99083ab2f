"""Silent, slow and too many connections: closed or refused, counted, and real streams flow."""

from __future__ import annotations

import re
import resource
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import Database
from tests.fault_support import assert_exact, resilient_workload
from tests.service_support import RunningService, open_stream, running_service
from tests.workload import Workload

pytestmark = pytest.mark.anyio

SILENT = 300
TRICKLING = 100


def address(service: RunningService) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (what it sent before is read and dropped)."""
    try:
        while chunk := sock.recv(65536):
            del chunk
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


async def trickle(host: str, port: int, stop: anyio.Event) -> bytes:
    """Send a request head one byte every 0.2 s, never finishing; return what came back."""
    head = (
        b"GET /v1/badges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\nX-Pad: " + b"p" * 200
    )
    reply = b""
    async with await anyio.connect_tcp(host, port) as stream:
        for byte in head:
            if stop.is_set():
                break
            try:
                await stream.send(bytes([byte]))
            except (anyio.BrokenResourceError, OSError):
                break
            with anyio.move_on_after(0.2):
                try:
                    reply += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
    return reply


async def test_silent_and_trickling_connections_are_closed_while_streams_flow(
    database: Database,
) -> None:
    workload = Workload(seed=901)
    await workload.run(database.dsn, 10)
    user = workload.people[0]
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_HEADER_TIMEOUT_S": "2"}
    ) as service:
        host, port = address(service)
        async with open_stream(service.url, service.token(user)) as stream:
            await stream.next_badges()
            silent = [socket.create_connection((host, port)) for _ in range(SILENT)]
            for sock in silent:
                sock.setblocking(False)
            replies: list[bytes] = []
            stop = anyio.Event()

            async def one_trickle() -> None:
                replies.append(await trickle(host, port, stop))

            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(TRICKLING):
                        tg.start_soon(one_trickle)
                    # real changes keep reaching the real stream meanwhile
                    tg.start_soon(resilient_workload, workload, database.dsn, 200)
                    with anyio.fail_after(60):
                        while not all(closed_by_server(s) for s in silent):
                            await anyio.sleep(0.2)
                    with anyio.fail_after(60):
                        while len(replies) < TRICKLING:
                            await anyio.sleep(0.2)
                    stop.set()
            finally:
                for sock in silent:
                    sock.close()
            expected = await assert_exact(service, database.dsn)
            want = expected.get(user, ({}, {}))
            await stream.until(lambda d: (d["unread_messages"], d["missed_calls"]) == want)
        metrics = service.metrics()
    assert all(r.startswith(b"HTTP/1.1 408 ") for r in replies), {r[:40] for r in replies}
    assert metrics["replicator_http_header_timeouts_total"] >= SILENT + TRICKLING


def test_a_huge_head_in_one_segment_is_refused(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        host, port = address(service)
        for pad in (20_000, 100_000):
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"
                )
                reply = b""
                try:
                    while chunk := sock.recv(65536):
                        reply += chunk
                except (ConnectionResetError, TimeoutError):
                    pass
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
            assert b'"error": "headers_too_large"' in reply
        ok = httpx.get(service.url + "/healthz", headers={"X-Pad": "a" * 8000}, timeout=10)
        assert ok.status_code == 200
        metrics = service.metrics()
    assert metrics["replicator_http_heads_too_large_total"] == 2


def low_open_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 400))


def test_a_flood_meets_a_clean_503_below_the_open_files_limit(database: Database) -> None:
    """Started with a soft limit of 256 and a hard one of 400 open files: the service raises
    its soft limit to 400 and accepts 300 connections, refusing the rest as they come."""
    with running_service(
        database.dsn,
        database.slot,
        env={"REPLICATOR_HEADER_TIMEOUT_S": "120"},
        preexec_fn=low_open_files_limit,
    ) as service:
        limits = Path(f"/proc/{service.process.pid}/limits").read_text()
        assert re.search(r"Max open files\s+400\s+400", limits), limits
        before = service.metrics()
        assert before["replicator_http_connections_limit"] == 300
        host, port = address(service)
        with httpx.Client(base_url=service.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200  # held open by the client
            flood = [socket.create_connection((host, port), timeout=10) for _ in range(400)]
            try:
                refused = 0
                for sock in flood:
                    sock.settimeout(0.05)
                    try:
                        reply = sock.recv(4096)
                    except TimeoutError:
                        continue  # accepted, waiting for its request
                    assert reply.startswith(b"HTTP/1.1 503 "), reply[:100]
                    refused += 1
                # the open-files limit was never reached: each connection got an answer
                assert refused >= 400 - 300
                assert client.get("/healthz").status_code == 200
            finally:
                for sock in flood:
                    sock.close()
            deadline = time.monotonic() + 60
            while client.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            metrics = client.get("/metrics").text
        assert f"replicator_http_connections_refused_total {float(refused)}" in metrics
