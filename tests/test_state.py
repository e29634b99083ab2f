"""The compact badge state against a plain model: every id form, small and wide users."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.badges.state import SMALL_BYTES, UUID_BASE, BadgeState, key_of, text_of

#: ids of every form the badges file allows, and text that only looks like them
IDS = [
    "00000000-0000-4000-8000-000000000001",
    str(uuid.UUID(int=2**128 - 1)),
    "AAAAAAAA-0000-4000-8000-000000000001",  # upper case: a text, not a uuid
    "0000000000004000800000000000000a----",
    "0",
    "42",
    "-7",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",  # past bigint: text
    "007",
    "-0",
    "+5",
    "1_000",
    "\uff11\uff12",
    "",
    "ann",
    "Zoë",
    "x" * 300,
]

Model = dict[str, list[dict[str, int]]]


@given(st.text() | st.sampled_from(IDS))
def test_every_id_comes_back_exactly(text: str) -> None:
    key = key_of(text)
    assert text_of(key) == text
    assert key_of(text_of(key)) == key


def test_canonical_forms_are_compacted() -> None:
    assert key_of(IDS[0]) == uuid.UUID(IDS[0]).int + UUID_BASE
    assert key_of("42") == 42 and key_of("-9223372036854775808") == -(2**63)
    for text in (
        "AAAAAAAA-0000-4000-8000-000000000001",
        "007",
        "-0",
        "+5",
        "1_000",
        "\uff11\uff12",
    ):
        assert key_of(text) == text


def as_read(text: str) -> bytes | int | str:
    """An id as the snapshot reads it: a uuid as its 16 bytes, an integer as an int."""
    key = key_of(text)
    if isinstance(key, int) and key >= UUID_BASE:
        return uuid.UUID(text).bytes
    return key


def model_items(model: Model) -> dict[str, list[dict[str, int]]]:
    return {u: maps for u, maps in model.items() if any(maps)}


def check(state: BadgeState, model: Model) -> None:
    assert dict(state.items()) == model_items(model)
    assert len(state) == len(model_items(model))
    for user, maps in model.items():
        totals, pairs = state.summary(user)
        assert totals == [sum(m.values()) for m in maps]
        assert pairs == sum(len(m) for m in maps)
        assert state.view(user) == maps
        assert (user in state) == any(maps)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_state_equals_the_model_through_loads_merges_and_truncates(data: st.DataObject) -> None:
    users = data.draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True))
    counterparts = IDS + [f"c{i}" for i in range(30)]  # enough to make a user wide
    state = BadgeState(["a", "b", "plain"], [True, True, False])
    model: Model = {u: [{}, {}, {}] for u in users}
    # the snapshot: rows of each badge, ids as text or already compact
    for badge in range(3):
        rows = []
        for user in users:
            chosen = data.draw(st.lists(st.sampled_from(counterparts), max_size=20, unique=True))
            for counterpart in chosen if badge < 2 else [""][: len(chosen) % 2]:
                count = data.draw(st.integers(1, 2**33))
                model[user][badge][counterpart] = count
                compact = data.draw(st.booleans())
                rows.append(
                    (as_read(user), as_read(counterpart), count)
                    if compact
                    else (user, counterpart, count)
                )
        state.load(badge, rows)
    check(state, model)
    for lsn in range(1, data.draw(st.integers(1, 12)) + 1):
        before = {u: [dict(m) for m in maps] for u, maps in model.items()}
        truncated: set[int] = set()
        if data.draw(st.integers(0, 9)) == 0:
            truncated = {data.draw(st.integers(0, 2))}
            for maps in model.values():
                for badge in truncated:
                    maps[badge] = {}
        deltas: list[dict[tuple[str, str], int]] = [{}, {}, {}]
        for _ in range(data.draw(st.integers(0, 25))):
            badge = data.draw(st.integers(0, 2))
            user = data.draw(st.sampled_from(users))
            counterpart = "" if badge == 2 else data.draw(st.sampled_from(counterparts))
            held = model[user][badge].get(counterpart, 0)
            delta = data.draw(st.integers(-held, 2**32))
            deltas[badge][user, counterpart] = deltas[badge].get((user, counterpart), 0) + delta
            if held + delta:
                model[user][badge][counterpart] = held + delta
            else:
                model[user][badge].pop(counterpart, None)
        changes = state.merge(deltas, truncated, lsn)
        assert state.lsn == lsn
        check(state, model)
        changed = {u for u in users if before[u] != model[u]}
        assert changed <= changes.keys()
        for user, moved in changes.items():
            if moved is None:
                assert truncated, "only a truncate asks for the whole state"
                continue
            for badge, by_counterpart in enumerate(moved):
                for counterpart, count in by_counterpart.items():
                    assert model[user][badge].get(counterpart, 0) == count
                for counterpart in before[user][badge].keys() | model[user][badge].keys():
                    old = before[user][badge].get(counterpart, 0)
                    if old != model[user][badge].get(counterpart, 0):
                        assert counterpart in by_counterpart


def test_users_grow_wide_and_leave_at_zero() -> None:
    state = BadgeState(["a"], [True])
    user = "00000000-0000-4000-8000-000000000009"
    many = {f"00000000-0000-4000-8000-{i:012x}": 1 for i in range(SMALL_BYTES // 10)}
    state.merge([{(user, c): 1 for c in many}], set(), 1)
    assert state.view(user) == [many]
    assert state.summary(user) == ([len(many)], len(many))
    changes = state.merge([{(user, c): -1 for c in many}], set(), 2)
    assert changes == {user: [dict.fromkeys(many, 0)]}
    assert len(state) == 0 and user not in state


def test_differences_name_the_users_whose_counts_differ() -> None:
    one, two = BadgeState(["a"], [True]), BadgeState(["a"], [True])
    one.load(0, [("u", "x", 1), ("v", "x", 2), ("w", "x", 3)])
    two.load(0, [("u", "x", 1), ("v", "x", 5), ("z", "x", 1)])
    assert one.differences(two) == {"v": None, "w": None, "z": None}
