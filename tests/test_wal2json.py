"""The wal2json decoder on output captured from PostgreSQL 15, and through the consumer."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.badges.applier import Applier
from replicator.errors import ProtocolError, SchemaError
from replicator.pg.changes import (
    UNCHANGED,
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    Update,
)
from replicator.pg.decoding.wal2json import Decoder, stream_options
from replicator.pg.feed import Wal2jsonFeed
from replicator.pg.lsn import format_lsn, parse_lsn
from tests.conftest import Database
from tests.support import (
    MISSED,
    UNREAD,
    Counts,
    caught_up,
    check_writes_during_startup,
    database_counts,
    default_applier,
    state_counts,
    sync_point,
)
from tests.wal2json_support import (
    running_wal2json_consumer,
)
from tests.workload import Workload

CAPTURE = Path(__file__).resolve().parent / "captures" / "wal2json-pg15.jsonl"

ALICE = "0a11ce00-0000-4000-8000-000000000001"
BOB = "0b0b0000-0000-4000-8000-000000000002"
CAROL = "0ca20100-0000-4000-8000-000000000003"
READ = "2024-05-06 08:00:00+00"
#: the steps of the capture whose changes the badge rules accept
GOOD_STEPS = 18


@dataclass(frozen=True)
class Captured:
    step: str
    action: str
    lsn: int
    payload: bytes


@cache
def capture() -> tuple[list[Captured], dict[str, Counts], list[str]]:
    """The captured XLogData, the badge counts after each step, and the steps in order."""
    records: list[Captured] = []
    after: dict[str, Counts] = {}
    steps: list[str] = []
    with CAPTURE.open() as f:
        for line in f:
            r = json.loads(line)
            if r["step"] not in steps:
                steps.append(r["step"])
            if "counts" in r:
                after[r["step"]] = {u: (c[UNREAD], c[MISSED]) for u, c in r["counts"].items()}
            else:
                records.append(
                    Captured(r["step"], r["action"], parse_lsn(r["lsn"]), r["payload"].encode())
                )
    return records, after, steps


def records(*steps: str) -> list[Captured]:
    return [r for r in capture()[0] if r.step in steps]


def steps(start: str | None = None, stop: str | None = None) -> list[str]:
    """The capture's steps from ``start`` up to, not including, ``stop``."""
    order = capture()[2]
    first = order.index(start) if start else 0
    last = order.index(stop) if stop else len(order)
    return order[first:last]


def counts_after(step: str) -> Counts:
    return capture()[1][step]


def decode_all(found: list[Captured]) -> list[tuple[Captured, Message]]:
    """Decode with every column of every table projected in place."""
    decoder = Decoder()
    out: list[tuple[Captured, Message]] = []

    def apply(msg: Message) -> None:
        if isinstance(msg, Relation):
            decoder.project(msg.relid, tuple(range(len(msg.columns))))
        out.append((record, msg))

    for record in found:
        decoder.decode(record.payload, record.lsn, apply)
    return out


def applier_from(state: Counts | None = None) -> tuple[Applier, Wal2jsonFeed]:
    """An applier fed by a fresh wal2json feed, starting from ``state``."""
    applier = default_applier()
    for user, (unread, missed) in (state or {}).items():
        applier.state.load(UNREAD, [(user, sender, n) for sender, n in unread.items()])
        applier.state.load(MISSED, [(user, caller, n) for caller, n in missed.items()])
    return applier, Wal2jsonFeed(applier, applier.tables())


# -- decoding what PostgreSQL 15 sent -----------------------------------------------------------


def test_capture_holds_every_action() -> None:
    assert {r.action for r in capture()[0]} == {"B", "C", "I", "U", "D", "T", "M"}
    assert len(steps(stop="identity default")) == GOOD_STEPS


def test_state_matches_the_database_after_every_step() -> None:
    applier, feed = applier_from()
    for step in steps(stop="identity default"):
        for record in records(step):
            feed(record.payload, record.lsn)
        assert not feed.in_transaction
        assert state_counts(applier.state) == counts_after(step), step
    assert feed.transactions > 10


