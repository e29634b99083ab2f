"""``badges-change`` through a real ``replicator serve``: merged as a client merges them, the
state equals the badge queries, bursts are merged per stream, and a change larger than the
whole state comes as the whole state."""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Database
from tests.service_support import (
    RunningService,
    merge_change,
    open_stream,
    running_service,
    stalled_stream,
)
from tests.support import database_counts

pytestmark = pytest.mark.anyio

USERS = [str(uuid.UUID(int=0xA000 + i, version=4)) for i in range(3)]
PEOPLE = [str(uuid.UUID(int=0xB000 + i, version=4)) for i in range(8)]
WIDE = str(uuid.UUID(int=0xC000, version=4))
#: senders of the wide user: its whole state (1.4 MB) is far larger than the socket buffers
WIDE_SENDERS = 30_000


def as_event(counts: tuple[dict[str, int], ...]) -> dict[str, Any]:
    unread, missed = counts
    return {
        "unread_messages": unread,
        "missed_calls": missed,
        "total_unread_messages": sum(unread.values()),
        "total_missed_calls": sum(missed.values()),
    }


def shown(state: dict[str, Any] | None) -> dict[str, Any]:
    assert state is not None
    return {k: v for k, v in state.items() if k not in ("user_id", "lsn")}


async def expected(dsn: str, user: str) -> dict[str, Any]:
    return as_event((await database_counts(dsn)).get(user, ({}, {})))


def random_transaction(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    """A few changes for the users: new messages and calls, reads, calls seen."""
    with conn.transaction():
        for _ in range(rng.randint(1, 4)):
            user, person = rng.choice(USERS), rng.choice(PEOPLE)
            op = rng.random()
            if op < 0.5:
                conn.execute(
                    "INSERT INTO messages (sender_id, recipient_id)"
                    " SELECT %s, %s FROM generate_series(1, %s)",
                    (person, user, rng.randint(1, 3)),
                )
            elif op < 0.7:
                conn.execute(
                    "UPDATE messages SET read_at = now() WHERE recipient_id = %s"
                    " AND sender_id = %s AND read_at IS NULL",
                    (user, person),
                )
            elif op < 0.9:
                conn.execute(
                    "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, 'missed')",
                    (person, user),
                )
            else:
                conn.execute(
                    "UPDATE calls SET seen_at = now() WHERE callee_id = %s AND seen_at IS NULL",
                    (user,),
                )


async def test_merged_changes_equal_the_badge_queries(database: Database) -> None:
    rng = random.Random(11)
    with running_service(database.dsn, database.slot) as service:
        async with (
            open_stream(service.url, service.token(USERS[0])) as first,
            open_stream(service.url, service.token(USERS[1])) as second,
            open_stream(service.url, service.token(USERS[0]), params={"events": "full"}) as full,
        ):
            for reader in (first, second, full):
                await reader.next_badges()
            with psycopg.connect(database.dsn, autocommit=True) as conn:
                for _ in range(150):
                    random_transaction(conn, rng)
            for user, reader in ((USERS[0], first), (USERS[1], second), (USERS[0], full)):
                want = await expected(database.dsn, user)
                await reader.until(lambda d, want=want: shown(d) == want, timeout=60)
                response = httpx.get(
                    service.url + "/v1/badges",
                    headers={"Authorization": f"Bearer {service.token(user)}"},
                )
                assert shown(response.json()) == want
            assert "badges-change" in first.kinds and "badges-change" in second.kinds
            assert set(full.kinds) <= {"badges", "status"}


# -- streams that do not read for a while ------------------------------------------------------


class RawStream:
    """An SSE stream on a raw socket that is not read until asked: chunked HTTP, then events
    kept as a client keeps them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.body = b""
        self.head_done = False
        self.kinds: list[str] = []
        self.state: dict[str, Any] | None = None

    def _take_chunks(self) -> None:
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self.buffer.startswith(b"HTTP/1.1 200"), self.buffer[:200]
            self.buffer, self.head_done = self.buffer[end + 4 :], True
        while True:
            eol = self.buffer.find(b"\r\n")
            if eol < 0:
                return
            size = int(self.buffer[:eol], 16)
            if len(self.buffer) < eol + 2 + size + 2:
                return
            self.body += self.buffer[eol + 2 : eol + 2 + size]
            self.buffer = self.buffer[eol + 2 + size + 2 :]

    def _take_events(self) -> None:
        *blocks, self.body = self.body.split(b"\n\n")
        for block in blocks:
            fields = dict(
                line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
            )
            kind = fields.get("event")
            if kind == "badges":
                self.state = json.loads(fields["data"])
            elif kind == "badges-change":
                assert self.state is not None
                self.state = merge_change(self.state, json.loads(fields["data"]))
            if kind is not None:
                self.kinds.append(kind)

    def read_until(self, predicate: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(1)
        while not (self.state is not None and predicate(self.state)):
            if time.monotonic() > deadline:
                raise AssertionError(f"state not reached; events so far: {self.kinds}")
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"stream ended; events so far: {self.kinds}")
            self.buffer += data
            self._take_chunks()
            self._take_events()


def admin_lsn_at_least(service: RunningService, user: str, want: dict[str, Any]) -> None:
    """Poll until the service's state for ``user`` is ``want`` (the commits were applied)."""
    headers = {"Authorization": f"Bearer {service.token(user)}"}
    deadline = time.monotonic() + 60
    while shown(httpx.get(service.url + "/v1/badges", headers=headers).json()) != want:
        assert time.monotonic() < deadline, "the service did not apply the burst"
        time.sleep(0.05)


def blocked_stream(service: RunningService, dsn: str) -> RawStream:
    """A stream of the wide user stuck in a write: its first event (the whole state, larger
    than the socket buffers) is still being sent when one change comes, and the write of
    that change waits for the client."""
    # a 64 kB window: small enough to block, large enough to read fast once read
    stream = RawStream(stalled_stream(service.url, service.token(WIDE), receive_buffer=65536))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)", (PEOPLE[0], WIDE)
        )
    deadline = time.monotonic() + 60
    while service.metrics()["replicator_streams_blocked"] < 1:
        assert time.monotonic() < deadline, "the stream never blocked"
        time.sleep(0.05)
    return stream


