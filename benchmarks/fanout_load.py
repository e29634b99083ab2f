"""Load process for the fan-out benchmark: many SSE streams on raw asyncio sockets.

Driven by JSON lines on stdin, answering with JSON lines on stdout:
  {"cmd": "open", "total": N}       open streams until N are up (each has had its first event)
  {"cmd": "record"}                 forget what was received so far, start recording events
  {"cmd": "collect", "path": P}     write the recorded events to P as JSON
  {"cmd": "reconnect", "target": L} from now on, reconnect every stream that ends as badges.js
                                    does: when the service's ``reconnect`` event said, with the
                                    ticket it gave (one request); else, and after a failure, a
                                    ticket and then the stream, after waits of 1 s, 2, 4, ... up
                                    to 30 s, each +-10 %
  {"cmd": "storm", "path": P, "timeout": S}
                                    answer once every stream has the current state again (an
                                    event at LSN >= L, or the service saying it is live) or after
                                    S seconds; write each stream's attempts and the time it got
                                    there to P
Events are recorded as [user index, commit LSN, receive time]; the receive time is
``time.monotonic()``, the system-wide CLOCK_MONOTONIC that the writer reads too.
The process ends its streams and exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import socket
import struct
import sys
import time
from typing import Any, cast

from replicator.pg.lsn import parse_lsn
from replicator.web.auth import mint_token

CONNECT_TIMEOUT_S = 30.0
IN_FLIGHT = 200
#: RST on close: tens of thousands of client sockets in TIME_WAIT would exhaust the ports
LINGER_RESET = struct.pack("ii", 1, 0)
#: the audience the service wants in tokens (the parent's ``--audience``)
AUDIENCE = os.environ.get("FANOUT_JWT_AUDIENCE", "authenticated")


def user_id(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012x}"


#: badges.js's reconnect waits: the first, and the longest (ms), each +-10 %
MIN_DELAY_S, MAX_DELAY_S = 1.0, 30.0


class Recorder:
    """What all streams of this process received."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[tuple[int, bytes, float]] = []
        self.heartbeats = 0
        self.failed = 0
        self.ended = 0
        #: reconnecting: the LSN a stream must have seen again, and when each one did
        self.target: int | None = None
        self.reached: dict[int, float] = {}
        #: reconnecting: the start time of every attempt, by stream
        self.attempts: dict[int, list[float]] = {}