def test_begin_and_commit_carry_the_commit_lsn_and_the_end_lsn() -> None:
    begin: Begin | None = None
    commits = 0
    for record, msg in decode_all(capture()[0]):
        if isinstance(msg, Begin):
            begin = msg
            assert msg.commit_time > 0
        elif isinstance(msg, Commit):
            assert begin is not None
            assert msg.commit_lsn == begin.final_lsn
            assert msg.commit_time == begin.commit_time
            # The walsender starts a commit's XLogData at the end of the commit record:
            # the position a status update confirms.
            assert msg.end_lsn == record.lsn > msg.commit_lsn
            commits += 1
            begin = None
    assert commits > 15


def test_commit_time_is_microseconds_since_2000() -> None:
    out: list[Message] = []
    payload = b'{"action":"B","timestamp":"2000-01-01 01:00:00.5+01","lsn":"0/10","nextlsn":"0/20"}'
    Decoder().decode(payload, 0, out.append)
    assert out == [Begin(0x10, 500_000, 0)]
    Decoder().decode(payload.replace(b"+01", b"-03:30"), 0, out.append)
    assert out[1] == Begin(0x10, (4 * 3600 + 30 * 60) * 1_000_000 + 500_000, 0)


def test_relations_are_announced_on_first_sight_and_on_column_changes() -> None:
    _, feed = applier_from()
    decoder = feed.decoder
    announced: list[tuple[str, Relation]] = []
    for record in records(*steps(stop="identity default")) + records("badge column dropped"):
        known = set(map(id, decoder.relations.values()))
        try:
            feed(record.payload, record.lsn)
        except SchemaError:
            assert record.step == "badge column dropped"
        announced += [(record.step, r) for r in decoder.relations.values() if id(r) not in known]
    assert [(step, rel.name) for step, rel in announced] == [
        ("insert", "messages"),
        ("call", "calls"),
        ("add column", "messages"),
        ("drop column", "messages"),
        ("badge column dropped", "calls"),
    ]
    names = {step: [c.name for c in rel.columns] for step, rel in announced}
    base = ["id", "sender_id", "recipient_id", "body", "created_at", "read_at"]
    assert names["insert"] == base
    assert names["add column"] == [*base, "priority"]
    assert names["drop column"] == base
    assert "seen_at" not in names["badge column dropped"]
    assert {rel.replica_identity for _, rel in announced} == {"f"}
    assert len({rel.relid for _, rel in announced}) == 2
    assert all(rel.namespace == "public" for _, rel in announced)


def test_tables_outside_add_tables_are_not_sent() -> None:
    assert [r.action for r in records("other table")] == ["M", "B", "C"]


def test_rows_decode_as_text() -> None:
    msgs = [msg for _, msg in decode_all(records("insert", "call", "read"))]
    inserts = [m for m in msgs if isinstance(m, Insert)]
    assert inserts[0].new is not None
    assert inserts[0].new[:4] == ["1", ALICE, BOB, "hello"]
    assert inserts[0].new[5] is None
    assert inserts[1].new is not None and inserts[1].new[5] == READ
    assert inserts[2].new is not None and inserts[2].new[3] == "missed"
    (update,) = [m for m in msgs if isinstance(m, Update)]
    assert update.old_kind == "O"
    assert update.old is not None and update.old[5] is None
    assert update.new is not None and update.new[5] == READ


def test_unchanged_toast_value_is_marked_unchanged() -> None:
    msgs = [msg for _, msg in decode_all(records("insert", "toast insert", "toast update"))]
    (update,) = [m for m in msgs if isinstance(m, Update)]
    assert update.new is not None and update.old is not None
    assert update.new[3] is UNCHANGED
    assert isinstance(update.old[3], str) and len(update.old[3]) == 6000
    assert update.new[1] == BOB and update.old[1] == CAROL


