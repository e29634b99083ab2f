"""Badge state as pure code: decoded pgoutput messages in, counts out, checked against a recount."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.badges.applier import Applier
from replicator.badges.state import BadgeState
from replicator.errors import ProtocolError, SchemaError
from replicator.pg.changes import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    Update,
    Value,
    Values,
)
from replicator.pg.feed import PgoutputFeed
from tests.support import (
    CALLS_COLUMNS,
    MESSAGES_COLUMNS,
    MISSED,
    UNREAD,
    default_applier,
)

MESSAGES_ID, CALLS_ID, MOODS_ID, ELSEWHERE_ID = 16396, 16411, 16437, 17000
USERS = ("u-ann", "u-ben", "u-cat", "u-dan")
STATUSES = ("ringing", "answered", "missed", "declined")

Counts = dict[str, tuple[dict[str, int], dict[str, int]]]
Row = dict[str, Any]


def relation(
    relid: int,
    name: str,
    columns: list[tuple[str, int]],
    *,
    namespace: str = "public",
    identity: str = "f",
) -> Relation:
    cols = tuple(Column(c, oid, -1, identity == "f" or c == "id") for c, oid in columns)
    return Relation(relid, namespace, name, identity, cols)


MESSAGES = relation(MESSAGES_ID, "messages", MESSAGES_COLUMNS)
CALLS = relation(CALLS_ID, "calls", CALLS_COLUMNS)
MOODS = relation(MOODS_ID, "moods", [("id", 23), ("mood", 16431)], identity="d")
ELSEWHERE = relation(ELSEWHERE_ID, "messages", MESSAGES_COLUMNS, namespace="archive")


@dataclass(frozen=True)
class BadgeRule:
    """A badge table as the default badges read it: the columns in slot order, then the id."""

    relid: int
    columns: tuple[str, ...]


MESSAGES_RULE = BadgeRule(MESSAGES_ID, ("recipient_id", "sender_id", "read_at"))
CALLS_RULE = BadgeRule(CALLS_ID, ("callee_id", "caller_id", "status", "seen_at"))


def values(rule: BadgeRule, row: Row) -> Values:
    """A row as the applier's projection lays it out: the badges' columns, then the id."""
    return [row.get(c) for c in rule.columns] + [row.get("id")]


def counts_of(state: BadgeState) -> Counts:
    return {user: (dict(c[UNREAD]), dict(c[MISSED])) for user, c in state.items()}


@dataclass
class Stream:
    """An applier fed with messages the way pgoutput would send them, with LSNs kept in order."""

    applier: Applier = field(default_factory=default_applier)
    lsn: int = 0x1000
    commits: list[tuple[int, set[str]]] = field(default_factory=list)
    in_transaction: bool = False

    def __post_init__(self) -> None:
        self.applier.on_commit = lambda lsn, users: self.commits.append((lsn, set(users)))
        self.feed = PgoutputFeed(self.applier)

    @property
    def state(self) -> BadgeState:
        return self.applier.state

    def send(self, *messages: Message) -> None:
        for msg in messages:
            self.feed.apply_message(msg)

    def begin(self) -> int:
        """Open a transaction; return its commit LSN."""
        assert not self.in_transaction
        self.lsn += 0x100
        self.in_transaction = True
        self.send(Begin(self.lsn, self.lsn * 10, self.lsn // 0x100))
        return self.lsn

    def commit(self) -> None:
        assert self.in_transaction
        self.in_transaction = False
        self.send(Commit(0, self.lsn, self.lsn + 0x30, self.lsn * 10))

    def transaction(self, *messages: Message) -> int:
        lsn = self.begin()
        self.send(*messages)
        self.commit()
        return lsn


def announced() -> Stream:
    stream = Stream()
    stream.send(MESSAGES, CALLS, MOODS, ELSEWHERE)
    return stream


def message(id: int, sender: str | None, recipient: str | None, read_at: str | None = None) -> Row:
    return {"id": str(id), "sender_id": sender, "recipient_id": recipient, "read_at": read_at}


def call(
    id: int, caller: str | None, callee: str | None, status: str, seen_at: str | None = None
) -> Row:
    return {
        "id": str(id),
        "caller_id": caller,
        "callee_id": callee,
        "status": status,
        "seen_at": seen_at,
    }


def insert(rule: BadgeRule, row: Row) -> Insert:
    return Insert(rule.relid, values(rule, row))


def update(rule: BadgeRule, old: Row, new: Row, old_kind: str = "O") -> Update:
    return Update(rule.relid, values(rule, old), values(rule, new), old_kind)


def delete(rule: BadgeRule, old: Row) -> Delete:
    return Delete(rule.relid, values(rule, old), "O")


# -- the model: two tables, recounted naively after every commit ------------------------------


@dataclass
class Model:
    messages: dict[int, Row] = field(default_factory=dict)
    calls: dict[int, Row] = field(default_factory=dict)
    next_id: int = 1

    def copy(self) -> Model:
        return Model(
            {k: dict(v) for k, v in self.messages.items()},
            {k: dict(v) for k, v in self.calls.items()},
            self.next_id,
        )

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def recount(self) -> Counts:
        """The badge queries: NULL users or counterparts count for nobody."""
        counts: Counts = {}
        for row in self.messages.values():
            user, other = row["recipient_id"], row["sender_id"]
            if row["read_at"] is None and user is not None and other is not None:
                by = counts.setdefault(user, ({}, {}))[UNREAD]
                by[other] = by.get(other, 0) + 1
        for row in self.calls.values():
            user, other = row["callee_id"], row["caller_id"]
            missed = row["status"] == "missed" and row["seen_at"] is None
            if missed and user is not None and other is not None:
                by = counts.setdefault(user, ({}, {}))[MISSED]
                by[other] = by.get(other, 0) + 1
        return counts


people = st.sampled_from(USERS)
maybe_people = st.one_of(people, people, people, people, people, st.none())
timestamps = st.sampled_from([None, None, "2024-05-06 08:00:00+00"])
statuses = st.sampled_from([*STATUSES, "missed", "missed", "voicemail"])


def _unchanged_where_equal(draw: st.DrawFn, old: Values, new: Values) -> Values:
    """Columns an UPDATE leaves alone may come as unchanged TOAST, taken from the old row."""
    if not draw(st.booleans()):
        return new
    return [
        UNCHANGED if o == n and draw(st.booleans()) else n for o, n in zip(old, new, strict=True)
    ]


def _operation(draw: st.DrawFn, model: Model) -> list[Message]:
    """Change the model by one row operation; return what pgoutput would send for it."""
    ops = ["insert message", "insert call", "noise", "relation"]
    if model.messages:
        ops += ["read", "unread", "recipient", "sender", "delete message", "touch message"] * 2
    if model.calls:
        ops += ["status", "seen", "unseen", "callee", "caller", "delete call"]
    ops += ["truncate messages", "truncate calls", "truncate both"]
    op = draw(st.sampled_from(ops))
    if op == "insert message":
        sender, recipient = draw(maybe_people), draw(maybe_people)
        # many rows on the same pair, as a bulk insert makes
        rows = [
            message(model.new_id(), sender, recipient, draw(timestamps))
            for _ in range(draw(st.integers(1, 3)))
        ]
        for row in rows:
            model.messages[int(row["id"])] = row
        return [insert(MESSAGES_RULE, row) for row in rows]
    if op == "insert call":
        row = call(
            model.new_id(), draw(maybe_people), draw(maybe_people), draw(statuses), draw(timestamps)
        )
        model.calls[int(row["id"])] = row
        return [insert(CALLS_RULE, row)]
    if op == "noise":
        # tables the badges do not read, or that live in another schema
        return [
            Insert(MOODS_ID, None),
            Insert(ELSEWHERE_ID, values(MESSAGES_RULE, message(1, USERS[0], USERS[1]))),
        ]
    if op == "relation":
        return [draw(st.sampled_from([MESSAGES, CALLS, MOODS]))]
    if op.startswith("truncate"):
        relids: list[int] = []
        if op != "truncate calls":
            model.messages.clear()
            relids.append(MESSAGES_ID)
        if op != "truncate messages":
            model.calls.clear()
            relids.append(CALLS_ID)
        return [Truncate(tuple(relids), False, False)]
    table = (
        model.messages
        if op in ("read", "unread", "recipient", "sender", "delete message", "touch message")
        else model.calls
    )
    rule = MESSAGES_RULE if table is model.messages else CALLS_RULE
    key = draw(st.sampled_from(sorted(table)))
    old = table[key]
    if op.startswith("delete"):
        del table[key]
        return [delete(rule, old)]
    new = dict(old)
    if op == "read":
        new["read_at"] = "2024-05-06 08:00:00+00"
    elif op == "unread":
        new["read_at"] = None
    elif op == "recipient":
        new["recipient_id"] = draw(maybe_people)
    elif op == "sender":
        new["sender_id"] = draw(maybe_people)
    elif op == "status":
        new["status"] = draw(statuses)
    elif op == "seen":
        new["seen_at"] = "2024-05-06 08:00:00+00"
    elif op == "unseen":
        new["seen_at"] = None
    elif op == "callee":
        new["callee_id"] = draw(maybe_people)
    elif op == "caller":
        new["caller_id"] = draw(maybe_people)
    table[key] = new
    old_values, new_values = values(rule, old), values(rule, new)
    return [
        Update(rule.relid, old_values, _unchanged_where_equal(draw, old_values, new_values), "O")
    ]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_state_equals_a_recount_after_every_commit(data: st.DataObject) -> None:
    logging.getLogger("replicator.badges.applier").setLevel(logging.ERROR)
    stream = announced()
    model = Model()
    for _ in range(data.draw(st.integers(1, 10), label="transactions")):
        before = counts_of(stream.state)
        working = model.copy()
        commit_lsn = stream.begin()
        for _ in range(data.draw(st.integers(0, 12))):
            stream.send(*_draw_operation(data, working))
            # nothing shows before the commit
            assert counts_of(stream.state) == before
        stream.commit()
        model = working
        after = counts_of(stream.state)
        assert after == model.recount()
        assert stream.state.lsn == commit_lsn
        assert all(c[UNREAD] or c[MISSED] for _, c in stream.state.items()), "zeros removed"
        changed = {u for u in before.keys() | after.keys() if before.get(u) != after.get(u)}
        if changed:
            lsn, reported = stream.commits[-1]
            assert lsn == commit_lsn
            assert changed <= reported
        assert stream.applier.pending_pairs == 0


def _draw_operation(data: st.DataObject, model: Model) -> list[Message]:
    return data.draw(st.composite(lambda draw: _operation(draw, model))())


def test_truncate_then_inserts_in_one_transaction() -> None:
    stream = announced()
    stream.transaction(
        insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")),
        insert(MESSAGES_RULE, message(2, "u-cat", "u-ben")),
        insert(CALLS_RULE, call(3, "u-ann", "u-ben", "missed")),
    )
    stream.transaction(
        insert(MESSAGES_RULE, message(4, "u-dan", "u-ben")),
        Truncate((MESSAGES_ID,), False, False),
        insert(MESSAGES_RULE, message(1, "u-ann", "u-cat")),
        insert(MESSAGES_RULE, message(2, "u-ann", "u-cat")),
    )
    assert counts_of(stream.state) == {
        "u-ben": ({}, {"u-ann": 1}),
        "u-cat": ({"u-ann": 2}, {}),
    }
    stream.transaction(Truncate((MESSAGES_ID, CALLS_ID), True, True))
    assert counts_of(stream.state) == {}


# -- memory for one transaction ---------------------------------------------------------------


def test_buffer_grows_with_pairs_not_rows() -> None:
    stream = announced()
    stream.begin()
    pairs = [("u-ann", "u-ben"), ("u-ben", "u-ann"), ("u-cat", "u-ann")]
    for i in range(30_000):
        sender, recipient = pairs[i % 3]
        stream.send(insert(MESSAGES_RULE, message(i, sender, recipient)))
        if i % 5 == 0:
            row = message(i, sender, recipient)
            stream.send(update(MESSAGES_RULE, row, {**row, "read_at": "now"}))
    stream.send(*(insert(CALLS_RULE, call(i, "u-dan", "u-ann", "missed")) for i in range(1000)))
    assert stream.applier.pending_pairs <= 4
    stream.commit()
    assert stream.applier.pending_pairs == 0
    assert counts_of(stream.state) == {
        "u-ben": ({"u-ann": 8000}, {}),
        "u-ann": ({"u-ben": 8000, "u-cat": 8000}, {"u-dan": 1000}),
    }
    assert stream.feed.rows == 30_000 + 6000 + 1000


# -- transactions, commits, resuming ----------------------------------------------------------


def test_nothing_is_visible_before_the_commit() -> None:
    stream = announced()
    stream.begin()
    stream.send(insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")))
    assert len(stream.state) == 0
    assert stream.commits == []
    assert stream.feed.in_transaction
    stream.commit()
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 1}, {})}
    assert stream.commits == [(stream.lsn, {"u-ben"})]
    assert not stream.feed.in_transaction
    assert stream.feed.transactions == 1


def test_users_at_zero_are_removed() -> None:
    stream = announced()
    row = message(1, "u-ann", "u-ben")
    stream.transaction(insert(MESSAGES_RULE, row))
    assert list(stream.state.view("u-ben")) == [{"u-ann": 1}, {}]
    stream.transaction(update(MESSAGES_RULE, row, {**row, "read_at": "now"}))
    assert len(stream.state) == 0
    assert list(stream.state.view("u-ben")) == [{}, {}]
    assert stream.commits[-1][1] == {"u-ben"}


def test_commits_that_change_nobody_are_not_reported() -> None:
    stream = announced()
    row = message(1, "u-ann", "u-ben", read_at="now")
    lsn = stream.transaction(insert(MESSAGES_RULE, row), Insert(MOODS_ID, None))
    assert stream.commits == []
    assert stream.state.lsn == lsn
    assert stream.feed.applied_lsn == lsn + 0x30


def test_transactions_below_the_resume_lsn_are_skipped() -> None:
    """After a reconnect the server resends what we may already have applied."""
    stream = announced()
    first = [insert(MESSAGES_RULE, message(1, "u-ann", "u-ben"))]
    lsn = stream.transaction(*first)
    applied = stream.feed.applied_lsn
    assert applied == lsn + 0x30
    # the same transaction again, as a resumed stream sends it
    stream.send(MESSAGES, CALLS, Begin(lsn, lsn * 10, 1), *first, Commit(0, lsn, lsn + 0x30, 0))
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 1}, {})}
    assert stream.feed.skipped_transactions == 1
    assert stream.feed.transactions == 1
    assert stream.feed.applied_lsn == applied
    stream.transaction(insert(MESSAGES_RULE, message(2, "u-ann", "u-ben")))
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 2}, {})}
    assert stream.feed.transactions == 2


def test_skipped_transactions_leave_no_buffered_rows() -> None:
    stream = announced()
    stream.feed.applied_lsn = 0x5000
    stream.send(
        Begin(0x4000, 0, 1),
        insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")),
        Truncate((MESSAGES_ID,), False, False),
        Commit(0, 0x4000, 0x4030, 0),
    )
    assert stream.applier.pending_pairs == 0
    stream.lsn = 0x5000
    stream.transaction(insert(MESSAGES_RULE, message(2, "u-cat", "u-ben")))
    assert counts_of(stream.state) == {"u-ben": ({"u-cat": 1}, {})}


def test_commit_without_begin_is_a_protocol_error() -> None:
    stream = announced()
    with pytest.raises(ProtocolError, match="commit at 0/2000 without a begin"):
        stream.send(Commit(0, 0x2000, 0x2030, 0))


def test_non_transactional_message_advances_only_between_transactions() -> None:
    stream = announced()
    stream.send(LogicalMessage(False, 0x9000, "replicator.sync", b""))
    assert stream.feed.applied_lsn == 0x9000
    stream.lsn = 0x9000
    stream.begin()
    stream.send(LogicalMessage(False, 0x9900, "x", b""), LogicalMessage(True, 0x9100, "x", b""))
    stream.feed.advance(0x9A00)
    assert stream.feed.applied_lsn == 0x9000
    stream.commit()
    assert stream.feed.applied_lsn == 0x9130
    stream.feed.advance(0x9000)
    assert stream.feed.applied_lsn == 0x9130


# -- schema changes ---------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["recipient_id", "sender_id", "read_at"])
def test_missing_message_column_is_a_schema_error(column: str) -> None:
    columns = [c for c in MESSAGES_COLUMNS if c[0] != column]
    with pytest.raises(SchemaError, match=rf"table public\.messages has no column {column}"):
        announced().send(relation(MESSAGES_ID, "messages", columns))


@pytest.mark.parametrize("column", ["callee_id", "caller_id", "status", "seen_at"])
def test_missing_call_column_is_a_schema_error(column: str) -> None:
    columns = [c for c in CALLS_COLUMNS if c[0] != column]
    with pytest.raises(SchemaError, match=rf"table public\.calls has no column {column}"):
        announced().send(relation(CALLS_ID, "calls", columns))


@pytest.mark.parametrize("identity", ["d", "n", "i"])
def test_replica_identity_other_than_full_is_a_schema_error(identity: str) -> None:
    rel = relation(CALLS_ID, "calls", CALLS_COLUMNS, identity=identity)
    with pytest.raises(SchemaError, match=r"table public\.calls has replica identity .*FULL"):
        announced().send(rel)


def test_update_or_delete_without_the_old_row_is_a_schema_error() -> None:
    stream = announced()
    row = message(1, "u-ann", "u-ben")
    stream.begin()
    with pytest.raises(SchemaError, match=r"UPDATE on public\.messages came without its old row"):
        stream.send(update(MESSAGES_RULE, row, row, old_kind="K"))
    with pytest.raises(SchemaError, match=r"UPDATE on public\.calls came without its old row"):
        stream.send(Update(CALLS_ID, None, values(CALLS_RULE, call(1, "a", "b", "missed")), ""))
    with pytest.raises(SchemaError, match=r"DELETE on public\.messages came with only its key"):
        stream.send(Delete(MESSAGES_ID, values(MESSAGES_RULE, row), "K"))


def test_relation_announced_again_keeps_the_open_transaction() -> None:
    stream = announced()
    stream.begin()
    stream.send(insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")), MESSAGES)
    stream.send(insert(MESSAGES_RULE, message(2, "u-ann", "u-ben")))
    stream.commit()
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 2}, {})}


def test_badge_tables_in_another_schema_are_ignored() -> None:
    stream = Stream(default_applier("chat"))
    chat = relation(MESSAGES_ID, "messages", MESSAGES_COLUMNS, namespace="chat")
    stream.send(MESSAGES, CALLS, relation(1, "messages", MESSAGES_COLUMNS, namespace="chat"))
    stream.transaction(insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")))
    assert len(stream.state) == 0
    stream.send(chat)
    stream.transaction(insert(MESSAGES_RULE, message(1, "u-ann", "u-ben")))
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 1}, {})}


# -- values no badge rule expects: skipped, named, never miscounted ---------------------------


def test_null_user_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    stream = announced()
    orphan = message(5, "u-ann", None)
    with caplog.at_level(logging.WARNING, logger="replicator.badges.applier"):
        stream.transaction(
            insert(MESSAGES_RULE, orphan),
            insert(MESSAGES_RULE, message(6, None, "u-ben")),
            insert(CALLS_RULE, call(9, "u-ann", None, "missed")),
        )
    assert len(stream.state) == 0
    text = caplog.text
    assert "public.messages row id=5" in text and "recipient_id" in text
    assert "public.calls row id=9" in text and "callee_id" in text
    # one warning per badge a minute: the second orphan message is counted, not logged
    assert "row id=6" not in text
    assert stream.applier.skipped_rows == [2, 1]
    stream.applier._warned_at[0] -= 3600
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="replicator.badges.applier"):
        stream.transaction(insert(MESSAGES_RULE, message(7, None, "u-ben")))
    assert "row id=7 for unread_messages: it has no sender_id; it counts for nobody" in caplog.text
    assert "(1 more such rows since the last warning)" in caplog.text
    # once it gets a recipient it counts, and taking it away again uncounts it exactly once
    fixed = {**orphan, "recipient_id": "u-cat"}
    stream.transaction(update(MESSAGES_RULE, orphan, fixed))
    assert counts_of(stream.state) == {"u-cat": ({"u-ann": 1}, {})}
    stream.transaction(update(MESSAGES_RULE, fixed, orphan))
    assert len(stream.state) == 0


def test_a_status_no_badge_expects_counts_for_nobody() -> None:
    stream = announced()
    odd = call(7, "u-ann", "u-ben", "voicemail")
    stream.transaction(insert(CALLS_RULE, odd))
    assert len(stream.state) == 0
    missed = {**odd, "status": "missed"}
    stream.transaction(update(CALLS_RULE, odd, missed))
    assert counts_of(stream.state) == {"u-ben": ({}, {"u-ann": 1})}
    stream.transaction(update(CALLS_RULE, missed, odd))
    assert len(stream.state) == 0
    stream.transaction(insert(CALLS_RULE, missed), delete(CALLS_RULE, missed))
    assert len(stream.state) == 0


def test_unchanged_toast_values_come_from_the_old_row() -> None:
    stream = announced()
    row = message(1, "u-ann", "u-ben")
    stream.transaction(insert(MESSAGES_RULE, row))
    old = values(MESSAGES_RULE, row)
    stream.transaction(Update(MESSAGES_ID, old, [UNCHANGED, UNCHANGED, "now", UNCHANGED], "O"))
    assert len(stream.state) == 0
    read = values(MESSAGES_RULE, {**row, "read_at": "now"})
    stream.transaction(Update(MESSAGES_ID, read, [UNCHANGED, "u-ann", None, "1"], "O"))
    assert counts_of(stream.state) == {"u-ben": ({"u-ann": 1}, {})}


# -- the bytes path: Applier.apply on encoded pgoutput agrees with apply_message --------------


def _encode_tuple(columns: tuple[Column, ...], by_name: dict[str, Value]) -> bytes:
    out = [struct.pack(">H", len(columns))]
    for column in columns:
        value = by_name.get(
            column.name, "filler" if column.name in ("body", "created_at") else None
        )
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


def encode(msg: Message) -> bytes:
    """The pgoutput bytes of a message, with the badge projection's slots mapped to columns."""
    relations = {r.relid: r for r in (MESSAGES, CALLS, MOODS, ELSEWHERE)}
    rules = {MESSAGES_ID: MESSAGES_RULE, CALLS_ID: CALLS_RULE, ELSEWHERE_ID: MESSAGES_RULE}

    def row(relid: int, values: Values | None) -> bytes:
        rule = rules.get(relid)
        names = (*rule.columns, "id") if rule else ("id", "mood")
        by_name = dict(zip(names, values or ["1", "ok"], strict=False))
        return _encode_tuple(relations[relid].columns, by_name)

    if isinstance(msg, Begin):
        return b"B" + struct.pack(">QqI", *msg)
    if isinstance(msg, Commit):
        return b"C" + struct.pack(">BQQq", *msg)
    if isinstance(msg, Relation):
        cols = b"".join(
            struct.pack(">B", c.is_key)
            + c.name.encode()
            + b"\0"
            + struct.pack(">Ii", c.type_oid, -1)
            for c in msg.columns
        )
        head = struct.pack(">I", msg.relid) + f"{msg.namespace}\0{msg.name}\0".encode()
        return (
            b"R" + head + msg.replica_identity.encode() + struct.pack(">H", len(msg.columns)) + cols
        )
    if isinstance(msg, Insert):
        return b"I" + struct.pack(">I", msg.relid) + b"N" + row(msg.relid, msg.new)
    if isinstance(msg, Update):
        old = msg.old_kind.encode() + row(msg.relid, msg.old) if msg.old is not None else b""
        return b"U" + struct.pack(">I", msg.relid) + old + b"N" + row(msg.relid, msg.new)
    if isinstance(msg, Delete):
        return b"D" + struct.pack(">I", msg.relid) + msg.old_kind.encode() + row(msg.relid, msg.old)
    if isinstance(msg, Truncate):
        options = msg.cascade | (msg.restart_identity << 1)
        relids = struct.pack(f">{len(msg.relids)}I", *msg.relids)
        return b"T" + struct.pack(">IB", len(msg.relids), options) + relids
    raise AssertionError(f"no encoding for {msg!r}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_applying_bytes_equals_applying_messages(data: st.DataObject) -> None:
    """``Applier.apply`` takes its own path for inserts; it must count exactly the same."""
    logging.getLogger("replicator.badges.applier").setLevel(logging.ERROR)
    by_message, by_bytes = announced(), Stream()
    for rel in (MESSAGES, CALLS, MOODS, ELSEWHERE):
        by_bytes.feed(encode(rel), 0)
    model = Model()
    for _ in range(data.draw(st.integers(1, 8), label="transactions")):
        messages: list[Message] = [Begin(by_message.lsn + 0x100, 1, 1)]
        for _ in range(data.draw(st.integers(0, 12))):
            messages += _draw_operation(data, model)
        by_message.lsn += 0x100
        messages.append(Commit(0, by_message.lsn, by_message.lsn + 0x30, 1))
        for msg in messages:
            by_message.feed.apply_message(msg)
            by_bytes.feed(encode(msg), by_message.lsn)
        assert counts_of(by_bytes.state) == counts_of(by_message.state) == model.recount()
        assert by_bytes.feed.rows == by_message.feed.rows
        assert by_bytes.commits == by_message.commits


def test_warnings_on_the_bytes_path_name_the_row(caplog: pytest.LogCaptureFixture) -> None:
    stream = Stream()
    stream.feed(encode(MESSAGES), 0)
    stream.feed(encode(CALLS), 0)
    with caplog.at_level(logging.WARNING, logger="replicator.badges.applier"):
        for msg in (
            Begin(0x100, 0, 1),
            insert(MESSAGES_RULE, message(11, "u-ann", None)),
            insert(CALLS_RULE, call(12, None, "u-ben", "missed")),
            Commit(0, 0x100, 0x130, 0),
        ):
            stream.feed(encode(msg), 0x100)
    assert len(stream.state) == 0
    assert "public.messages row id=11" in caplog.text and "recipient_id" in caplog.text
    assert "public.calls row id=12" in caplog.text and "caller_id" in caplog.text