class SSEStream(asyncio.Protocol):
    """One ``GET /v1/badges/stream``: headers, chunked transfer coding, SSE events."""

    def __init__(
        self,
        index: int,
        request: bytes,
        recorder: Recorder,
        on_end: Any = None,
        *,
        ticket_request: bytes | None = None,
    ) -> None:
        self.index = index
        #: the stream's request; with a ticket request first, its ``{ticket}`` is filled in
        self.request = request
        self.ticket_request = ticket_request
        self.recorder = recorder
        #: called with the stream when its connection ends
        self.on_end = on_end
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._chunks = b""
        self._text = b""
        self._in_body = False
        #: what the service's ``reconnect`` event said: when to come back, and with which ticket
        self.come_back: tuple[float, str | None] | None = None
        #: whether the service answered (an HTTP head came back)
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # A browser's fetch of the ticket leaves a kept-alive connection that its
        # EventSource then uses: so does this.
        self.transport.write(self.ticket_request or self.request)

    def _ticket_answer(self) -> bool:
        """Read the ticket's answer; send the stream's request with it. False: not yet."""
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self._head[:end]
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(self._head) < end + 4 + length:
            return False
        body, self._head = self._head[end + 4 : end + 4 + length], self._head[end + 4 + length :]
        self.ticket_request = None
        self.answered = True
        if not head.startswith(b"HTTP/1.1 200"):
            self.recorder.failed += 1
            if not self.ready.done():
                self.ready.set_result(False)
            self.close()
            return False
        ticket = json.loads(body)["ticket"]
        assert self.transport is not None
        self.transport.write(self.request.replace(b"{ticket}", ticket.encode()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.recorder.ended += 1
        if not self.ready.done():
            self.ready.set_result(False)
        if self.on_end is not None:
            self.on_end(self)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.ticket_request is not None:
            self._head += data
            if not self._ticket_answer():
                return
            data, self._head = self._head, b""
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._in_body = True
            self.answered = True
            if not head.startswith(b"HTTP/1.1 200"):
                self.recorder.failed += 1
                if not self.ready.done():
                    self.ready.set_result(False)
                self.close()
                return
        self._chunks += data
        chunks = self._chunks
        pos = 0
        # Chunked transfer coding: "<hex size>\r\n<bytes>\r\n", repeated.
        while True:
            eol = chunks.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(chunks[pos:eol], 16)
            start = eol + 2
            if len(chunks) < start + size + 2:
                break
            self._text += chunks[start : start + size]
            pos = start + size + 2
        self._chunks = chunks[pos:]
        if b"\n\n" in self._text:
            *blocks, self._text = self._text.split(b"\n\n")
            for block in blocks:
                self._event(block, now)

    def _event(self, block: bytes, now: float) -> None:
        if block.startswith(b":"):
            self.recorder.heartbeats += 1
            return
        recorder = self.recorder
        if b"event: status" in block:
            # A stream opened while the new service was loading its snapshot got the state
            # before it; a user whose counts did not change gets no new state, only this: the
            # service is live, and the state shown is current.
            if recorder.target is not None and b'"live":true' in block:
                recorder.reached.setdefault(self.index, now)
            return
        if b"event: reconnect" in block:
            data = json.loads(block[block.index(b"data: ") + 6 :])
            self.come_back = (data["retry_ms"] / 1000, data.get("ticket"))
            return
        if b"event: badges" not in block:
            return
        if (
            recorder.target is not None
            and self.index not in recorder.reached
            and parse_lsn(self._lsn(block).decode()) >= recorder.target
        ):
            recorder.reached[self.index] = now
        if not self.ready.done():
            # The state on connect, not a change: never counted.
            self.ready.set_result(True)
            return
        if recorder.recording:
            recorder.events.append((self.index, self._lsn(block), now))

    @staticmethod
    def _lsn(block: bytes) -> bytes:
        start = block.index(b"id: ") + 4
        end = block.find(b"\n", start)
        return block[start:] if end < 0 else block[start:end]

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            transport.close()


class Load:
    def __init__(self, host: str, port: int, secret: str, first: int, count: int) -> None:
        self.host = host
        self.port = port
        self.secret = secret
        self.first = first
        self.count = count
        self.recorder = Recorder()
        self.streams: list[SSEStream] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: streams this process holds (open or coming back)
        self.count_open = 0

    def _request(self, index: int) -> bytes:
        token = mint_token(self.secret, user_id(index), ttl=6 * 3600, audience=AUDIENCE)
        return (
            f"GET /v1/badges/stream HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()

    async def _open_one(self, index: int, slots: asyncio.Semaphore) -> bool:
        loop = asyncio.get_running_loop()
        async with slots:
            stream = SSEStream(index, self._request(index), self.recorder)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: stream, self.host, self.port),
                    CONNECT_TIMEOUT_S,
                )
                ok = await asyncio.wait_for(stream.ready, CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                ok = False
            if ok:
                self.streams.append(stream)
            else:
                self.recorder.failed += 1
                stream.close()
            return ok

    async def open(self, total: int) -> dict[str, Any]:
        total = min(total, self.count)
        started = time.monotonic()
        slots = asyncio.Semaphore(IN_FLIGHT)
        wanted = range(self.first + len(self.streams), self.first + total)
        results = await asyncio.gather(*(self._open_one(i, slots) for i in wanted))
        self.count_open = len(self.streams)
        return {
            "open": len(self.streams),
            "failed": results.count(False),
            "seconds": round(time.monotonic() - started, 3),
        }

    def reconnect(self, target: int) -> dict[str, Any]:
        """From now on, streams that end come back as badges.js brings them back."""
        self.recorder.target = target
        self.recorder.reached = {}
        self.recorder.attempts = {}
        for stream in self.streams:
            stream.on_end = self._ended
        return {"reconnecting": len(self.streams)}

    def _ended(self, stream: SSEStream) -> None:
        with contextlib.suppress(ValueError):
            self.streams.remove(stream)
        task = asyncio.get_running_loop().create_task(
            self._come_back(stream.index, stream.come_back)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _come_back(self, index: int, told: tuple[float, str | None] | None) -> None:
        """As badges.js: when the service said, with the ticket it gave (one request) until
        the service answers without taking it; else after the backoff, each attempt with a
        ticket for the token."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        token = mint_token(self.secret, user_id(index), ttl=6 * 3600, audience=AUDIENCE)
        attempts = self.recorder.attempts.setdefault(index, [])
        host = f"Host: {self.host}:{self.port}\r\n"
        stream_request = (
            f"GET /v1/badges/stream?ticket={{ticket}} HTTP/1.1\r\n{host}"
            "Accept: text/event-stream\r\n\r\n"
        )
        given = told[1] if told is not None else None
        while True:
            if told is not None:
                wait, told = told[0], None
            else:
                delay = MIN_DELAY_S if not delay else min(delay * 2, MAX_DELAY_S)
                wait = delay * random.uniform(0.9, 1.1)
            await asyncio.sleep(wait)
            attempts.append(time.monotonic())
            if given is not None:
                stream = SSEStream(
                    index, stream_request.replace("{ticket}", given).encode(), self.recorder
                )
            else:
                stream = SSEStream(
                    index,
                    stream_request.encode(),
                    self.recorder,
                    ticket_request=f"POST /v1/badges/ticket HTTP/1.1\r\n{host}"
                    f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n".encode(),
                )
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda s=stream: s, self.host, self.port),  # type: ignore[misc]
                    CONNECT_TIMEOUT_S,
                )
                ok = await asyncio.wait_for(stream.ready, CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                ok = False
            transport = stream.transport
            if ok and transport is not None and not transport.is_closing():
                stream.on_end = self._ended
                self.streams.append(stream)
                return
            if stream.answered:
                given = None  # the service did not take the ticket: come back the usual way
            stream.close()

    async def storm(self, path: str, timeout: float) -> dict[str, Any]:
        """Wait until every stream has seen the target LSN again (or ``timeout``)."""
        rec = self.recorder
        deadline = time.monotonic() + timeout
        while len(rec.reached) < self.count_open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with open(path, "w") as f:
            json.dump({"reached": rec.reached, "attempts": rec.attempts}, f)
        return {"reached": len(rec.reached), "of": self.count_open}

    def record(self) -> dict[str, Any]:
        rec = self.recorder
        rec.events = []
        rec.heartbeats = 0
        rec.recording = True
        return {"recording": True}

    def collect(self, path: str) -> dict[str, Any]:
        rec = self.recorder
        rec.recording = False
        events = [[index, parse_lsn(lsn.decode()), t] for index, lsn, t in rec.events]
        with open(path, "w") as f:
            json.dump(events, f)
        return {
            "events": len(events),
            "heartbeats": rec.heartbeats,
            "ended": rec.ended,
            "open": len(self.streams) - rec.ended,
        }

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.on_end = None
            stream.close()


async def commands(load: Load) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            name = command["cmd"]
            if name == "open":
                answer = await load.open(int(command["total"]))
            elif name == "record":
                answer = load.record()
            elif name == "collect":
                answer = load.collect(command["path"])
            elif name == "reconnect":
                answer = load.reconnect(int(command["target"]))
            elif name == "storm":
                answer = await load.storm(command["path"], float(command["timeout"]))
            else:
                answer = {"error": f"unknown command {name!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        load.close()
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first user")
    parser.add_argument("--count", type=int, required=True, help="most streams to open")
    args = parser.parse_args()
    secret = os.environ["FANOUT_JWT_SECRET"]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load = Load(args.host, args.port, secret, args.first, args.count)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(commands(load))


if __name__ == "__main__":
    main()