def test_truncate_names_each_table() -> None:
    msgs = [msg for _, msg in decode_all(records("insert", "call", "truncate"))]
    relids = {m.name: m.relid for m in msgs if isinstance(m, Relation)}
    truncates = [m for m in msgs if isinstance(m, Truncate)]
    assert truncates == [
        Truncate((relids["messages"],), False, False),
        Truncate((relids["calls"],), False, False),
    ]


def test_logical_messages() -> None:
    msgs = [(r, m) for r, m in decode_all(records("transactional message"))]
    found = [(r.lsn, m) for r, m in msgs if isinstance(m, LogicalMessage)]
    (marker_lsn, marker), (_, inside) = found
    assert marker == LogicalMessage(False, marker_lsn, "capture.step", b"transactional message")
    assert inside.transactional and inside.prefix == "capture"
    assert inside.content == b"inside a transaction"


def test_non_transactional_message_marks_everything_before_it_applied() -> None:
    _, feed = applier_from()
    for record in records(*steps(stop="delete")):
        feed(record.payload, record.lsn)
    marker = records("delete")[0]
    assert marker.action == "M"
    feed(marker.payload, marker.lsn)
    assert feed.applied_lsn == marker.lsn


def test_resume_skips_transactions_applied_before() -> None:
    applier, feed = applier_from()
    done = records(*steps(stop="delete"))
    for record in done:
        feed(record.payload, record.lsn)
    applied, transactions = feed.applied_lsn, feed.transactions
    # A reconnect that starts a little early replays the last transactions.
    for record in done[-12:] + records("delete"):
        feed(record.payload, record.lsn)
    assert feed.skipped_transactions >= 2
    assert feed.transactions == transactions + 1
    assert feed.applied_lsn > applied
    assert state_counts(applier.state) == counts_after("delete")


def test_truncate_first_after_start_is_applied() -> None:
    # A table's first sight after a (re)start may be a TRUNCATE, which carries no columns.
    applier, feed = applier_from(counts_after("drop column"))
    assert len(applier.state)
    for step in steps("truncate", "identity default"):
        for record in records(step):
            feed(record.payload, record.lsn)
        assert state_counts(applier.state) == counts_after(step), step


def test_delete_first_after_start_is_applied() -> None:
    applier, feed = applier_from(counts_after("add column"))
    for record in records("drop column"):
        feed(record.payload, record.lsn)
    assert state_counts(applier.state) == counts_after("drop column")


def test_update_with_key_only_identity_stops_the_stream() -> None:
    _, feed = applier_from()
    for record in records(*steps(stop="key-only update")):
        feed(record.payload, record.lsn)
    with pytest.raises(SchemaError, match="REPLICA IDENTITY FULL"):
        for record in records("key-only update"):
            feed(record.payload, record.lsn)


def test_delete_with_key_only_identity_stops_the_stream() -> None:
    _, feed = applier_from()
    for record in records(*steps(stop="key-only update")):
        feed(record.payload, record.lsn)
    with pytest.raises(SchemaError, match="REPLICA IDENTITY FULL"):
        for record in records("key-only delete"):
            feed(record.payload, record.lsn)


def test_key_only_delete_of_a_table_not_seen_yet_names_the_replica_identity() -> None:
    _, feed = applier_from(counts_after("key-only update"))
    with pytest.raises(SchemaError, match="replica identity 'd'"):
        for record in records("key-only delete"):
            feed(record.payload, record.lsn)


def test_dropped_badge_column_stops_the_stream() -> None:
    _, feed = applier_from()
    for record in records(*steps(stop="key-only update")):
        feed(record.payload, record.lsn)
    with pytest.raises(SchemaError, match="no column seen_at"):
        for record in records("badge column dropped"):
            feed(record.payload, record.lsn)


# -- hand-made objects ------------------------------------------------------------------------


def decode_one(obj: dict[str, Any], decoder: Decoder | None = None) -> list[Message]:
    decoder = decoder or Decoder()
    out: list[Message] = []

    def apply(msg: Message) -> None:
        if isinstance(msg, Relation):
            decoder.project(msg.relid, tuple(range(len(msg.columns))))
        out.append(msg)

    decoder.decode(json.dumps(obj).encode(), 0x1234, apply)
    return out


