"""uvicorn's HTTP protocol with the guards it lacks: a deadline for request heads, a size limit
on them however they arrive, and a cap on connections applied as they are accepted.

uvicorn's keep-alive timer restarts on every byte, so a client sending one byte every few
seconds (or nothing at all, on a fresh connection) holds a connection and its file descriptor
forever; a few thousand such clients lock everyone else out. Neither parser bounds a whole
head arriving in one segment. Here a head must be complete within ``header_timeout`` seconds
of its first byte (of the accept, for a new connection) and within ``max_head`` bytes, or the
connection gets a 408 or 431 and is closed; a connection beyond ``max_connections`` gets a
503 at once. Each is counted for ``/metrics``.

The service runs uvicorn's httptools protocol: a reconnecting crowd costs per request what
parsing and framing cost, and httptools' C parser takes well under half of h11's time for
them. The guards override uvicorn's ``connection_made``, ``connection_lost``,
``data_received``, ``on_headers_complete`` and ``on_response_complete``, so
pyproject pins uvicorn to the versions tested with them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

_END_OF_HEAD = b"\r\n\r\n"


def _reply(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ConnectionGuard:
    """The limits, and the counts of what they refused (shared by every connection)."""

    header_timeout: float = 10.0
    max_head: int = 16 * 1024
    max_connections: int = 21_000
    header_timeouts: int = 0
    heads_too_large: int = 0
    refused: int = 0
    replies: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.replies = {
            "timeout": _reply(
                408,
                "Request Timeout",
                "request_timeout",
                f"request headers not complete within {self.header_timeout:g} s",
            ),
            "too_large": _reply(
                431,
                "Request Header Fields Too Large",
                "headers_too_large",
                f"request head over {self.max_head} bytes",
            ),
            "refused": _reply(
                503, "Service Unavailable", "too_many_connections", "too many open connections"
            ),
        }


class GuardedProtocol(HttpToolsProtocol):
    """One connection; ``guard`` is set on the subclass ``protocol_class`` makes."""

    # Slots, not instance attributes: five more keys would grow every connection's
    # attribute dict from about 300 bytes to 1.6 kB.
    __slots__ = ("_awaiting_head", "_head_bytes", "_head_timer", "_refused", "_tail")

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        #: between requests, or inside a head: bytes of the head seen so far
        self._awaiting_head = True
        self._head_bytes = 0
        self._tail = b""
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if len(self.connections) >= guard.max_connections:
            self._refused = True
            guard.refused += 1
            transport.write(guard.replies["refused"])
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.guard.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.guard.header_timeouts += 1
            self._refuse("timeout")

    def _refuse(self, reply: str) -> None:
        self._disarm()
        self._awaiting_head = False
        self.transport.write(self.guard.replies[reply])
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._arm()
            seen = self._tail + data
            end = seen.find(_END_OF_HEAD)
            if end < 0:
                size = self._head_bytes + len(data)
                self._tail = seen[-3:]
            else:
                size = self._head_bytes + end + len(_END_OF_HEAD) - len(self._tail)
            if size > self.guard.max_head:
                self.guard.heads_too_large += 1
                self._refuse("too_large")
                return
            if end < 0:
                self._head_bytes = size
            else:
                self._disarm()
                self._awaiting_head = False
        super().data_received(data)

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before and cycle.scope.get("http_version") == "1.0":
            # HTTP/1.0 has no chunked coding: a body of unknown length (a stream) runs until
            # the connection closes, which it does after a 1.0 response
            cycle.chunked_encoding = False

    def on_response_complete(self) -> None:
        # The next request's head has its own deadline, from its first byte; until then
        # uvicorn's keep-alive timeout applies.
        self._awaiting_head = True
        self._head_bytes = 0
        self._tail = b""
        super().on_response_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request already buffered has started: its head is complete
            self._awaiting_head = False


def protocol_class(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A protocol class for uvicorn's ``http=`` setting, bound to ``guard``."""
    return type("Guarded", (GuardedProtocol,), {"guard": guard})
