"""Per-user fan-out: each stream holds only what it has not sent yet, never a queue.

A commit touches only the changed users' streams. What changed for a user is encoded once as
a ``badges-change`` event (the counterparts whose counts moved and the new totals) and the
same bytes go to every device of that user, so an event costs what changed, not what the user
has. A stream that reads slowly holds the changes it has not sent; when it writes again they
are merged into one, and once they would be larger than the whole state, it gets the whole
state instead (``badges``), encoded when it is sent. Streams opened with ``?events=full`` get
whole states only, encoded once per user and commit.

A stream with nothing pending whose connection takes bytes at once (``Subscriber.direct``)
is written to right where the event is made, so an event, a status or a heartbeat costs one
write and no wake-up of the stream's task; the task writes only what had to wait.

Heartbeats come from one wheel per interval rather than a timer per stream: each stream waits
in the bucket of the tick its heartbeat would be due at, and is looked at then, once per
interval; a stream that wrote meanwhile just goes back in for later. With ten thousand idle
streams that is one look per heartbeat instead of ten thousand timers to arm, cancel and
collect; first beats are placed at random, so streams opened together never beat together.
The same look ends a stream whose token has expired, so expiry costs a stream one number,
not a timer. Streams stuck in a write are kept apart, and checked on every tick.

Shutdown tells every stream when to come back (``Hub.close``): a ``reconnect`` event whose
``retry_ms`` is spread over as long as taking them all back takes at ``reconnect_rate``, with
a ticket for the return when the tickets outlive the process. So after a restart the crowd
returns at the pace the service can take it, each client with one request.

Shares: limits per user, per client address and for anonymous sign-ins keep one party from
taking every stream, and the last ``reserved`` places under the cap go only to users who
are connected or were a moment ago, so their reconnects are served when the cap is near.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from sse_starlette import ServerSentEvent

from replicator.badges.state import BadgeState, Changes, Moved
from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

HEARTBEAT: bytes = ServerSentEvent(comment="keep-alive", sep="\n").encode()
#: the last event of a stream whose token has expired
REAUTHENTICATE: bytes = ServerSentEvent(
    '{"reason":"token expired"}', event="reauthenticate", sep="\n"
).encode()
#: longest wheel tick (how late a heartbeat may be looked at, and a stuck send noticed)
MAX_TICK_S = 0.25
#: a user whose last stream closed this recently still counts as connected for the reserve
REJOIN_S = 120.0
#: why a stream was refused (the label of replicator_streams_refused_total)
REFUSALS = ("user", "address", "anonymous", "reserve", "capacity", "shutdown")
#: changes a stream holds unmerged; beyond, they are merged at once (memory stays bounded)
MAX_PENDING = 16
#: ``?events=`` values: changes after the first state (the default), or whole states only
EVENT_MODES = ("changes", "full")
#: the soonest a stream is told to come back after a shutdown (the retry badges.js starts at)
RECONNECT_AFTER_S = 1.0
#: how much longer than its wait a ticket for coming back stays valid
RECONNECT_TICKET_S = 30.0


class LimitExceeded(Exception):
    """A new stream would exceed a configured limit; the message is safe to show."""

    def __init__(self, message: str, status_code: int, reason: str, retry_after: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.reason = reason
        self.retry_after = retry_after


def badges_payload(user: str, state: BadgeState) -> dict[str, object]:
    """A user's whole state: ``user_id``, ``lsn``, each grouped badge's map, then each total,
    badges in file order."""
    counts = state.view(user)
    payload: dict[str, object] = {"user_id": user, "lsn": format_lsn(state.lsn)}
    for name, grouped, by_counterpart in zip(state.names, state.grouped, counts, strict=True):
        if grouped:
            payload[name] = by_counterpart
    for name, by_counterpart in zip(state.names, counts, strict=True):
        payload["total_" + name] = sum(by_counterpart.values())
    return payload


def change_payload(
    user: str, lsn: int, moved: Moved, totals: Sequence[int], state: BadgeState
) -> dict[str, object]:
    """What changed: the same shape as the whole state, each map holding only the
    counterparts whose counts moved (0: cleared), and every total."""
    payload: dict[str, object] = {"user_id": user, "lsn": format_lsn(lsn)}
    for name, grouped, by_counterpart in zip(state.names, state.grouped, moved, strict=True):
        if grouped:
            payload[name] = by_counterpart
    for name, total in zip(state.names, totals, strict=True):
        payload["total_" + name] = total
    return payload


def encode_event(kind: str, payload: dict[str, object]) -> bytes:
    """One SSE block, ``id`` the payload's LSN (what ``ServerSentEvent`` writes, faster)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"id: {payload['lsn']}\nevent: {kind}\ndata: {data}\n\n".encode()