def columns(**values: object) -> list[dict[str, object]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def test_values_become_text_as_postgres_prints_them() -> None:
    raw = (
        b'{"action":"I","schema":"s","table":"t","columns":[{"name":"a","value":true},'
        b'{"name":"b","value":false},{"name":"c","value":1e+300},{"name":"d","value":-0.50},'
        b'{"name":"e","value":12345678901234567890123},{"name":"f","value":null},'
        b'{"name":"g","value":"x"}]}'
    )
    decoder = Decoder()
    out: list[Message] = []

    def apply(msg: Message) -> None:
        if isinstance(msg, Relation):
            decoder.project(msg.relid, tuple(range(len(msg.columns))))
        out.append(msg)

    decoder.decode(raw, 0, apply)
    assert out[1] == Insert(
        out[0].relid,  # type: ignore[union-attr]
        ["t", "f", "1e+300", "-0.50", "12345678901234567890123", None, "x"],
    )


def test_projection_puts_wanted_columns_in_their_slots() -> None:
    decoder = Decoder()
    out: list[Message] = []

    def apply(msg: Message) -> None:
        if isinstance(msg, Relation):
            decoder.project(msg.relid, (-1, 1, -1, 0))
        out.append(msg)

    obj = {"action": "I", "schema": "s", "table": "t", "columns": columns(a=1, b=2, c=3, d=4)}
    decoder.decode(json.dumps(obj).encode(), 0, apply)
    assert out[1] == Insert(1, ["4", "2"])


def test_tables_without_projection_decode_to_no_rows() -> None:
    out: list[Message] = []
    obj = {"action": "I", "schema": "s", "table": "t", "columns": columns(a=1)}
    Decoder().decode(json.dumps(obj).encode(), 0, out.append)
    assert out[1] == Insert(1, None)


def test_same_columns_announce_the_table_once() -> None:
    decoder = Decoder()
    obj = {"action": "I", "schema": "s", "table": "t", "columns": columns(a=1, b=None)}
    first = decode_one(obj, decoder)
    second = decode_one(obj, decoder)
    assert [type(m) for m in first] == [Relation, Insert]
    assert [type(m) for m in second] == [Insert]
    other = decode_one({**obj, "table": "u"}, decoder)
    assert isinstance(other[0], Relation) and other[0].relid != first[0].relid  # type: ignore[union-attr]


def test_update_without_identity_has_no_old_row() -> None:
    decoder = Decoder()
    decode_one({"action": "I", "schema": "s", "table": "t", "columns": columns(id=1, a=2)}, decoder)
    (update,) = decode_one(
        {"action": "U", "schema": "s", "table": "t", "columns": columns(id=1, a=3)}, decoder
    )
    assert update == Update(1, None, ["1", "3"], "")


def test_replica_identity_of_a_table_first_seen_in_an_update() -> None:
    full = decode_one(
        {
            "action": "U",
            "schema": "s",
            "table": "t",
            "columns": columns(id=1, a=3),
            "identity": columns(id=1, a=2),
        }
    )
    assert full[0].replica_identity == "f"  # type: ignore[union-attr]
    assert full[1] == Update(1, ["1", "2"], ["1", "3"], "O")
    key_only = decode_one(
        {
            "action": "U",
            "schema": "s",
            "table": "t",
            "columns": columns(id=1, a=3),
            "identity": columns(id=1),
        }
    )
    assert key_only[0].replica_identity == "d"  # type: ignore[union-attr]
    assert key_only[1] == Update(1, ["1", None], ["1", "3"], "K")


def test_options_ask_for_what_the_decoder_needs() -> None:
    options = stream_options([("app", "messages"), ("app", "calls")])
    assert options["format-version"] == "2"
    assert options["include-lsn"] == "true"
    assert options["include-transaction"] == "true"
    assert options["add-tables"] == "app.messages,app.calls"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "malformed wal2json message at 0/1234"),
        (b"{", "malformed wal2json message at 0/1234"),
        (b"\xff\xfe\x00", "malformed wal2json message at 0/1234"),
        (b"[1]", "wal2json message at 0/1234 is a JSON list, not an object"),
        (b'{"action":"X"}', "unknown wal2json action 'X' at 0/1234"),
        (b'{"action":null}', "unknown wal2json action 'None' at 0/1234"),
        (b'{"kind":"insert"}', "unknown wal2json action 'None' at 0/1234"),
        (
            b'{"action":"B","timestamp":"2024-01-01 00:00:00+00"}',
            "malformed wal2json 'B' message at 0/1234: no lsn (is wal2json started with"
            " include-lsn?)",
        ),
        (
            b'{"action":"C","lsn":"0/10"}',
            "malformed wal2json 'C' message at 0/1234: no nextlsn",
        ),
        (b'{"action":"C","lsn":"10","nextlsn":"0/10"}', "invalid LSN '10'"),
        (b'{"action":"B","lsn":"0/10","xid":"x"}', "xid is 'x', expected a transaction id"),
        (
            b'{"action":"I","schema":"s","columns":[]}',
            "malformed wal2json 'I' message at 0/1234: table is null, expected a string",
        ),
        (
            b'{"action":"I","schema":"s","table":"t","columns":{}}',
            "columns is an object, expected a list of columns",
        ),
        (b'{"action":"I","schema":"s","table":"t","columns":[1]}', "column is '1'"),
        (
            b'{"action":"I","schema":"s","table":"t","columns":[{"name":"a"}]}',
            "column 'a' has no value",
        ),
        (
            b'{"action":"I","schema":"s","table":"t","columns":[{"name":"a","value":[]}]}',
            "column 'a' has value a list",
        ),
        (
            b'{"action":"I","schema":"s","table":"t","columns":'
            b'[{"name":"a","value":1},{"name":"a","value":2}]}',
            "repeated column names",
        ),
        (b'{"action":"D","schema":"s","table":"t"}', "identity is null"),
        (b'{"action":"M","lsn":"0/1","transactional":1}', "transactional is '1'"),
        (
            b'{"action":"M","transactional":false,"prefix":"p","content":"\\ud800"}',
            "content is not UTF-8",
        ),
    ],
)
def test_malformed_objects_name_what_and_the_lsn(payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match="at 0/1234") as info:
        Decoder().decode(payload, 0x1234, lambda msg: None)
    assert error in str(info.value)