async def test_bursts_are_merged_per_stream_and_fall_back_to_the_whole_state(
    database: Database,
) -> None:
    dsn = database.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO messages (sender_id, recipient_id)"
            " SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(s), 12, '0'))::uuid, %s"
            " FROM generate_series(1, %s) s",
            (WIDE, WIDE_SENDERS),
        )
    env = {"REPLICATOR_SEND_TIMEOUT_S": "300"}
    with running_service(dsn, database.slot, env=env) as service:
        # 40 commits while the stream is stuck: it sends them as one merged change
        stream = blocked_stream(service, dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(40):
                conn.execute(
                    "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)",
                    (PEOPLE[i % len(PEOPLE)], WIDE),
                )
        want = await expected(dsn, WIDE)
        admin_lsn_at_least(service, WIDE, want)
        stream.read_until(lambda s: shown(s) == want)
        assert stream.kinds == ["badges", "badges-change", "badges-change"]
        stream.sock.close()

        # most senders read while the next stream is stuck: more moved than is left, so the
        # whole state comes instead of the merged change
        stream = blocked_stream(service, dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for part in range(4):
                conn.execute(
                    "UPDATE messages SET read_at = now() WHERE recipient_id = %s"
                    " AND sender_id <> ALL(%s) AND id %% 4 = %s",
                    (WIDE, PEOPLE[:2], part),
                )
        want = await expected(dsn, WIDE)
        assert len(want["unread_messages"]) == 2
        admin_lsn_at_least(service, WIDE, want)
        stream.read_until(lambda s: shown(s) == want)
        assert stream.kinds == ["badges", "badges-change", "badges"]
        stream.sock.close()

        # one commit that moves more than is left: the whole state, to a stream that reads
        async with open_stream(service.url, service.token(WIDE)) as reader:
            await reader.next_badges()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO messages (sender_id, recipient_id)"
                    " SELECT gen_random_uuid(), %s FROM generate_series(1, 5)",
                    (WIDE,),
                )
                conn.execute(
                    "UPDATE messages SET read_at = now() WHERE recipient_id = %s"
                    " AND sender_id <> %s",
                    (WIDE, PEOPLE[0]),
                )
            want = await expected(dsn, WIDE)
            await reader.until(lambda d: shown(d) == want)
            assert reader.kinds == ["badges", "badges-change", "badges"]


async def test_an_unknown_events_mode_is_refused_and_http_1_0_gets_a_plain_body(
    database: Database,
) -> None:
    with running_service(database.dsn, database.slot) as service:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                service.url + "/v1/badges/stream",
                params={"events": "some"},
                headers={"Authorization": f"Bearer {service.token(USERS[0])}"},
            )
        assert response.status_code == 400
        assert "events='some' is not known" in response.json()["message"]
        # HTTP/1.0 has no chunked coding: the events come as they are, not framed as chunks
        host, port = service.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                f"GET /v1/badges/stream HTTP/1.0\r\nHost: {host}\r\n"
                f"Authorization: Bearer {service.token(USERS[0])}\r\n\r\n".encode()
            )
            received = b""
            while b"event: badges\n" not in received:
                data = sock.recv(65536)
                assert data, received
                received += data
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
        assert body.startswith(b"retry: 2000\nid: ")
