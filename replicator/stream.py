"""The badge event stream: an sse-starlette response with one task per stream, not four."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from replicator.hub import Hub, Subscriber

RETRY_MS = 2000
HEARTBEAT = b": keep-alive\n\n"


async def badge_events(
    hub: Hub, sub: Subscriber, first: bytes, heartbeat: float
) -> AsyncIterator[bytes]:
    """The user's whole state at once, then every newer state; a comment line when idle."""
    monotonic = time.monotonic
    yield b"retry: %d\n" % RETRY_MS + first
    hub.stats.events_sent += 1
    # Each stream starts its heartbeat clock at a random phase, so that thousands of streams
    # opened together do not all wake in the same instant every interval.
    next_beat = monotonic() + heartbeat * random.uniform(0.2, 1.0)
    while not sub.closed:
        await sub.wait(next_beat - monotonic())
        data = sub.take()
        now = monotonic()
        if data is not None:
            yield data
            hub.stats.events_sent += 1
            next_beat = now + heartbeat
        elif now >= next_beat:
            yield HEARTBEAT
            next_beat = now + heartbeat


class BadgeStreamResponse(EventSourceResponse):
    """``EventSourceResponse`` whose stream runs beside the disconnect listener, and nothing else.

    The stream writes its own heartbeats (so no ping task) and the hub ends every stream at
    shutdown (so no exit-signal watcher): per open stream that is one task besides the
    request's own, which keeps memory per idle stream small.
    """

    def __init__(
        self,
        hub: Hub,
        sub: Subscriber,
        first: bytes,
        *,
        heartbeat: float,
        send_timeout: float,
    ) -> None:
        super().__init__(
            badge_events(hub, sub, first, heartbeat),
            ping=0,
            sep="\n",
            send_timeout=send_timeout,
            cleanup_timeout=2,
        )
        self._hub = hub
        self._sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] == "HEAD":
                await super().__call__(scope, receive, send)
                return
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self._stream_response(send)
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self._listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        except* OSError:
            pass  # the client went away, or stopped reading past the send timeout
        finally:
            self._hub.unsubscribe(self._sub)