def _decode_anything(data: bytes) -> None:
    decoder = Decoder()
    out: list[Message] = []

    def apply(msg: Message) -> None:
        if isinstance(msg, Relation):
            decoder.project(msg.relid, tuple(range(len(msg.columns))))
        out.append(msg)

    with contextlib.suppress(ProtocolError):
        decoder.decode(data, 0, apply)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _decode_anything(data)


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_raises_only_protocol_errors(text: str) -> None:
    _decode_anything(text.encode("utf-8", "surrogatepass"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
column_lists = st.lists(
    st.fixed_dictionaries({"name": st.sampled_from(["id", "a", "b"]), "value": json_values})
    | json_values,
    max_size=4,
)


@settings(max_examples=1000, deadline=None)
@given(
    obj=st.fixed_dictionaries(
        {"action": st.sampled_from(list("BCIUDTMX"))},
        optional={
            "lsn": st.sampled_from(["0/10", "1/FFFFFFFF", "", "x/y", "0/"]) | json_values,
            "nextlsn": st.sampled_from(["0/20", "zz"]) | json_values,
            "timestamp": st.sampled_from(["2024-01-01 00:00:00+00", "infinity"]) | json_values,
            "xid": st.integers(-1, 2**40) | json_values,
            "schema": st.sampled_from(["public", "s"]) | json_values,
            "table": st.sampled_from(["messages", "calls", "t"]) | json_values,
            "columns": column_lists | json_values,
            "identity": column_lists | json_values,
            "transactional": json_values,
            "prefix": json_values,
            "content": json_values,
        },
    )
)
def test_arbitrary_objects_raise_only_protocol_errors(obj: dict[str, Any]) -> None:
    _decode_anything(json.dumps(obj).encode())


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 2000), flip=st.integers(0, 2000), byte=st.integers(0, 255))
def test_damaged_captures_raise_only_protocol_errors(cut: int, flip: int, byte: int) -> None:
    for record in records("toast update", "drop column", "truncate"):
        data = bytearray(record.payload[: cut or None])
        if data:
            data[flip % len(data)] = byte
        _decode_anything(bytes(data))


