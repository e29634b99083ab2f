"""Per-user fan-out: each stream holds only the latest state it has not sent yet.

A change touches only the changed users' streams; the event for a user's new state is
encoded once and the same bytes go to every device of that user. A stream that reads slowly
keeps one pending event, overwritten by newer ones, so it never delays anyone else.

Heartbeats come from one wheel per interval rather than a timer per stream: each stream sits
in one of the wheel's slots, and each tick looks at one slot's streams and flags a heartbeat
for those that have been quiet too long. With ten thousand idle streams that is a few
comparisons per tick instead of ten thousand timers to arm, cancel and collect; first beats
are placed at random, so streams opened together never beat together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from sse_starlette import ServerSentEvent

from replicator.badges.state import BadgeState
from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

HEARTBEAT: bytes = ServerSentEvent(comment="keep-alive", sep="\n").encode()
#: how often per heartbeat interval the wheel looks at each stream
VISITS = 16
#: longest wheel tick
MAX_TICK_S = 0.25


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
    """The SSE bytes of a user's state, encoded once and shared by all the user's streams."""
    payload = badges_payload(user, state)
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    event = ServerSentEvent(data, event="badges", id=str(payload["lsn"]), sep="\n")
    return event.encode()


def encode_status_event(live: bool, lag_ms: int) -> bytes:
    data = json.dumps({"live": live, "lag_ms": lag_ms}, separators=(",", ":"))
    return ServerSentEvent(data, event="status", sep="\n").encode()


class Subscriber:
    """One open stream: at most one pending badges event, one status event, one heartbeat."""

    __slots__ = (
        "_waiter",
        "aborted",
        "badges",
        "beat_slot",
        "closed",
        "heartbeat",
        "last_sent",
        "send_deadline",
        "status",
        "task",
        "user",
    )

    def __init__(self, user: str) -> None:
        self.user = user
        self.badges: bytes | None = None
        self.status: bytes | None = None
        self.heartbeat = False
        self.closed = False
        self.aborted = False
        #: monotonic time by which the send in progress must be done; 0 when not sending
        self.send_deadline = 0.0
        #: monotonic time of the last write (the heartbeat wheel's clock for this stream)
        self.last_sent = 0.0
        #: the task writing this stream, cancelled if a send overstays its deadline
        self.task: asyncio.Task[object] | None = None
        self.beat_slot: set[Subscriber] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Wait until ``notify`` (something is pending, or the stream should end)."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self, *_: object) -> None:
        """End the stream after what is pending (shutdown or the client went away)."""
        self.closed = True
        self.notify()

    def abort(self) -> None:
        """Stop a stream stuck in a send: the client has stopped reading."""
        self.closed = self.aborted = True
        if self.task is not None:
            self.task.cancel()

    def take(self) -> bytes | None:
        """What to write next: pending events, else a due heartbeat, else nothing."""
        status, badges = self.status, self.badges
        if badges is not None:
            self.status = self.badges = None
            self.heartbeat = False
            return badges if status is None else status + badges
        if status is not None:
            self.status = None
            self.heartbeat = False
            return status
        if self.heartbeat:
            self.heartbeat = False
            return HEARTBEAT
        return None


class HeartbeatWheel:
    """Looks at each member ``VISITS`` times per interval, one slot of members per tick, and
    flags a heartbeat for a member that has written nothing for so long that waiting for the
    next look could leave it silent for more than the interval. A stream that carries events
    so gets no heartbeat it does not need; an idle one gets one about every interval."""

    def __init__(self, interval: float) -> None:
        round_s = interval / VISITS
        count = max(1, round(round_s / MAX_TICK_S))
        self.tick_s = round_s / count
        #: written nothing for this long: beat now, the next look (one round later, plus a
        #: tick for a late loop) would be too late
        self.quiet_s = interval - round_s - self.tick_s
        self.slots: list[set[Subscriber]] = [set() for _ in range(count)]
        self.position = 0
        self.next_at = time.monotonic() + self.tick_s

    def add(self, sub: Subscriber, now: float) -> None:
        slot = self.slots[random.randrange(len(self.slots))]
        slot.add(sub)
        sub.beat_slot = slot
        # A random past for the first beat: streams opened together (a restart, a
        # reconnecting crowd) then beat at spread times rather than in one wave.
        sub.last_sent = now - random.uniform(0, self.quiet_s)

    def turn(self, now: float) -> None:
        slot = self.slots[self.position]
        self.position = (self.position + 1) % len(self.slots)
        quiet_since = now - self.quiet_s
        for sub in tuple(slot):
            if sub.send_deadline and now > sub.send_deadline:
                logger.info("dropping a stream of %s: the client stopped reading", sub.user)
                sub.abort()
            elif sub.last_sent <= quiet_since:
                sub.heartbeat = True
                sub.notify()


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
        self._wheels: dict[float, HeartbeatWheel] = {}
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

    def blocked(self) -> int:
        """Streams in the middle of a write: their clients are not reading (fast enough)."""
        return sum(1 for subs in self._by_user.values() for s in subs if s.send_deadline)

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

    def beat(self, sub: Subscriber, interval: float) -> None:
        """Flag ``sub`` for a heartbeat at least every ``interval`` seconds (``run`` does it)."""
        wheel = self._wheels.get(interval)
        if wheel is None:
            wheel = self._wheels[interval] = HeartbeatWheel(interval)
        wheel.add(sub, time.monotonic())

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub.beat_slot is not None:
            sub.beat_slot.discard(sub)
            sub.beat_slot = None
        sub.task = None
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

    async def run(self) -> None:
        """Turn the heartbeat wheels (and drop streams whose sends overstay) until cancelled."""
        monotonic = time.monotonic
        while True:
            wheels = list(self._wheels.values())
            now = monotonic()
            due = min((w.next_at for w in wheels), default=now + MAX_TICK_S)
            await anyio.sleep(max(0.0, min(due, now + MAX_TICK_S) - now))
            now = monotonic()
            for wheel in wheels:
                # A late loop turns the slots it missed, but never more than once round.
                for _ in range(len(wheel.slots)):
                    if wheel.next_at > now:
                        break
                    wheel.turn(now)
                    wheel.next_at += wheel.tick_s
                if wheel.next_at <= now:
                    wheel.next_at = now + wheel.tick_s

    def close(self) -> None:
        """End every stream promptly (shutdown)."""
        self._closed = True
        for subs in self._by_user.values():
            for sub in subs:
                sub.close()
        logger.info("closing %d open streams", self._count)
