"""Per-user fan-out: each stream holds only the latest state it has not sent yet.

A change touches only the changed users' streams; the event for a user's new state is
encoded once and the same bytes go to every device of that user. A stream that reads slowly
keeps one pending event, overwritten by newer ones, so it never delays anyone else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from sse_starlette import ServerSentEvent

from replicator.badges import BadgeState
from replicator.lsn import format_lsn

logger = logging.getLogger(__name__)


class LimitExceeded(Exception):
    """A new stream would exceed a configured limit; the message is safe to show."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def badges_payload(user: str, state: BadgeState) -> dict[str, object]:
    unread, missed = state.view(user)
    lsn = format_lsn(state.lsn)
    return {
        "user_id": user,
        "lsn": lsn,
        "unread_messages": unread,
        "missed_calls": missed,
        "total_unread_messages": sum(unread.values()),
        "total_missed_calls": sum(missed.values()),
    }


def encode_badges_event(user: str, state: BadgeState) -> bytes:
    payload = badges_payload(user, state)
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    event = ServerSentEvent(data=data, event="badges", id=str(payload["lsn"]), sep="\n")
    return event.encode()  # type: ignore[no-any-return]


def encode_status_event(live: bool, lag_ms: int) -> bytes:
    data = json.dumps({"live": live, "lag_ms": lag_ms}, separators=(",", ":"))
    return ServerSentEvent(data=data, event="status", sep="\n").encode()  # type: ignore[no-any-return]


class Subscriber:
    """One open stream: at most one pending badges event and one pending status event."""

    __slots__ = ("_wake", "badges", "closed", "status", "user")

    def __init__(self, user: str) -> None:
        self.user = user
        self.badges: bytes | None = None
        self.status: bytes | None = None
        self.closed = False
        self._wake: anyio.Event | None = None

    def notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    async def wait(self, timeout: float) -> None:
        """Wait until something is pending or ``timeout`` seconds pass."""
        if self.badges is not None or self.status is not None or self.closed:
            return
        wake = self._wake = anyio.Event()
        with anyio.move_on_after(timeout):
            await wake.wait()
        self._wake = None

    def take(self) -> bytes | None:
        status, badges = self.status, self.badges
        self.status = self.badges = None
        if status is not None and badges is not None:
            return status + badges
        return status if status is not None else badges


@dataclass
class HubStats:
    events_published: int = 0
    events_sent: int = 0
    streams_opened: int = 0
    streams_closed: int = 0


class Hub:
    """Subscribers by user, fed from the consumer's commits."""

    def __init__(
        self,
        state: Callable[[], BadgeState],
        *,
        max_per_user: int = 10,
        max_total: int = 20_000,
    ) -> None:
        self._state = state
        self.max_per_user = max_per_user
        self.max_total = max_total
        self._by_user: dict[str, set[Subscriber]] = {}
        self._count = 0
        self._closed = False
        self.stats = HubStats()

    @property
    def state(self) -> BadgeState:
        return self._state()

    @property
    def connected(self) -> int:
        return self._count

    @property
    def users_connected(self) -> int:
        return len(self._by_user)

    def subscribe(self, user: str) -> Subscriber:
        if self._closed:
            raise LimitExceeded("the service is shutting down", 503)
        subs = self._by_user.get(user)
        if subs is not None and len(subs) >= self.max_per_user:
            raise LimitExceeded(
                f"too many open streams for this user (limit {self.max_per_user})", 429
            )
        if self._count >= self.max_total:
            raise LimitExceeded(f"too many open streams (limit {self.max_total})", 503)
        if subs is None:
            subs = self._by_user[user] = set()
        sub = Subscriber(user)
        subs.add(sub)
        self._count += 1
        self.stats.streams_opened += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._by_user.get(sub.user)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._by_user[sub.user]
        self._count -= 1
        self.stats.streams_closed += 1

    def current_event(self, user: str) -> bytes:
        return encode_badges_event(user, self.state)

    def publish(self, lsn: int, users: set[str]) -> None:
        """After a commit: give every stream of each changed user the user's new state."""
        by_user = self._by_user
        if len(users) > len(by_user):
            targets = [u for u in by_user if u in users]
        else:
            targets = [u for u in users if u in by_user]
        state = self.state
        for user in targets:
            event = encode_badges_event(user, state)
            self.stats.events_published += 1
            for sub in by_user[user]:
                sub.badges = event
                sub.notify()

    def publish_status(self, live: bool, lag_ms: int) -> None:
        """Tell every stream whether counts are live (rare: the stream went down or up)."""
        event = encode_status_event(live, lag_ms)
        for subs in self._by_user.values():
            for sub in subs:
                sub.status = event
                sub.notify()

    def close(self) -> None:
        """End every stream promptly (shutdown)."""
        self._closed = True
        for subs in self._by_user.values():
            for sub in subs:
                sub.closed = True
                sub.notify()
        logger.info("closing %d open streams", self._count)
