"""The pgoutput decoder on bytes captured from PostgreSQL 18 and 15 (tests/captures/capture.py)."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import ProtocolError
from replicator.pg.changes import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    Truncate,
    Type,
    Update,
    Value,
    Values,
)
from replicator.pg.decoding.pgoutput import Decoder
from replicator.pg.lsn import format_lsn, parse_lsn
from tests.support import CALLS_COLUMNS, MESSAGES_COLUMNS

CAPTURES = Path(__file__).resolve().parent / "captures"
VERSIONS = ("pg18", "pg15")
M = TypeVar("M")

ALICE = "0a11ce00-0000-4000-8000-000000000001"
BOB = "0b0b0000-0000-4000-8000-000000000002"
CAROL = "0ca20100-0000-4000-8000-000000000003"
CREATED = "2024-05-06 07:08:09.123456+00"
READ = "2024-05-06 08:00:00+00"


@dataclass(frozen=True)
class Captured:
    kind: str  # "text" or "binary": the pass that streamed it
    step: str
    label: str
    lsn: int
    payload: bytes


@cache
def captured(version: str) -> tuple[Captured, ...]:
    records = []
    with (CAPTURES / f"{version}.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            records.append(
                Captured(
                    r["pass"],
                    r["step"],
                    r["label"],
                    parse_lsn(r["lsn"]),
                    bytes.fromhex(r["payload"]),
                )
            )
    return tuple(records)


def decode_all(version: str, kind: str = "text") -> list[tuple[Captured, Message]]:
    """Every message of one pass, with every column of every relation decoded in place."""
    decoder = Decoder()
    out: list[tuple[Captured, Message]] = []
    for record in captured(version):
        if record.kind != kind:
            continue
        msg = decoder.decode(record.payload, record.lsn)
        if isinstance(msg, Relation):
            decoder.project(msg.relid, tuple(range(len(msg.columns))))
        out.append((record, msg))
    return out


def step(version: str, name: str, kind: str = "text") -> list[Message]:
    return [msg for record, msg in decode_all(version, kind) if record.step == name]


def only(messages: list[Message], cls: type[M]) -> list[M]:
    return [m for m in messages if isinstance(m, cls)]


def relations(version: str) -> dict[str, Relation]:
    return {m.name: m for _, m in decode_all(version) if isinstance(m, Relation)}


def pg_micros(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return (moment - datetime(2000, 1, 1, tzinfo=UTC)) // _MICROSECOND


_MICROSECOND = datetime(2000, 1, 1, 0, 0, 0, 1) - datetime(2000, 1, 1)

versions = pytest.mark.parametrize("version", VERSIONS)


# -- every kind of message, decoded exactly ---------------------------------------------------


@versions
def test_captures_hold_every_message_kind(version: str) -> None:
    for kind in ("text", "binary"):
        labels = {r.label for r in captured(version) if r.kind == kind}
        assert labels == {
            "Begin",
            "Commit",
            "Relation",
            "Type",
            "Origin",
            "Insert",
            "Update",
            "Delete",
            "Truncate",
            "Message",
        }


@versions
def test_begin_and_commit_frame_each_transaction(version: str) -> None:
    begin: Begin | None = None
    xids: list[int] = []
    for record, msg in decode_all(version):
        if isinstance(msg, Begin):
            assert begin is None
            begin = msg
            xids.append(msg.xid)
        elif isinstance(msg, Commit):
            assert begin is not None
            assert msg.flags == 0
            assert msg.commit_lsn == begin.final_lsn
            assert msg.commit_time == begin.commit_time
            assert msg.end_lsn > msg.commit_lsn
            # the walsender sends a commit at the end of its commit record
            assert record.lsn == msg.end_lsn
            begin = None
        else:
            assert (begin is None) == (isinstance(msg, LogicalMessage) and not msg.transactional), (
                msg
            )
    assert begin is None
    assert len(xids) == 17
    assert xids == sorted(xids) and all(x > 0 for x in xids)


@versions
def test_relation_messages(version: str) -> None:
    rels = relations(version)
    assert set(rels) == {"messages", "calls", "moods"}
    for name, expected in (("messages", MESSAGES_COLUMNS), ("calls", CALLS_COLUMNS)):
        rel = rels[name]
        assert (rel.namespace, rel.name, rel.qualified_name) == ("public", name, f"public.{name}")
        assert rel.replica_identity == "f"
        assert [(c.name, c.type_oid) for c in rel.columns] == expected
        # with replica identity full every column is part of the identity
        assert all(c.is_key for c in rel.columns)
        assert all(c.type_modifier == -1 for c in rel.columns)
    moods = rels["moods"]
    assert moods.replica_identity == "d"
    assert [(c.name, c.is_key) for c in moods.columns] == [
        ("id", True),
        ("mood", False),
        ("note", False),
    ]
    assert moods.columns[0].type_oid == 23
    assert moods.columns[2].type_oid == 25
    assert rels["messages"].relid != rels["calls"].relid


@versions
def test_relation_is_remembered_by_the_decoder(version: str) -> None:
    decoder = Decoder()
    for record in captured(version):
        if record.label == "Relation" and record.kind == "text":
            rel = decoder.decode(record.payload, record.lsn)
            assert decoder.relations[rel.relid] == rel  # type: ignore[union-attr]
    assert {r.name for r in decoder.relations.values()} == {"messages", "calls", "moods"}


@versions
def test_type_message_announces_the_enum(version: str) -> None:
    messages = step(version, "enum")
    kinds = [type(m) for m in messages]
    assert kinds == [Begin, Type, Relation, Insert, Commit]
    typ = only(messages, Type)[0]
    rel = only(messages, Relation)[0]
    assert (typ.namespace, typ.name) == ("public", "mood")
    assert typ.oid == rel.columns[1].type_oid
    assert typ.oid >= 16384, "a user-defined type"


@versions
def test_origin_message(version: str) -> None:
    for kind in ("text", "binary"):
        messages = step(version, "origin", kind)
        assert [type(m) for m in messages] == [Begin, Origin, Insert, Commit]
        assert messages[1] == Origin(0xABCDEF, "capture_origin")
        begin = only(messages, Begin)[0]
        # a replayed transaction keeps the commit time its origin gave it
        assert begin.commit_time == pg_micros(CREATED)
        insert = only(messages, Insert)[0]
        assert insert.new is not None
        assert insert.new[1:4] == (
            [BOB, CAROL, "answered"]
            if kind == "text"
            else [uuid.UUID(BOB).bytes, uuid.UUID(CAROL).bytes, b"answered"]
        )


@versions
def test_inserts_decode_every_value(version: str) -> None:
    rels = relations(version)
    messages = step(version, "insert")
    assert [type(m) for m in messages] == [Begin, Relation, Insert, Insert, Commit]
    first, second = only(messages, Insert)
    assert first == Insert(rels["messages"].relid, ["1", ALICE, BOB, "hello", CREATED, None])
    assert second == Insert(rels["messages"].relid, ["2", BOB, ALICE, "hi", CREATED, READ])
    (call,) = only(step(version, "call"), Insert)
    assert call == Insert(rels["calls"].relid, ["1", ALICE, BOB, "missed", CREATED, None])
    (mood,) = only(step(version, "enum"), Insert)
    assert mood == Insert(rels["moods"].relid, ["1", "ok", None])


@versions
def test_updates_carry_the_whole_old_row(version: str) -> None:
    relid = relations(version)["messages"].relid
    (read,) = only(step(version, "read"), Update)
    assert read == Update(
        relid,
        ["1", ALICE, BOB, "hello", CREATED, None],
        ["1", ALICE, BOB, "hello", CREATED, READ],
        "O",
    )
    (moved,) = only(step(version, "recipient"), Update)
    assert moved.old == ["2", BOB, ALICE, "hi", CREATED, READ]
    assert moved.new == ["2", BOB, CAROL, "hi", CREATED, READ]
    (seen,) = only(step(version, "call seen"), Update)
    assert seen.old == ["1", ALICE, BOB, "missed", CREATED, None]
    assert seen.new == ["1", ALICE, BOB, "missed", CREATED, READ]
    assert seen.old_kind == "O"


@versions
def test_update_without_old_row_under_default_identity(version: str) -> None:
    (update,) = only(step(version, "enum update"), Update)
    assert update == Update(relations(version)["moods"].relid, None, ["1", "happy", "better"], "")


@versions
def test_deletes(version: str) -> None:
    rels = relations(version)
    (full,) = only(step(version, "delete"), Delete)
    assert full == Delete(rels["messages"].relid, ["2", BOB, CAROL, "hi", CREATED, READ], "O")
    (key,) = only(step(version, "enum delete"), Delete)
    assert key == Delete(rels["moods"].relid, ["1", None, None], "K")


@versions
def test_unchanged_toast_value(version: str) -> None:
    (insert,) = only(step(version, "toast insert"), Insert)
    assert insert.new is not None
    body = insert.new[3]
    assert isinstance(body, str) and len(body) == 6000
    (update,) = only(step(version, "toast update"), Update)
    assert update.old == ["3", CAROL, ALICE, body, CREATED, None]
    assert update.new == ["3", CAROL, ALICE, UNCHANGED, CREATED, READ]
    assert repr(UNCHANGED) == "UNCHANGED"


@versions
def test_rolled_back_savepoint_is_not_sent(version: str) -> None:
    inserts = only(step(version, "savepoint"), Insert)
    assert [i.new[3] for i in inserts if i.new] == ["kept"]


@versions
def test_logical_messages(version: str) -> None:
    messages = step(version, "transactional message")
    assert [type(m) for m in messages] == [Begin, Insert, LogicalMessage, Commit]
    inside = only(messages, LogicalMessage)[0]
    assert (inside.transactional, inside.prefix, inside.content) == (
        True,
        "capture",
        b"inside a transaction",
    )
    assert 0 < inside.lsn <= only(messages, Begin)[0].final_lsn
    records = [(r, m) for r, m in decode_all(version) if r.step == "message"]
    assert len(records) == 1
    record, outside = records[0]
    assert outside == LogicalMessage(False, record.lsn, "capture", b"\x00\xff")


@versions
def test_truncates(version: str) -> None:
    rels = relations(version)
    (both,) = only(step(version, "truncate"), Truncate)
    assert both == Truncate((rels["messages"].relid, rels["calls"].relid), True, True)
    messages = step(version, "truncate then insert")
    assert [type(m) for m in messages] == [Begin, Relation, Truncate, Insert, Commit]
    assert only(messages, Truncate)[0] == Truncate((rels["messages"].relid,), False, False)
    # RESTART IDENTITY in the previous transaction started the ids over
    assert only(messages, Insert)[0].new == ["1", BOB, ALICE, "after truncate", CREATED, None]
    (one,) = only(step(version, "truncate one"), Truncate)
    assert one == Truncate((rels["moods"].relid,), False, False)


@versions
def test_binary_values(version: str) -> None:
    def int8(n: int) -> bytes:
        return struct.pack(">q", n)

    def uid(text: str) -> bytes:
        return uuid.UUID(text).bytes

    created, read = int8(pg_micros(CREATED)), int8(pg_micros(READ))
    first, second = only(step(version, "insert", "binary"), Insert)
    assert first.new == [int8(1), uid(ALICE), uid(BOB), b"hello", created, None]
    assert second.new == [int8(2), uid(BOB), uid(ALICE), b"hi", created, read]
    (mood,) = only(step(version, "enum", "binary"), Insert)
    assert mood.new == [struct.pack(">i", 1), b"ok", None]
    (update,) = only(step(version, "toast update", "binary"), Update)
    assert update.new == [int8(3), uid(CAROL), uid(ALICE), UNCHANGED, created, read]
    assert update.old is not None
    body = update.old[3]
    assert isinstance(body, bytes) and len(body) == 6000
    (delete,) = only(step(version, "enum delete", "binary"), Delete)
    assert delete == Delete(delete.relid, [struct.pack(">i", 1), None, None], "K")


@versions
def test_both_passes_see_the_same_transactions(version: str) -> None:
    def shape(kind: str) -> list[tuple[str, str]]:
        return [(r.step, r.label) for r in captured(version) if r.kind == kind]

    assert shape("text") == shape("binary")


# -- projection: only wanted columns are decoded, each in its slot ----------------------------


def _decoder_with_relations(version: str) -> tuple[Decoder, dict[str, Relation]]:
    decoder = Decoder()
    rels: dict[str, Relation] = {}
    for record in captured(version):
        if record.kind == "text" and record.label == "Relation":
            rel = decoder.decode(record.payload, record.lsn)
            assert isinstance(rel, Relation)
            rels[rel.name] = rel
    return decoder, rels


def _payloads(version: str, step_name: str, label: str, kind: str = "text") -> list[Captured]:
    return [
        r for r in captured(version) if r.kind == kind and r.step == step_name and r.label == label
    ]


@versions
def test_projection_puts_wanted_columns_in_their_slots(version: str) -> None:
    decoder, rels = _decoder_with_relations(version)
    relid = rels["messages"].relid
    # id, sender_id, recipient_id, body, created_at, read_at -> recipient, sender, read_at, id
    decoder.project(relid, (3, 1, 0, -1, -1, 2))
    first, second = (decoder.decode(r.payload) for r in _payloads(version, "insert", "Insert"))
    assert first == Insert(relid, [BOB, ALICE, None, "1"])
    assert second == Insert(relid, [ALICE, BOB, READ, "2"])
    (record,) = _payloads(version, "toast update", "Update")
    update = decoder.decode(record.payload)
    assert update == Update(relid, [ALICE, CAROL, None, "3"], [ALICE, CAROL, READ, "3"], "O")


@versions
def test_projection_of_a_few_columns_leaves_a_short_tuple(version: str) -> None:
    decoder, rels = _decoder_with_relations(version)
    relid = rels["calls"].relid
    decoder.project(relid, (-1, -1, 0, -1, -1, -1))
    (record,) = _payloads(version, "call", "Insert")
    assert decoder.decode(record.payload) == Insert(relid, [BOB])


@versions
def test_skipped_columns_are_not_decoded(version: str) -> None:
    decoder, rels = _decoder_with_relations(version)
    relid = rels["messages"].relid
    (record,) = _payloads(version, "toast insert", "Insert")
    body_at = record.payload.index(b"\0\0\x17\x70") + 4  # the 6000-byte body's length word
    broken = record.payload[:body_at] + b"\xff" + record.payload[body_at + 1 :]
    decoder.project(relid, (-1, 0, 1, -1, -1, -1))
    assert decoder.decode(broken) == Insert(relid, [CAROL, ALICE])
    decoder.project(relid, (-1, 0, 1, 2, -1, -1))
    with pytest.raises(ProtocolError, match="malformed 'I' message at 0/2A"):
        decoder.decode(broken, 0x2A)


@versions
def test_relations_without_projection_decode_to_no_tuples(version: str) -> None:
    decoder, rels = _decoder_with_relations(version)
    relid = rels["messages"].relid
    (insert,) = _payloads(version, "toast insert", "Insert")
    assert decoder.decode(insert.payload) == Insert(relid, None)
    (update,) = _payloads(version, "read", "Update")
    assert decoder.decode(update.payload) == Update(relid, None, None, "O")
    (delete,) = _payloads(version, "enum delete", "Delete")
    assert decoder.decode(delete.payload) == Delete(rels["moods"].relid, None, "K")
    decoder.project(relid, (-1, 0, -1, -1, -1, -1))
    assert decoder.decode(insert.payload) == Insert(relid, [CAROL])
    decoder.forget(relid)
    assert decoder.decode(insert.payload) == Insert(relid, None)


@versions
def test_a_new_relation_message_drops_the_projection(version: str) -> None:
    """Columns may have moved: the caller must project the relation again."""
    decoder, rels = _decoder_with_relations(version)
    relid = rels["messages"].relid
    decoder.project(relid, (0, -1, -1, -1, -1, -1))
    (insert,) = _payloads(version, "toast insert", "Insert")
    assert decoder.decode(insert.payload) == Insert(relid, ["3"])
    relation = next(
        r
        for r in _payloads(version, "truncate", "Relation")
        if r.payload[1:5] == struct.pack(">I", relid)
    )
    decoder.decode(relation.payload)
    assert decoder.decode(insert.payload) == Insert(relid, None)


@versions
def test_tuple_wider_than_the_projection_is_an_error(version: str) -> None:
    decoder, rels = _decoder_with_relations(version)
    decoder.project(rels["messages"].relid, (0, 1, 2))
    (insert,) = _payloads(version, "insert", "Insert")[:1]
    with pytest.raises(ProtocolError, match="tuple of 6 columns for a relation of 3"):
        decoder.decode(insert.payload, insert.lsn)


# -- errors name the byte and the LSN ---------------------------------------------------------


def test_unknown_message_type_names_the_byte_and_the_lsn() -> None:
    with pytest.raises(ProtocolError) as info:
        Decoder().decode(b"Zsomething", 0x16B3748)
    assert "0x5a" in str(info.value)
    assert "'Z'" in str(info.value)
    assert "0/16B3748" in str(info.value)


@pytest.mark.parametrize("tag", [b"S", b"E", b"A", b"P", b"K", b"r", b"\x00", b"\xff"])
def test_messages_of_later_protocol_versions_are_unknown(tag: bytes) -> None:
    """Streaming (v2), two-phase (v3) and others never come with proto_version 1."""
    with pytest.raises(ProtocolError, match=r"unknown pgoutput message type .* at 1/0"):
        Decoder().decode(tag + b"\0" * 20, 1 << 32)


def test_empty_message_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="empty pgoutput message at 0/10"):
        Decoder().decode(b"", 16)


@versions
def test_truncated_messages_name_the_type_and_the_lsn(version: str) -> None:
    decoder, _ = _decoder_with_relations(version)
    for record in captured(version):
        if record.kind == "text":
            tag = chr(record.payload[0])
            with pytest.raises(ProtocolError, match=f"'{tag}' message at 0/1234"):
                decoder.decode(record.payload[:-1], 0x1234)


# -- arbitrary and damaged bytes raise ProtocolError and nothing else -------------------------


def _all_payloads() -> list[bytes]:
    return [r.payload for version in VERSIONS for r in captured(version)]


def _setups() -> dict[str, Callable[[], Decoder]]:
    def fresh() -> Decoder:
        return Decoder()

    def known() -> Decoder:
        return _decoder_with_relations("pg18")[0]

    def projected(partial: bool) -> Callable[[], Decoder]:
        def make() -> Decoder:
            decoder = Decoder()
            for version in VERSIONS:
                for record in captured(version):
                    if record.label != "Relation":
                        continue
                    rel = decoder.decode(record.payload)
                    assert isinstance(rel, Relation)
                    n = len(rel.columns)
                    slots = tuple((n - 1 - i if i % 2 else -1) if partial else i for i in range(n))
                    decoder.project(rel.relid, slots)
            return decoder

        return make

    return {
        "fresh": fresh,
        "known": known,
        "projected": projected(False),
        "partial": projected(True),
    }


SETUPS = _setups()


def _decode_or_protocol_error(decoder: Decoder, data: bytes, lsn: int) -> None:
    try:
        decoder.decode(data, lsn)
    except ProtocolError as exc:
        assert format_lsn(lsn) in str(exc)
    try:
        decoder.decode(memoryview(data), lsn)
    except ProtocolError as exc:
        assert format_lsn(lsn) in str(exc)
    try:
        decoder.insert_row(data, lsn)
    except ProtocolError as exc:
        assert format_lsn(lsn) in str(exc)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_all_payloads())))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["cut", "flip", "insert", "drop", "length"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "cut":
            del data[at:]
        elif how == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "drop":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "length":
            data[at : at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
    return bytes(data)


fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(
    setup=st.sampled_from(sorted(SETUPS)),
    data=st.binary(max_size=200),
    lsn=st.integers(0, 2**64 - 1),
)
def test_arbitrary_bytes_raise_only_protocol_errors(setup: str, data: bytes, lsn: int) -> None:
    _decode_or_protocol_error(SETUPS[setup](), data, lsn)


@fuzz
@given(
    setup=st.sampled_from(sorted(SETUPS)),
    tag=st.sampled_from(list(b"BCRYOIUDTM")),
    body=st.binary(max_size=120),
    lsn=st.integers(0, 2**64 - 1),
)
def test_known_tags_with_arbitrary_bodies_raise_only_protocol_errors(
    setup: str, tag: int, body: bytes, lsn: int
) -> None:
    _decode_or_protocol_error(SETUPS[setup](), bytes([tag]) + body, lsn)


@fuzz
@given(setup=st.sampled_from(sorted(SETUPS)), data=damaged(), lsn=st.integers(0, 2**64 - 1))
def test_damaged_captures_raise_only_protocol_errors(setup: str, data: bytes, lsn: int) -> None:
    _decode_or_protocol_error(SETUPS[setup](), data, lsn)


@fuzz
@given(
    setup=st.sampled_from(sorted(SETUPS)),
    payloads=st.lists(st.one_of(damaged(), st.sampled_from(_all_payloads())), max_size=12),
)
def test_decoder_state_survives_damaged_streams(setup: str, payloads: list[bytes]) -> None:
    decoder = SETUPS[setup]()
    for lsn, data in enumerate(payloads):
        _decode_or_protocol_error(decoder, data, lsn)


def test_captured_payloads_decode_after_damage() -> None:
    """A damaged message leaves no trace: the next good one decodes as if nothing happened."""
    for version in VERSIONS:
        decoder = Decoder()
        clean = decode_all(version)
        for record, expected in clean:
            with pytest.raises(ProtocolError):
                decoder.decode(record.payload + b"\0", record.lsn)
            msg = decoder.decode(record.payload, record.lsn)
            if isinstance(msg, Relation):
                decoder.project(msg.relid, tuple(range(len(msg.columns))))
            assert msg == expected


def _values(msg: Message) -> Iterator[Values]:
    if isinstance(msg, Insert) and msg.new is not None:
        yield msg.new
    if isinstance(msg, Update | Delete) and msg.old is not None:
        yield msg.old
    if isinstance(msg, Update) and msg.new is not None:
        yield msg.new


@versions
def test_text_values_are_str_and_binary_values_are_bytes(version: str) -> None:
    for kind, cls in (("text", str), ("binary", bytes)):
        for _, msg in decode_all(version, kind):
            for values in _values(msg):
                for value in values:
                    assert value is None or value is UNCHANGED or type(value) is cls


# -- the inline Insert path and the compiled readers -------------------------------------------


@versions
def test_insert_row_is_decode_without_the_message(version: str) -> None:
    for kind in ("text", "binary"):
        decoder = Decoder()
        for record, expected in decode_all(version, kind):
            if isinstance(expected, Insert):
                assert decoder.insert_row(record.payload, record.lsn) == tuple(expected)
                assert decoder.insert_row(memoryview(record.payload)) == tuple(expected)
            msg = decoder.decode(record.payload, record.lsn)
            if isinstance(msg, Relation):
                decoder.project(msg.relid, tuple(range(len(msg.columns))))


def test_insert_row_rejects_other_messages() -> None:
    with pytest.raises(ProtocolError, match=r"expected an 'I' message, got 0x42 .* at 0/7"):
        Decoder().insert_row(b"B" + b"\0" * 20, 7)
    with pytest.raises(ProtocolError, match="empty pgoutput message at 0/7"):
        Decoder().insert_row(b"", 7)


RELID = 4242
UUID_COLUMNS = ("a", "b", "c", "d")
UUID_RELATION = (
    b"R"
    + struct.pack(">I", RELID)
    + b"public\0rows\0f"
    + struct.pack(">H", len(UUID_COLUMNS))
    + b"".join(b"\1" + c.encode() + b"\0" + struct.pack(">Ii", 2950, -1) for c in UUID_COLUMNS)
)


def encode_tuple(values: list[Value]) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        elif isinstance(value, str):
            raw = value.encode()
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
        else:
            assert isinstance(value, bytes)
            out.append(b"b" + struct.pack(">I", len(value)) + value)
    return b"".join(out)


row_values = st.lists(
    st.one_of(
        st.none(),
        st.just(UNCHANGED),
        st.text(max_size=40),
        st.uuids().map(str),
        st.uuids().map(lambda u: u.bytes),
        st.binary(max_size=40),
    ),
    min_size=len(UUID_COLUMNS),
    max_size=len(UUID_COLUMNS),
)


@settings(max_examples=300, deadline=None)
@given(values=row_values, slots=st.permutations(range(len(UUID_COLUMNS))), cut=st.integers(0, 4))
def test_readers_decode_what_was_encoded(values: list[Value], slots: list[int], cut: int) -> None:
    """Any row, under any projection, through the uuid fast path or the general one."""
    # the last `cut` slots are dropped from the projection: those columns are skipped
    projection = tuple(s if s < len(slots) - cut else -1 for s in slots)
    expected: list[Value] = [None] * (max(projection, default=-1) + 1)
    for col, slot in enumerate(projection):
        if slot >= 0:
            expected[slot] = values[col]
    insert = b"I" + struct.pack(">I", RELID) + b"N" + encode_tuple(values)
    update = b"U" + struct.pack(">I", RELID) + b"O" + encode_tuple(values)
    update += b"N" + encode_tuple(values[::-1])
    for known_types in (True, False):
        decoder = Decoder()
        if known_types:
            decoder.decode(UUID_RELATION)
        decoder.project(RELID, projection)
        assert decoder.insert_row(insert) == (RELID, expected)
        assert decoder.decode(insert) == Insert(RELID, expected)
        reversed_expected: list[Value] = [None] * len(expected)
        for col, slot in enumerate(projection):
            if slot >= 0:
                reversed_expected[slot] = values[::-1][col]
        assert decoder.decode(update) == Update(RELID, expected, reversed_expected, "O")
        # fewer columns than the relation has: the general path
        short = b"I" + struct.pack(">I", RELID) + b"N" + encode_tuple(values[:2])
        partial: list[Value] = [None] * len(expected)
        for col, slot in enumerate(projection[:2]):
            if slot >= 0:
                partial[slot] = values[col]
        assert decoder.insert_row(short) == (RELID, partial)
