"""The badge event stream: one ASGI response per open stream, kept as small as it can be.

What an idle stream costs is what it keeps while suspended, times ten thousand. So a stream
is the request's own task waiting on one future, plus one small task that waits for the
client to hang up; no task group, cancel scope, lock or timer per stream. The hub flags
heartbeats, ends a stream whose token has expired, and drops one whose send has overstayed
``send_timeout`` (the client stopped reading), each at most a tick of its wheel late (a
sixteenth of the heartbeat interval, at most a quarter of a second).

What a write costs is paid for every event and every heartbeat of every stream, so under
uvicorn's httptools protocol (the one the service runs) a stream writes its body to the
connection itself once the response has started, framed as uvicorn would frame it, rather than
through every ASGI layer; the start and the end of the response still go through ASGI, and
under any other server every write does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from replicator.fanout.hub import HEARTBEAT, Hub, Subscriber
from replicator.web.headers import DATA_HEADERS

RETRY_MS = 2000
#: sent ahead of the first event, inside its block
RETRY: bytes = ServerSentEvent(retry=RETRY_MS, sep="\n").encode()[:-1]

#: the same for every stream, so shared rather than built per response
RAW_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *DATA_HEADERS,
]
START: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": RAW_HEADERS}
END: dict[str, Any] = {"type": "http.response.body", "body": b"", "more_body": False}


#: the scope key under which ``KeepServerSend`` keeps the server's own ``send``
SERVER_SEND = "replicator.server_send"
#: the module of uvicorn's request cycle whose connection a stream writes to itself
HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"
Writer = Callable[[bytes], Awaitable[None]]


class KeepServerSend:
    """The outermost ASGI layer: keeps the server's ``send`` in the scope for ``body_writer``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await self.app(scope, receive, send)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _as_is(data: bytes) -> bytes:
    return data


def _framer(scope: Scope, cycle: object) -> Callable[[bytes], bytes] | None:
    """How a stream may frame the body it writes to uvicorn's connection itself: as chunks,
    as it is (HTTP/1.0, where the body runs until the connection closes), or not at all
    (None: through ASGI). The cycle says which: runtime/connections.py turns chunks off for
    HTTP/1.0, and that protocol closes the connection after a 1.0 response."""
    if type(cycle).__module__ != HTTPTOOLS_CYCLE or not all(
        hasattr(cycle, name) for name in ("transport", "flow", "disconnected")
    ):
        return None
    chunked = getattr(cycle, "chunked_encoding", None)
    if chunked is True:
        return _chunk
    if chunked is False and scope.get("http_version") == "1.0":
        return _as_is
    return None


def body_writer(scope: Scope, send: Send) -> tuple[Writer, Callable[[bytes], bool] | None]:
    """Writers of the body of a started response of unknown length: one that waits while the
    client is slow, and (under uvicorn's httptools protocol) one that writes only when the
    connection takes the bytes at once and says whether it did."""
    cycle = getattr(scope.get(SERVER_SEND), "__self__", None)
    frame = _framer(scope, cycle)
    if frame is not None:
        transport, flow = cycle.transport, cycle.flow  # type: ignore[union-attr]

        async def direct(data: bytes) -> None:
            # what uvicorn does for a body message, without its bookkeeping
            if flow.write_paused and not cycle.disconnected:  # type: ignore[union-attr]
                await flow.drain()
            if not cycle.disconnected:  # type: ignore[union-attr]
                transport.write(frame(data))

        def now(data: bytes) -> bool:
            if flow.write_paused or cycle.disconnected:  # type: ignore[union-attr]
                return False
            transport.write(frame(data))
            return True

        return direct, now

    async def through_asgi(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    return through_asgi, None


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class BadgeStreamResponse(Response):
    """``text/event-stream`` of the user's state: all of it at once, then each newer state.

    Ends when the client hangs up, when the hub closes the stream (shutdown), when a send
    has not completed within ``send_timeout`` seconds, or after ``reauthenticate`` when the
    token expires.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: Hub,
        sub: Subscriber,
        first: bytes,
        *,
        heartbeat: float,
        send_timeout: float,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = RAW_HEADERS
        self._hub = hub
        self._sub = sub
        self._first = first
        self._heartbeat = heartbeat
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub, sub = self._hub, self._sub
        try:
            if scope["method"] == "HEAD":
                await send(START)
                await send(END)
                return
            listener = asyncio.get_running_loop().create_task(until_disconnect(receive))
            listener.add_done_callback(sub.close)
            try:
                sub.task = asyncio.current_task()
                hub.beat(sub, self._heartbeat)
                await send(START)
                try:
                    await self._stream(*body_writer(scope, send))
                finally:
                    sub.direct = None
                await send(END)
            finally:
                listener.cancel()
        except asyncio.CancelledError:
            if not sub.aborted:
                raise
            # Ours, from the hub: the client stopped reading, so end its stream.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except OSError:
            pass  # the client went away mid-send
        finally:
            hub.unsubscribe(sub)

    async def _stream(self, write: Writer, at_once: Callable[[bytes], bool] | None) -> None:
        sub, stats, timeout = self._sub, self._hub.stats, self._send_timeout
        first, self._first = RETRY + self._first, b""
        hub = self._hub
        hub.writing(sub, monotonic() + timeout)
        # Not counted as the stream's last write: its first heartbeat keeps the random
        # phase the wheel gave it.
        await write(first)
        hub.written(sub)
        stats.events_sent += 1
        # From now on the hub writes what it can at once, and this task what had to wait.
        sub.direct = at_once
        while True:
            data = sub.take()
            if data is None:
                if sub.closed:
                    break
                await sub.wait()
                continue
            now = monotonic()
            hub.writing(sub, now + timeout)
            await write(data)
            hub.written(sub)
            sub.last_sent = now
            if data is not HEARTBEAT:
                stats.events_sent += 1