def encode_badges_event(user: str, state: BadgeState) -> bytes:
    """The SSE bytes of a user's state, encoded once and shared by all the user's streams."""
    return encode_event("badges", badges_payload(user, state))


def encode_reconnect_event(retry_ms: int, ticket: str | None) -> bytes:
    """The last event of a stream ended by shutdown: come back in ``retry_ms`` (``retry:`` for
    a plain ``EventSource``, the same in the data for badges.js), with ``ticket`` if given."""
    payload: dict[str, object] = {"reason": "shutdown", "retry_ms": retry_ms}
    if ticket is not None:
        payload["ticket"] = ticket
    data = json.dumps(payload, separators=(",", ":"))
    return f"retry: {retry_ms}\nevent: reconnect\ndata: {data}\n\n".encode()


def encode_status_event(live: bool, lag_ms: int) -> bytes:
    data = json.dumps({"live": live, "lag_ms": lag_ms}, separators=(",", ":"))
    return ServerSentEvent(data, event="status", sep="\n").encode()


class Change:
    """What one commit (or several, merged) changed for one user, shared by its streams."""

    __slots__ = ("event", "lsn", "moved", "pairs", "size", "totals", "user")

    def __init__(
        self, user: str, lsn: int, moved: Moved, totals: list[int], pairs: int, event: bytes
    ) -> None:
        self.user = user
        self.lsn = lsn
        self.moved = moved
        self.totals = totals
        #: the user's (badge, counterpart) counts after it: the size of the whole state
        self.pairs = pairs
        #: entries it lists
        self.size = sum(len(m) for m in moved)
        self.event = event


def merge_changes(changes: Sequence[Change], state: BadgeState) -> Change | None:
    """One change saying what ``changes`` said, in order; None when it would list more than
    the whole state holds (then the whole state is the smaller event)."""
    last = changes[-1]
    moved: Moved = [dict(m) for m in changes[0].moved]
    for change in changes[1:]:
        for into, more in zip(moved, change.moved, strict=True):
            into.update(more)
    if sum(len(m) for m in moved) > last.pairs:
        return None
    payload = change_payload(last.user, last.lsn, moved, last.totals, state)
    return Change(
        last.user, last.lsn, moved, last.totals, last.pairs, encode_event("badges-change", payload)
    )


class Subscriber:
    """One open stream: what it has not sent yet (the whole state, or changes), one status
    event, one heartbeat."""

    __slots__ = (
        "_waiter",
        "aborted",
        "address",
        "anonymous",
        "changes",
        "closed",
        "direct",
        "expires_at",
        "full",
        "heartbeat",
        "last",
        "last_sent",
        "send_deadline",
        "source",
        "status",
        "task",
        "user",
        "wheel",
        "whole",
    )

    def __init__(
        self,
        user: str,
        *,
        address: str | None = None,
        anonymous: bool = False,
        expires_at: float = math.inf,
        whole: bool = False,
        source: Hub | None = None,
    ) -> None:
        self.user = user
        self.address = address
        self.anonymous = anonymous
        #: monotonic time at which the token ends the stream
        self.expires_at = expires_at
        #: the stream's last event (token expired, shutdown) while it waits to be written,
        #: then b"" once it has been: nothing is written after it
        self.last: bytes | None = None
        #: whole states only (``?events=full``)
        self.whole = whole
        #: the next event is the whole state, encoded when it is sent
        self.full = False
        #: changes not sent yet, oldest first
        self.changes: list[Change] | None = None
        #: where whole states and merged changes are encoded
        self.source = source
        #: writes bytes to the client at once if its connection takes them (returns whether it
        #: did); set by the stream once its first event is out
        self.direct: Callable[[bytes], bool] | None = None
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
        #: the heartbeat wheel it is in (None: in none, or gone)
        self.wheel: HeartbeatWheel | None = None
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

    def expire(self) -> None:
        """The token has expired: say so, then end the stream."""
        self.end_with(REAUTHENTICATE)

    def end_with(self, event: bytes) -> None:
        """End the stream with ``event`` (token expired, shutdown); only the first last event
        counts. What is pending is dropped: the client gets the whole state when it comes
        back."""
        if self.last is not None:
            return
        self.full, self.changes, self.status, self.heartbeat = False, None, None, False
        if self._now(event):
            self.last = b""
            if self.source is not None:
                self.source.stats.events_sent += 1
        else:
            self.last = event
        self.closed = True
        self.notify()

    def _now(self, data: bytes) -> bool:
        """Write ``data`` at once, when nothing is waiting before it and the connection takes
        it; whether it did. Nothing goes after the end (a stream closed, or its last event)."""
        direct = self.direct
        if (
            direct is None
            or self.closed
            or self.send_deadline
            or self.full
            or self.changes is not None
            or self.status is not None
            or not direct(data)
        ):
            return False
        self.last_sent = time.monotonic()
        self.heartbeat = False
        return True

    def beat(self) -> None:
        """Nothing was written for a while: a heartbeat."""
        if not self._now(HEARTBEAT):
            self.heartbeat = True
            self.notify()

    def push_status(self, event: bytes) -> None:
        if not self._now(event):
            self.status = event
            self.notify()

    def push_full(self) -> None:
        """The user's state changed in a way only the whole state can tell."""
        source = self.source
        if (
            self.direct is not None
            and source is not None
            and self._now(source.whole_event(self.user))
        ):
            source.stats.events_sent += 1
            return
        self.full = True
        self.changes = None
        self.notify()

    def push(self, change: Change) -> None:
        """The user's state changed by ``change`` (after everything pushed before)."""
        if self.full or self.whole:
            # the whole state, encoded when it is sent, will include it
            self.push_full()
            return
        pending = self.changes
        if pending is None:
            if self._now(change.event):
                assert self.source is not None
                self.source.stats.events_sent += 1
                return
            self.changes = [change]
        else:
            pending.append(change)
            if len(pending) > MAX_PENDING:
                # A stream that does not keep up: merge now, so that it holds at most what
                # the whole state would.
                merged = self._merged(pending)
                if merged is None:
                    self.push_full()
                    return
                self.changes = [merged]
        self.notify()

    def _merged(self, pending: list[Change]) -> Change | None:
        assert self.source is not None
        return merge_changes(pending, self.source.state)

    def take(self) -> bytes | None:
        """What to write next: pending events, else a due heartbeat, else nothing."""
        last = self.last
        if last is not None:
            # Nothing pending is lost: the client gets the whole state when it comes back.
            self.last = b""
            self.full, self.changes, self.status, self.heartbeat = False, None, None, False
            return last or None
        status = self.status
        badges: bytes | None = None
        if self.full:
            self.full, self.changes = False, None
            assert self.source is not None
            badges = self.source.whole_event(self.user)
        elif self.changes is not None:
            pending, self.changes = self.changes, None
            if len(pending) == 1:
                badges = pending[0].event
            else:
                merged = self._merged(pending)
                if merged is None:
                    assert self.source is not None
                    badges = self.source.whole_event(self.user)
                else:
                    badges = merged.event
        if badges is not None:
            self.status = None
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
    """Flags a heartbeat for each member that has written nothing for almost the interval,
    looking at each member once per interval (about when its heartbeat would be due) rather
    than at every member on every tick.

    Members wait in buckets of one tick each, keyed by the tick they are due at; a turn takes
    the buckets whose time has come. A member that wrote meanwhile goes back in for its new
    due time, one that did not gets a heartbeat, and one whose token has expired is ended.
    A look comes at most a tick after the due time, and a turn at most a tick late, so a
    member whose due time is the interval less two ticks after its last write is never
    silent for longer than the interval. A member that leaves stays in its bucket, marked
    gone, until that bucket's turn.
    """

    def __init__(self, interval: float) -> None:
        self.tick_s = min(MAX_TICK_S, interval / 16)
        #: written nothing for this long: beat now (the look may be a tick late, the turn too)
        self.quiet_s = interval - 2 * self.tick_s
        #: tick number -> members due at it
        self.buckets: dict[int, list[Subscriber]] = {}
        #: time of tick 0 (the first add or turn), and the next tick to turn
        self.origin: float | None = None
        self.position = 0

    @property
    def next_at(self) -> float:
        """When the next tick is due (monotonic time); now if the wheel has not started."""
        if self.origin is None:
            return time.monotonic()
        return self.origin + self.position * self.tick_s

    def _schedule(self, sub: Subscriber, due: float) -> None:
        assert self.origin is not None
        tick = max(self.position, math.ceil((min(due, sub.expires_at) - self.origin) / self.tick_s))
        bucket = self.buckets.get(tick)
        if bucket is None:
            self.buckets[tick] = [sub]
        else:
            bucket.append(sub)

    def add(self, sub: Subscriber, now: float) -> None:
        if self.origin is None:
            self.origin = now
        sub.wheel = self
        # A random past for the first beat: streams opened together (a restart, a
        # reconnecting crowd) then beat at spread times rather than in one wave.
        sub.last_sent = now - random.uniform(0, self.quiet_s)
        self._schedule(sub, sub.last_sent + self.quiet_s)

    def turn(self, now: float) -> None:
        """Look at the members of every tick due by ``now``."""
        if self.origin is None:
            self.origin = now
        last = math.floor((now - self.origin) / self.tick_s)
        quiet_s, quiet_since = self.quiet_s, now - self.quiet_s
        buckets = self.buckets
        while self.position <= last:
            bucket = buckets.pop(self.position, None)
            self.position += 1
            if bucket is None:
                continue
            for sub in bucket:
                if sub.wheel is not self:
                    continue  # gone
                if now >= sub.expires_at:
                    if not sub.closed:
                        sub.expire()
                    continue
                if sub.last_sent <= quiet_since:
                    sub.beat()
                    self._schedule(sub, now + quiet_s)
                else:
                    self._schedule(sub, sub.last_sent + quiet_s)


