"""The hub's pure parts: pending slots, heartbeat wheel, stalled-send detection."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from replicator.badges import BadgeState
from replicator.hub import HEARTBEAT, HeartbeatWheel, Hub, Subscriber, encode_badges_event


def test_latest_state_replaces_pending_and_heartbeat_yields_to_events() -> None:
    sub = Subscriber("u")
    sub.heartbeat = True
    sub.badges = b"old"
    sub.badges = b"new"
    sub.status = b"status"
    assert sub.take() == b"statusnew"
    assert sub.take() is None  # the heartbeat was covered by the event
    sub.heartbeat = True
    assert sub.take() == HEARTBEAT
    assert sub.take() is None


def test_badges_event_is_one_sse_block_with_lsn_as_id() -> None:
    state = BadgeState()
    state.lsn = 0x16B3748
    state.users["u"] = [{"s\nnewline": 2}, {}]
    block = encode_badges_event("u", state).decode()
    assert block.endswith("\n\n") and block.count("\n") == 4
    fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
    assert fields["id"] == "0/16B3748" and fields["event"] == "badges"
    data = json.loads(fields["data"])
    assert data["lsn"] == "0/16B3748"
    assert data["unread_messages"] == {"s\nnewline": 2}
    assert data["total_unread_messages"] == 2


def test_wheel_flags_every_stream_once_per_round_in_spread_slots() -> None:
    wheel = HeartbeatWheel(15.0)
    subs = [Subscriber(str(i)) for i in range(6000)]
    for sub in subs:
        wheel.add(sub)
    assert wheel.tick_s * len(wheel.slots) < 15.0
    sizes = [len(slot) for slot in wheel.slots]
    # Random slots: no slot carries a wave of heartbeats.
    assert max(sizes) < 3 * len(subs) / len(wheel.slots)
    flagged: Counter[str] = Counter()
    for _ in wheel.slots:
        wheel.turn(now=0.0)
        for sub in subs:
            if sub.take() == HEARTBEAT:
                flagged[sub.user] += 1
    assert set(flagged.values()) == {1} and len(flagged) == len(subs)


@pytest.mark.anyio
async def test_wheel_drops_a_stream_whose_send_overstays() -> None:
    wheel = HeartbeatWheel(1.0)
    stuck, fine = Subscriber("stuck"), Subscriber("fine")
    for sub in (stuck, fine):
        wheel.slots[0].add(sub)
        sub.beat_slot = wheel.slots[0]

    async def blocked() -> None:
        await asyncio.Event().wait()

    stuck.task = asyncio.get_running_loop().create_task(blocked())
    stuck.send_deadline = 10.0
    fine.send_deadline = 0.0
    wheel.turn(now=11.0)
    with pytest.raises(asyncio.CancelledError):
        await stuck.task
    assert stuck.aborted and stuck.closed
    assert not fine.aborted and fine.heartbeat


@pytest.mark.anyio
async def test_notify_wakes_the_waiting_stream_and_close_ends_it() -> None:
    hub = Hub(BadgeState)
    sub = hub.subscribe("u")
    waiter = asyncio.get_running_loop().create_task(sub.wait())
    await asyncio.sleep(0)
    hub.publish(1, {"u", "nobody"})
    await asyncio.wait_for(waiter, 5)
    assert sub.take() is not None
    waiter = asyncio.get_running_loop().create_task(sub.wait())
    await asyncio.sleep(0)
    hub.close()
    await asyncio.wait_for(waiter, 5)
    assert sub.closed
    hub.unsubscribe(sub)
    assert hub.connected == 0 and hub.users_connected == 0
