"""Run ``replicator serve`` as a real process on a free port, and read its SSE streams."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from replicator.web.auth import mint_token
from tests.conftest import Server, create_database, drop_database
from tests.support import slot_env

SECRET = "test-secret-0123456789-abcdefghijklmnop"
_LISTEN = re.compile(r"listening on http://([\d.]+):(\d+)")


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    secret: str = SECRET
    #: reads the process's output into ``lines``; joined by ``stop`` so the log is whole
    reader: threading.Thread | None = None

    def token(self, user: str, **kwargs: Any) -> str:
        return mint_token(self.secret, user, **kwargs)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"service did not exit within {timeout} s of signal {sig}"
            ) from None
        finally:
            # the process has exited: its output ends, and so does the reader
            if self.reader is not None:
                self.reader.join(10)
        return code


def _pump(stream: Any, lines: list[str], found: threading.Event, port: list[int]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        match = _LISTEN.search(line)
        if match and not port:
            port.append(int(match.group(2)))
            found.set()
    found.set()


def start_service(
    dsn: str,
    slot: str | None,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60,
    command: list[str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> RunningService:
    environ = {
        **os.environ,
        "DATABASE_URL": dsn,
        # None: the slot is REPLICATOR_SLOT (from env) and the instance's own id
        **(slot_env(slot) if slot is not None else {}),
        "REPLICATOR_JWT_SECRET": SECRET,
        "REPLICATOR_HOST": "127.0.0.1",
        "REPLICATOR_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    process = subprocess.Popen(
        [*(command or [sys.executable, "-m", "replicator"]), "serve", *(args or [])],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []
    assert process.stdout is not None
    reader = threading.Thread(target=_pump, args=(process.stdout, lines, found, port), daemon=True)
    reader.start()
    if not found.wait(timeout) or not port:
        process.kill()
        raise AssertionError("service did not start:\n" + "\n".join(lines))
    service = RunningService(f"http://127.0.0.1:{port[0]}", process, lines, reader=reader)
    deadline = time.monotonic() + timeout
    while True:
        try:
            path = "/readyz" if wait_ready else "/healthz"
            if httpx.get(service.url + path, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            service.stop(signal.SIGKILL)
            raise AssertionError("service did not get ready:\n" + service.log)
        time.sleep(0.05)
    return service


@contextmanager
def running_service(dsn: str, slot: str | None, **kwargs: Any) -> Iterator[RunningService]:
    service = start_service(dsn, slot, **kwargs)
    try:
        yield service
    finally:
        service.stop()


@contextmanager
def service_on_new_database(server: Server, **kwargs: Any) -> Iterator[RunningService]:
    """A service on a database of its own on ``server``, dropped after."""
    db = create_database(server)
    try:
        with running_service(db.dsn, db.slot, **kwargs) as service:
            yield service
    finally:
        drop_database(db)


@dataclass
class Event:
    event: str
    data: Any
    id: str | None = None
    #: the data as sent (for ``badges-change``, only what changed; ``data`` is then the state)
    raw: Any = None


def merge_change(state: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """A ``badges-change`` applied to the state it follows, as a client does it."""
    merged = dict(state)
    for key, value in change.items():
        if isinstance(value, dict):
            counts = dict(merged.get(key, {}))
            for counterpart, count in value.items():
                if count:
                    counts[counterpart] = count
                else:
                    counts.pop(counterpart, None)
            merged[key] = counts
        else:
            merged[key] = value
    return merged


class EventReader:
    """Parses a text/event-stream into events (comments and retry lines are counted), and
    keeps the user's state as a client would: the last ``badges``, with later
    ``badges-change`` events merged into it."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.comments = 0
        self.retry: int | None = None
        self.state: dict[str, Any] | None = None
        #: events by kind, as received
        self.kinds: list[str] = []

    async def next(self, timeout: float = 30) -> Event:
        name, data, ident = "message", [], None
        with anyio.fail_after(timeout):
            async for line in self._lines:
                if not line:
                    if data:
                        return self._event(name, json.loads("\n".join(data)), ident)
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "event":
                    name = value
                elif key == "data":
                    data.append(value)
                elif key == "id":
                    ident = value
                elif key == "retry":
                    self.retry = int(value)
        raise AssertionError("stream ended")

    def _event(self, name: str, data: Any, ident: str | None) -> Event:
        self.kinds.append(name)
        if name == "badges":
            self.state = data
        elif name == "badges-change":
            assert self.state is not None, "a badges-change before any badges"
            self.state = merge_change(self.state, data)
            return Event(name, self.state, ident, data)
        return Event(name, data, ident, data)

    async def next_badges(self, timeout: float = 30) -> Event:
        """The next ``badges`` or ``badges-change``; its ``data`` is the state it leaves."""
        while True:
            event = await self.next(timeout)
            if event.event in ("badges", "badges-change"):
                return event

    async def until(self, predicate: Any, timeout: float = 30) -> Event:
        """The first event leaving a state that satisfies ``predicate`` (states may be
        skipped)."""
        with anyio.fail_after(timeout):
            while True:
                event = await self.next_badges(timeout)
                if predicate(event.data):
                    return event


@asynccontextmanager
async def open_stream(
    url: str,
    token: str | None,
    *,
    via: str = "header",
    timeout: float = 30,
    params: dict[str, str] | None = None,
) -> AsyncIterator[EventReader]:
    headers: dict[str, str] = {}
    params = dict(params or {})
    cookies: dict[str, str] = {}
    if token is not None:
        if via == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif via == "query":
            params["access_token"] = token
        else:
            cookies["access_token"] = token
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), cookies=cookies) as client:
        async with client.stream(
            "GET", url + "/v1/badges/stream", headers=headers, params=params
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise AssertionError(f"stream refused: {response.status_code} {response.text}")
            yield EventReader(response)


def stalled_stream(
    url: str, token: str, query: str = "", *, receive_buffer: int = 4096
) -> socket.socket:
    """Open a stream on a raw socket with a small receive buffer, then never read from it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET /v1/badges/stream{'?' + query if query else ''} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock
