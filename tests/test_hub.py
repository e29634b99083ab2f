"""The hub's pure parts: pending slots, heartbeat wheel, stalled-send detection."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from replicator.badges.state import BadgeState
from replicator.fanout.hub import (
    HEARTBEAT,
    MAX_PENDING,
    REAUTHENTICATE,
    RECONNECT_AFTER_S,
    RECONNECT_TICKET_S,
    HeartbeatWheel,
    Hub,
    LimitExceeded,
    Subscriber,
    badges_payload,
    encode_badges_event,
)
from replicator.pg.lsn import format_lsn
from replicator.web.stream import body_writer
from tests.support import DEFAULT_SPECS, empty_state


def put(state: BadgeState, user: str, maps: list[dict[str, int]]) -> None:
    for badge, counts in enumerate(maps):
        state.load(badge, [(user, counterpart, n) for counterpart, n in counts.items()])


def test_pending_changes_merge_and_heartbeat_yields_to_events() -> None:
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state)
    sub = hub.subscribe("u")
    sub.heartbeat = True
    put(state, "u", [{"a": 2, "b": 1}, {}])
    hub.publish(0x10, {"u": [{"a": 2, "b": 1}, {}]})
    put(state, "u", [{"c": 5}, {}])
    hub.publish(0x20, {"u": [{"c": 5}, {}]})
    sub.status = b"status"
    data = sub.take()
    assert data is not None and data.startswith(b"status")
    block = data.removeprefix(b"status").decode()
    assert block == (
        "id: 0/20\nevent: badges-change\n"
        'data: {"user_id":"u","lsn":"0/20","unread_messages":{"a":2,"b":1,"c":5},'
        '"missed_calls":{},"total_unread_messages":8,"total_missed_calls":0}\n\n'
    )
    assert sub.take() is None  # the heartbeat was covered by the event
    sub.heartbeat = True
    assert sub.take() == HEARTBEAT
    assert sub.take() is None


def test_badges_event_is_one_sse_block_with_lsn_as_id() -> None:
    state = empty_state(DEFAULT_SPECS)
    state.lsn = 0x16B3748
    put(state, "u", [{"s\nnewline": 2}, {}])
    block = encode_badges_event("u", state).decode()
    assert block.endswith("\n\n") and block.count("\n") == 4
    fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
    assert fields["id"] == "0/16B3748" and fields["event"] == "badges"
    data = json.loads(fields["data"])
    assert data["lsn"] == "0/16B3748"
    assert data["unread_messages"] == {"s\nnewline": 2}
    assert data["total_unread_messages"] == 2


def test_default_event_is_byte_for_byte_the_contract_example() -> None:
    state = empty_state(DEFAULT_SPECS)
    state.lsn = 0x16B3748
    put(state, "u", [{"s1": 3}, {"s2": 1}])
    data = encode_badges_event("u", state).decode().split("data: ", 1)[1].strip()
    assert data == (
        '{"user_id":"u","lsn":"0/16B3748","unread_messages":{"s1":3},"missed_calls":{"s2":1},'
        '"total_unread_messages":3,"total_missed_calls":1}'
    )


def test_event_lists_maps_of_grouped_badges_then_every_total_in_file_order() -> None:
    state = BadgeState(["alerts", "urgent", "mentions"], [True, False, True])
    put(state, "u", [{"ci": 2, "db": 1}, {"": 4}, {}])
    assert list(badges_payload("u", state).items()) == [
        ("user_id", "u"),
        ("lsn", "0/0"),
        ("alerts", {"ci": 2, "db": 1}),
        ("mentions", {}),
        ("total_alerts", 3),
        ("total_urgent", 4),
        ("total_mentions", 0),
    ]
    assert badges_payload("nobody", state)["total_urgent"] == 0


def test_wheel_spreads_the_first_beats_of_streams_opened_together() -> None:
    wheel = HeartbeatWheel(15.0)
    subs = [Subscriber(str(i)) for i in range(6000)]
    for sub in subs:
        wheel.add(sub, now=1000.0)
    ticks = round(15.0 / wheel.tick_s)
    beats_per_tick, beaten = [], set()
    for k in range(1, ticks + 1):
        now = 1000.0 + k * wheel.tick_s
        wheel.turn(now)
        beating = [sub for sub in subs if sub.take() == HEARTBEAT]
        for sub in beating:
            sub.last_sent = now
            beaten.add(sub.user)
        beats_per_tick.append(len(beating))
    assert len(beaten) == len(subs)  # every stream beat within its first interval
    # Random phases: no tick carries a wave of heartbeats.
    assert max(beats_per_tick) < 3 * len(subs) / ticks


@pytest.mark.parametrize("interval", [15.0, 0.2])
def test_a_stream_is_never_silent_longer_than_the_interval(interval: float) -> None:
    """Simulated time: random events, the wheel turning (sometimes late), heartbeats."""
    rng = random.Random(7)
    wheel = HeartbeatWheel(interval)
    sub = Subscriber("u")
    wheel.add(sub, now=0.0)
    written, gaps, beats = 0.0, [], 0
    next_event = rng.expovariate(1 / interval)
    for k in range(1, 20_000):
        now = k * wheel.tick_s + rng.uniform(0, 0.99 * wheel.tick_s)  # a loop running late
        while next_event <= now:
            gaps.append(next_event - written)
            written = sub.last_sent = next_event
            next_event += rng.expovariate(1 / interval)
        wheel.turn(now)
        if sub.take() == HEARTBEAT:
            beats += 1
            gaps.append(now - written)
            written = sub.last_sent = now
    assert max(gaps) <= interval
    assert beats > 0


@pytest.mark.anyio
async def test_hub_drops_a_stream_whose_send_overstays() -> None:
    hub = Hub(lambda: empty_state(DEFAULT_SPECS))
    stuck, fine, done = hub.subscribe("stuck"), hub.subscribe("fine"), hub.subscribe("done")

    async def blocked() -> None:
        await asyncio.Event().wait()

    stuck.task = asyncio.get_running_loop().create_task(blocked())
    hub.writing(stuck, 10.0)
    hub.writing(fine, 12.0)
    hub.writing(done, 10.0)
    hub.written(done)
    assert hub.blocked == 2
    hub.drop_stuck(now=11.0)
    with pytest.raises(asyncio.CancelledError):
        await stuck.task
    assert stuck.aborted and stuck.closed
    assert not fine.aborted and not done.aborted
    assert hub.blocked == 1
    hub.unsubscribe(stuck)
    assert hub.blocked == 1 and hub.connected == 2


def test_wheel_looks_at_a_stream_once_per_interval_and_forgets_one_that_left() -> None:
    wheel = HeartbeatWheel(15.0)
    busy, idle, gone = Subscriber("busy"), Subscriber("idle"), Subscriber("gone")
    for sub in (busy, idle, gone):
        wheel.add(sub, now=0.0)
    gone.wheel = None  # what Hub.unsubscribe does
    for k in range(1, round(60 / wheel.tick_s) + 1):
        now = k * wheel.tick_s
        busy.last_sent = now  # it writes events all the time: never a heartbeat
        wheel.turn(now)
        if idle.take() == HEARTBEAT:
            idle.last_sent = now
        waiting = [sub.user for bucket in wheel.buckets.values() for sub in bucket]
        # Each stream waits in one bucket; the one gone leaves at its bucket's turn, within
        # an interval.
        assert len(waiting) == len(set(waiting)) and {"busy", "idle"} <= set(waiting)
        assert "gone" not in waiting or now < 15.0
    assert busy.take() is None and gone.take() is None


@pytest.mark.anyio
async def test_notify_wakes_the_waiting_stream_and_close_ends_it() -> None:
    hub = Hub(lambda: empty_state(DEFAULT_SPECS))
    sub = hub.subscribe("u")
    waiter = asyncio.get_running_loop().create_task(sub.wait())
    await asyncio.sleep(0)
    hub.publish(1, {"u": None, "nobody": None})
    await asyncio.wait_for(waiter, 5)
    assert sub.take() is not None
    waiter = asyncio.get_running_loop().create_task(sub.wait())
    await asyncio.sleep(0)
    hub.close()
    await asyncio.wait_for(waiter, 5)
    assert sub.closed
    hub.unsubscribe(sub)
    assert hub.connected == 0 and hub.users_connected == 0


def test_wheel_ends_a_stream_at_its_token_expiry() -> None:
    wheel = HeartbeatWheel(15.0)
    sub, forever = Subscriber("u", expires_at=100.0), Subscriber("v")
    for s in (sub, forever):
        wheel.add(s, now=0.0)
        s.last_sent = 99.0  # recently written: no heartbeat due
    wheel.turn(now=99.5)
    assert sub.last is None and sub.take() is None  # not ended
    sub.full = True
    wheel.turn(now=100.0)
    # It replaces what was pending: the client reconnects for the whole state.
    assert sub.take() == REAUTHENTICATE
    assert sub.closed and sub.take() is None
    assert forever.take() is None and not forever.closed
    event = REAUTHENTICATE.decode()
    assert event == 'event: reauthenticate\ndata: {"reason":"token expired"}\n\n'


def test_shares_per_user_address_anonymous_and_the_reserve() -> None:
    hub = Hub(
        BadgeState, max_per_user=2, max_per_address=3, max_anonymous=1, max_total=8, reserved=2
    )

    def refused(user: str, **kwargs: object) -> LimitExceeded:
        with pytest.raises(LimitExceeded) as caught:
            hub.subscribe(user, **kwargs)  # type: ignore[arg-type]
        return caught.value

    a1, a2 = hub.subscribe("a", address="1.1.1.1"), hub.subscribe("a", address="1.1.1.1")
    too_many = refused("a", address="2.2.2.2")
    assert (too_many.status_code, too_many.reason, too_many.retry_after) == (429, "user", 10)
    hub.subscribe("b", address="1.1.1.1")
    crowded = refused("c", address="1.1.1.1")
    assert (crowded.status_code, crowded.reason) == (429, "address")
    hub.subscribe("anon-1", address="3.3.3.3", anonymous=True)
    anonymous = refused("anon-2", address="4.4.4.4", anonymous=True)
    assert (anonymous.status_code, anonymous.reason) == (503, "anonymous")
    assert 5 <= anonymous.retry_after <= 15
    hub.subscribe("d", address="5.5.5.5")
    hub.subscribe("e", address="6.6.6.6")  # 6 open: the last 2 places are reserved
    reserve = refused("f", address="7.7.7.7")
    assert (reserve.status_code, reserve.reason) == (503, "reserve")
    hub.subscribe("d", address="5.5.5.5")  # a connected user is served
    hub.unsubscribe(a1)
    hub.unsubscribe(a2)
    hub.subscribe("g", address="10.0.0.1")  # 6 open again
    hub.subscribe("a", address="8.8.8.8")  # "a" left a moment ago: its reconnect is served
    assert refused("h", address="10.0.0.2").reason == "reserve"
    hub.subscribe("b", address="1.1.1.1")
    full = refused("e", address="9.9.9.9")
    assert (full.status_code, full.reason) == (503, "capacity")
    assert hub.connected == 8 and hub.anonymous == 1
    hub.close()
    assert refused("a").reason == "shutdown"
    assert hub.stats.refused == {
        "user": 1,
        "address": 1,
        "anonymous": 1,
        "reserve": 2,
        "capacity": 1,
        "shutdown": 1,
    }


def parse_block(data: bytes) -> dict[str, str]:
    """The fields of one SSE block."""
    text = data.decode()
    assert text.endswith("\n\n") and text.count("\n\n") == 1, text
    return dict(line.split(": ", 1) for line in text[:-2].split("\n"))


def test_shutdown_spreads_the_returns_over_what_the_rate_takes_and_hands_tickets() -> None:
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state, max_per_user=5)
    subs = [hub.subscribe(f"u{i % 50}") for i in range(200)]
    # one stream has a change pending: the client gets the whole state when it is back
    put(state, "u1", [{"a": 1}, {}])
    hub.publish(0x10, {"u1": [{"a": 1}, {}]})
    asked: dict[str, float] = {}

    def ticket(sub: Subscriber, valid_s: float) -> str | None:
        asked[sub.user] = valid_s
        return None if sub.user == "u7" else f"ticket-{sub.user}"

    hub.close(rate=100.0, ticket=ticket)  # 200 streams at 100/s: over 2 s
    waits = []
    for sub in subs:
        data = sub.take()
        assert data is not None and sub.closed
        fields = parse_block(data)
        assert fields["event"] == "reconnect" and "id" not in fields
        body = json.loads(fields["data"])
        assert body["reason"] == "shutdown"
        assert int(fields["retry"]) == body["retry_ms"]
        waits.append(body["retry_ms"] / 1000)
        assert body.get("ticket") == (None if sub.user == "u7" else f"ticket-{sub.user}")
        assert sub.take() is None  # nothing after it: the stream ends
    assert all(RECONNECT_AFTER_S <= w <= RECONNECT_AFTER_S + 2.0 for w in waits)
    # spread over the whole span, not bunched: each half second gets some
    assert {int((w - RECONNECT_AFTER_S) * 2) for w in waits} >= {0, 1, 2, 3}
    # each ticket lasts its wait and then some
    assert all(v >= RECONNECT_AFTER_S + RECONNECT_TICKET_S for v in asked.values())
    # a second close (the lifespan's, after the server's) says nothing more
    hub.close(rate=1.0, ticket=ticket)
    assert all(sub.take() is None for sub in subs)


def test_a_stream_in_the_middle_of_a_write_ends_with_the_reconnect_event_after_it() -> None:
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state)
    written: list[bytes] = []
    idle, busy = hub.subscribe("a"), hub.subscribe("b")
    for sub in (idle, busy):
        sub.direct = lambda data: written.append(data) is None
    hub.writing(busy, 5.0)
    hub.close()
    # the idle stream's connection took it at once; the busy one's waits for its write
    assert len(written) == 1 and parse_block(written[0])["event"] == "reconnect"
    assert idle.take() is None and idle.closed
    # a commit before the streams' tasks have ended writes nothing after the last event
    put(state, "a", [{"x": 1}, {}])
    hub.publish(0x10, {"a": [{"x": 1}, {}]})
    idle.beat()
    assert len(written) == 1
    assert idle.take() is None  # nor is it left for the stream's task to write
    hub.written(busy)
    data = busy.take()
    assert data is not None and parse_block(data)["event"] == "reconnect"
    assert busy.take() is None


def test_blocked_streams_are_counted_as_writes_start_and_end() -> None:
    hub = Hub(BadgeState, max_per_user=1, max_total=3)
    subs = [hub.subscribe(f"u{i}") for i in range(3)]
    hub.writing(subs[0], 5.0)
    hub.writing(subs[1], 5.0)
    hub.writing(subs[1], 6.0)  # the same stream's next write
    assert hub.blocked == 2
    hub.written(subs[0])
    hub.written(subs[0])
    assert hub.blocked == 1
    hub.unsubscribe(subs[1])  # its write was cut short (client gone, stream aborted)
    assert hub.blocked == 0


def test_refused_streams_are_counted() -> None:
    hub = Hub(BadgeState, max_per_user=1, max_total=2)
    hub.subscribe("a")
    with pytest.raises(LimitExceeded) as per_user:
        hub.subscribe("a")
    assert per_user.value.status_code == 429
    hub.subscribe("b")
    with pytest.raises(LimitExceeded) as total:
        hub.subscribe("c")
    assert total.value.status_code == 503
    hub.close()
    with pytest.raises(LimitExceeded):
        hub.subscribe("d")
    assert sum(hub.stats.refused.values()) == 3


def sse(block: bytes) -> tuple[str, dict[str, object]]:
    fields = dict(line.split(": ", 1) for line in block.decode().strip().split("\n"))
    return fields["event"], json.loads(fields["data"])


def test_a_change_costs_what_moved_not_what_the_user_has() -> None:
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state)
    sub = hub.subscribe("wide")
    senders = {f"00000000-0000-4000-8000-{i:012x}": 1 for i in range(20_000)}
    put(state, "wide", [senders, {}])
    first = hub.current_event("wide")
    assert len(first) > 20_000 * 40
    moved = {"00000000-0000-4000-8000-000000000007": 2, "new": 1}
    state.merge([{("wide", s): 1 for s in moved}, {}], set(), 0x30)
    hub.publish(0x30, {"wide": [moved, {}]})
    block = sub.take()
    assert block is not None and len(block) < 300
    assert sse(block) == (
        "badges-change",
        {
            "user_id": "wide",
            "lsn": "0/30",
            "unread_messages": moved,
            "missed_calls": {},
            "total_unread_messages": 20_002,
            "total_missed_calls": 0,
        },
    )


def test_a_change_larger_than_the_whole_state_is_sent_as_the_whole_state() -> None:
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state)
    sub = hub.subscribe("u")
    senders = [f"s{i}" for i in range(50)]
    state.merge([{("u", s): 1 for s in senders}, {}], set(), 0x10)
    hub.publish(0x10, {"u": [dict.fromkeys(senders, 1), {}]})
    assert sse(sub.take() or b"")[0] == "badges-change"
    # all cleared but one new: 51 entries moved, one left
    changes = state.merge([{**{("u", s): -1 for s in senders}, ("u", "z"): 1}, {}], set(), 0x20)
    hub.publish(0x20, changes)
    kind, data = sse(sub.take() or b"")
    assert kind == "badges" and data["unread_messages"] == {"z": 1}


def test_bursts_merge_per_stream_and_fall_back_to_the_whole_state() -> None:
    """A stream that does not write while changes arrive sends them merged, once; one whose
    merged changes would outgrow the whole state sends the whole state."""
    state = empty_state(DEFAULT_SPECS)
    hub = Hub(lambda: state)
    slow, fast, whole = hub.subscribe("u"), hub.subscribe("u"), hub.subscribe("u", whole=True)
    model = {f"p{i}": 1 for i in range(20)}
    put(state, "u", [dict(model), {}])
    shown = dict(model)  # what the slow stream's client holds
    sent: list[tuple[str, dict[str, object]]] = []
    for lsn in range(1, 3 * MAX_PENDING):
        sender = f"s{lsn % 5}"
        delta = -model[sender] if lsn % 7 == 0 else 1
        model[sender] = model.get(sender, 0) + delta
        hub.publish(lsn, state.merge([{("u", sender): delta}, {}], set(), lsn))
        sent.append(sse(fast.take() or b""))
        assert sse(whole.take() or b"")[0] == "badges"
    assert {kind for kind, _ in sent} == {"badges-change"}
    kind, merged = sse(slow.take() or b"")
    assert kind == "badges-change" and merged["lsn"] == format_lsn(3 * MAX_PENDING - 1)
    shown.update(merged["unread_messages"])  # type: ignore[call-overload]
    assert {s: n for s, n in shown.items() if n} == {s: n for s, n in model.items() if n}
    assert merged["total_unread_messages"] == sum(model.values())
    assert slow.take() is None
    # many senders come and go while the stream waits: more moved than is left
    for lsn in range(100, 100 + 3 * MAX_PENDING):
        hub.publish(lsn, state.merge([{("u", f"t{lsn}"): 1}, {}], set(), lsn))
        hub.publish(lsn, state.merge([{("u", f"t{lsn}"): -1}, {}], set(), lsn))
    assert slow.changes is None and slow.full  # merged early: it never holds more than that
    kind, data = sse(slow.take() or b"")
    assert kind == "badges" and data["unread_messages"] == {s: n for s, n in model.items() if n}


@pytest.mark.anyio
async def test_a_server_other_than_uvicorns_own_gets_every_write_through_asgi() -> None:
    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    write, at_once = body_writer({"type": "http", "http_version": "1.1"}, send)  # type: ignore[arg-type]
    assert at_once is None
    await write(b"event")
    assert sent == [{"type": "http.response.body", "body": b"event", "more_body": True}]