@dataclass
class HubStats:
    events_published: int = 0
    events_sent: int = 0
    streams_opened: int = 0
    streams_closed: int = 0
    #: refusals by reason (REFUSALS)
    refused: Counter[str] = field(default_factory=Counter)


class Hub:
    """Subscribers by user, fed from the consumer's commits."""

    def __init__(
        self,
        state: Callable[[], BadgeState],
        *,
        max_per_user: int = 10,
        max_total: int = 20_000,
        max_per_address: int = 1_000_000,
        max_anonymous: int = 1_000_000,
        reserved: int = 0,
    ) -> None:
        self._state = state
        self.max_per_user = max_per_user
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.max_anonymous = max_anonymous
        self.reserved = reserved
        self._by_user: dict[str, set[Subscriber]] = {}
        self._by_address: dict[str, int] = {}
        self.anonymous = 0
        #: users whose last stream closed lately -> when, oldest first
        self._left: dict[str, float] = {}
        self._wheels: dict[float, HeartbeatWheel] = {}
        #: whole-state events encoded since the last commit, by user
        self._whole: dict[str, bytes] = {}
        self._count = 0
        #: streams in the middle of a write by their stream task
        self._sending: set[Subscriber] = set()
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

    @property
    def blocked(self) -> int:
        """Streams in the middle of a write: their clients are not reading (fast enough).

        Kept by ``writing``/``written`` so that reading it costs nothing.
        """
        return len(self._sending)

    def writing(self, sub: Subscriber, deadline: float) -> None:
        """``sub`` starts a write that must be done by ``deadline`` (monotonic time)."""
        sub.send_deadline = deadline
        self._sending.add(sub)

    def written(self, sub: Subscriber) -> None:
        if sub.send_deadline:
            self._sending.discard(sub)
            sub.send_deadline = 0.0

    def drop_stuck(self, now: float) -> None:
        """End the streams whose write has not completed by its deadline: their clients
        stopped reading."""
        for sub in [s for s in self._sending if now > s.send_deadline]:
            logger.info("dropping a stream of %s: the client stopped reading", sub.user)
            self._sending.discard(sub)
            sub.abort()

    def subscribe(
        self,
        user: str,
        *,
        address: str | None = None,
        anonymous: bool = False,
        expires: float = math.inf,
        whole: bool = False,
    ) -> Subscriber:
        """A new stream for ``user`` (from ``address``), ending at ``expires`` (epoch s);
        ``whole``: it gets whole states only."""
        subs = self._by_user.get(user)
        self._admit(user, subs, address, anonymous)
        if subs is None:
            subs = self._by_user[user] = set()
        expires_at = time.monotonic() + (expires - time.time()) if expires < math.inf else expires
        sub = Subscriber(
            user,
            address=address,
            anonymous=anonymous,
            expires_at=expires_at,
            whole=whole,
            source=self,
        )
        subs.add(sub)
        self._count += 1
        if address is not None:
            self._by_address[address] = self._by_address.get(address, 0) + 1
        if anonymous:
            self.anonymous += 1
        self.stats.streams_opened += 1
        return sub

    def _refuse(self, reason: str, message: str, status: int = 503) -> LimitExceeded:
        self.stats.refused[reason] += 1
        # Spread the retries of a refused crowd.
        retry = random.randint(5, 15) if status == 503 else 10
        return LimitExceeded(message, status, reason, 1 if reason == "shutdown" else retry)

    def _admit(
        self, user: str, subs: set[Subscriber] | None, address: str | None, anonymous: bool
    ) -> None:
        refuse = self._refuse
        if self._closed:
            raise refuse("shutdown", "the service is shutting down")
        if subs is not None and len(subs) >= self.max_per_user:
            raise refuse(
                "user", f"too many open streams for this user (limit {self.max_per_user})", 429
            )
        if address is not None and self._by_address.get(address, 0) >= self.max_per_address:
            raise refuse(
                "address",
                f"too many open streams from this address (limit {self.max_per_address})",
                429,
            )
        if anonymous and self.anonymous >= self.max_anonymous:
            raise refuse(
                "anonymous", f"too many streams of anonymous users (limit {self.max_anonymous})"
            )
        if self._count >= self.max_total:
            raise refuse("capacity", f"too many open streams (limit {self.max_total})")
        if self._count >= self.max_total - self.reserved and not self._known(user, subs):
            raise refuse(
                "reserve",
                f"the service is near its limit of {self.max_total} streams; the rest is"
                " kept for users already connected",
            )

    def _known(self, user: str, subs: set[Subscriber] | None) -> bool:
        """Connected now, or a moment ago (a reconnect)."""
        if subs:
            return True
        self._forget_left(time.monotonic())
        return user in self._left

    def _forget_left(self, now: float) -> None:
        left, cutoff = self._left, now - REJOIN_S
        while left:
            oldest = next(iter(left))
            if left[oldest] > cutoff:
                break
            del left[oldest]

    def beat(self, sub: Subscriber, interval: float) -> None:
        """Flag ``sub`` for a heartbeat at least every ``interval`` seconds (``run`` does it)."""
        wheel = self._wheels.get(interval)
        if wheel is None:
            wheel = self._wheels[interval] = HeartbeatWheel(interval)
        wheel.add(sub, time.monotonic())

    def unsubscribe(self, sub: Subscriber) -> None:
        self.written(sub)  # a write cut short (abort, shutdown) still counted as going on
        sub.wheel = None
        sub.task = None
        subs = self._by_user.get(sub.user)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._by_user[sub.user]
            now = time.monotonic()
            self._left.pop(sub.user, None)
            self._left[sub.user] = now
            self._forget_left(now)
        if sub.address is not None:
            left = self._by_address[sub.address] - 1
            if left:
                self._by_address[sub.address] = left
            else:
                del self._by_address[sub.address]
        if sub.anonymous:
            self.anonymous -= 1
        self._count -= 1
        self.stats.streams_closed += 1

    def current_event(self, user: str) -> bytes:
        """The user's whole state now (the first event of a stream)."""
        return self.whole_event(user)

    def whole_event(self, user: str) -> bytes:
        """The user's whole state as a ``badges`` event, encoded once per commit."""
        event = self._whole.get(user)
        if event is None:
            event = self._whole[user] = encode_badges_event(user, self.state)
        return event

    def publish(self, lsn: int, changes: Changes) -> None:
        """After a commit: hand every stream of each changed user what changed.

        A commit's changes (a dict) are walked when fewer than the connected users; others
        (a fresh snapshot's differences) are only asked about connected users."""
        self._whole.clear()
        by_user = self._by_user
        if type(changes) is dict and len(changes) <= len(by_user):
            targets = [u for u in changes if u in by_user]
        else:
            targets = [u for u in by_user if u in changes]
        state = self.state
        stats = self.stats
        for user in targets:
            subs = by_user[user]
            moved = changes[user]
            change = None
            if moved is not None:
                totals, pairs = state.summary(user)
                if sum(len(m) for m in moved) <= pairs:
                    payload = change_payload(user, lsn, moved, totals, state)
                    event = encode_event("badges-change", payload)
                    change = Change(user, lsn, moved, totals, pairs, event)
            stats.events_published += 1
            if change is None:
                for sub in subs:
                    sub.push_full()
            else:
                for sub in subs:
                    sub.push(change)

    def publish_status(self, live: bool, lag_ms: int) -> None:
        """Tell every stream whether counts are live (rare: the stream went down or up)."""
        event = encode_status_event(live, lag_ms)
        for subs in self._by_user.values():
            for sub in subs:
                sub.push_status(event)

    async def run(self) -> None:
        """Turn the heartbeat wheels (and drop streams whose sends overstay) until cancelled."""
        monotonic = time.monotonic
        while True:
            wheels = list(self._wheels.values())
            now = monotonic()
            due = min((w.next_at for w in wheels), default=now + MAX_TICK_S)
            await anyio.sleep(max(0.0, min(due, now + MAX_TICK_S) - now))
            now = monotonic()
            if self._sending:
                self.drop_stuck(now)
            for wheel in wheels:
                wheel.turn(now)

    def close(
        self,
        *,
        rate: float = math.inf,
        ticket: Callable[[Subscriber, float], str | None] | None = None,
    ) -> None:
        """End every stream promptly (shutdown), each told when to come back: at random
        over the time taking every stream back takes at ``rate`` streams a second, from
        ``RECONNECT_AFTER_S`` on; ``ticket(sub, seconds)`` gives one valid that long for the
        return, or None. Only the first call does anything."""
        if self._closed:
            return
        self._closed = True
        spread = self._count / rate
        uniform = random.uniform
        for subs in self._by_user.values():
            for sub in subs:
                wait = RECONNECT_AFTER_S + uniform(0.0, spread)
                given = ticket(sub, wait + RECONNECT_TICKET_S) if ticket is not None else None
                sub.end_with(encode_reconnect_event(round(wait * 1000), given))
        logger.info("closing %d open streams, told to come back over %.1f s", self._count, spread)