# -- end to end, on a server with wal2json ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.slow
async def test_random_workload_is_exact(wal2json_database: Database) -> None:
    """Hundreds of random transactions, a TRUNCATE and a 50,000-row transaction."""
    db = wal2json_database
    workload = Workload(seed=20261125)
    await workload.run(db.dsn, 30)
    async with running_wal2json_consumer(db.dsn, db.slot) as consumer:
        await workload.run(db.dsn, 400, truncate_at=150, big_at=300, big_rows=50_000)
        await caught_up(consumer, db.dsn)
        expected = await database_counts(db.dsn)
        assert state_counts(consumer.state) == expected
        assert expected, "the workload should leave badges behind"
        assert workload.rolled_back > 0
        assert consumer.feed.transactions > 300
        assert consumer.feed.rows > 50_000


@pytest.mark.anyio
async def test_each_commit_matches_the_database_as_of_that_commit(
    wal2json_database: Database,
) -> None:
    db = wal2json_database
    workload = Workload(seed=8)
    async with (
        running_wal2json_consumer(db.dsn, db.slot) as consumer,
        await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn,
    ):
        for _ in range(40):
            await workload.transaction(conn)
            await caught_up(consumer, db.dsn)
            assert state_counts(consumer.state) == await database_counts(db.dsn)
            assert consumer.state.lsn <= consumer.applied_lsn


@pytest.mark.anyio
async def test_writes_during_startup_are_counted_once(wal2json_database: Database) -> None:
    db = wal2json_database
    await check_writes_during_startup(db.dsn, db.slot, seed=98, decoder="wal2json")


@pytest.mark.anyio
async def test_reconnect_resumes_without_counting_twice(wal2json_database: Database) -> None:
    db = wal2json_database
    workload = Workload(seed=31)
    async with running_wal2json_consumer(db.dsn, db.slot, status_interval=0.2) as consumer:
        await workload.run(db.dsn, 60)
        await caught_up(consumer, db.dsn)
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as admin:
            for round_ in range(2):
                await workload.run(db.dsn, 40)
                await admin.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND active",
                    (db.slot,),
                )
                with anyio.fail_after(60):
                    while consumer.reconnects <= round_:
                        await anyio.sleep(0.02)
                await workload.run(db.dsn, 20)
                await caught_up(consumer, db.dsn)
                assert state_counts(consumer.state) == await database_counts(db.dsn)
    assert consumer.snapshots == 1, "a reconnect resumes the stream, it does not re-snapshot"


@pytest.mark.anyio
async def test_confirmed_flush_follows_the_applied_lsn(wal2json_database: Database) -> None:
    db = wal2json_database
    workload = Workload(seed=6)
    async with running_wal2json_consumer(db.dsn, db.slot, status_interval=0.05) as consumer:
        await workload.run(db.dsn, 50)
        target = await sync_point(db.dsn)
        await caught_up(consumer, db.dsn)
        async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as admin:
            with anyio.fail_after(30):
                while True:
                    cur = await admin.execute(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        (db.slot,),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    confirmed = parse_lsn(str(row[0]))
                    assert confirmed <= consumer.applied_lsn
                    if confirmed >= target:
                        break
                    await anyio.sleep(0.05)
    assert format_lsn(consumer.state.lsn) != "0/0"
