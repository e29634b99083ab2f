"""Record wal2json (format-version 2) output from PostgreSQL 15 into wal2json-pg15.jsonl.

Each XLogData becomes ``{"step", "action", "lsn", "payload"}`` (``lsn`` is the XLogData start,
``payload`` the plugin's JSON text as sent); after each step's records comes
``{"step", "counts"}``: what the badge queries returned right after that step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import psycopg
from psycopg import sql

from replicator.badges.state import BADGE_QUERIES, MISSED, UNREAD
from replicator.ops.migrate import migrate
from replicator.pg.decoding.wal2json import stream_options
from replicator.pg.lsn import format_lsn
from replicator.pg.walsender import ReplicationConnection
from replicator.pg.wire import Keepalive
from replicator.runtime.cluster import PostgresCluster
from tests.captures.capture import (
    ALICE,
    BOB,
    CAROL,
    CREATED,
    READ,
    STEP_PREFIX,
    TOAST_BODY,
)
from tests.captures.capture import message_sql as _message
from tests.wal2json_support import MISSING, wal2json_bindir

HERE = Path(__file__).resolve().parent
SLOT = "capture_wal2json"


def _call(caller: str, callee: str, status: str) -> str:
    return (
        "INSERT INTO calls (caller_id, callee_id, status, created_at)"
        f" VALUES ('{caller}', '{callee}', '{status}', '{CREATED}')"
    )


SETUP = ["CREATE TABLE moods (id int PRIMARY KEY, note text)"]

#: (step, statements), each step one transaction; the steps after "truncate then insert"
#: break the badge rules on purpose (the applier must stop there)
STEPS: list[tuple[str, list[str]]] = [
    ("insert", [_message(ALICE, BOB, "hello"), _message(BOB, ALICE, "hi", READ)]),
    ("call", [_call(ALICE, BOB, "missed"), _call(CAROL, BOB, "answered")]),
    ("read", [f"UPDATE messages SET read_at = '{READ}' WHERE id = 1"]),
    ("unread", ["UPDATE messages SET read_at = NULL WHERE id = 1"]),
    ("recipient", [f"UPDATE messages SET recipient_id = '{CAROL}' WHERE id = 1"]),
    ("call seen", [f"UPDATE calls SET seen_at = '{READ}' WHERE id = 1"]),
    ("call status", ["UPDATE calls SET status = 'missed' WHERE id = 2"]),
    ("delete", ["DELETE FROM messages WHERE id = 2"]),
    ("toast insert", [_message(CAROL, ALICE, TOAST_BODY)]),
    ("toast update", [f"UPDATE messages SET sender_id = '{BOB}' WHERE id = 3"]),
    (
        "savepoint",
        [
            _message(ALICE, CAROL, "kept"),
            "SAVEPOINT s",
            _message(ALICE, CAROL, "rolled back"),
            _call(ALICE, CAROL, "missed"),
            "ROLLBACK TO SAVEPOINT s",
        ],
    ),
    ("rollback", [_message(BOB, CAROL, "never"), "ROLLBACK"]),
    (
        "transactional message",
        [
            _message(BOB, CAROL, "with a message"),
            "SELECT pg_logical_emit_message(true, 'capture', 'inside a transaction')",
        ],
    ),
    ("other table", ["INSERT INTO moods VALUES (1, 'not a badge table')"]),
    (
        "add column",
        [
            "ALTER TABLE messages ADD COLUMN priority int",
            "INSERT INTO messages (sender_id, recipient_id, body, created_at, priority)"
            f" VALUES ('{CAROL}', '{BOB}', 'urgent', '{CREATED}', 3)",
        ],
    ),
    # The next row of messages is a delete: its identity is the first sign of the change.
    (
        "drop column",
        ["ALTER TABLE messages DROP COLUMN priority", "DELETE FROM messages WHERE body = 'urgent'"],
    ),
    ("truncate", ["TRUNCATE messages, calls RESTART IDENTITY"]),
    ("truncate then insert", ["TRUNCATE messages", _message(BOB, ALICE, "after truncate")]),
    (
        "identity default",
        ["ALTER TABLE calls REPLICA IDENTITY DEFAULT", _call(BOB, CAROL, "missed")],
    ),
    ("key-only update", [f"UPDATE calls SET seen_at = '{READ}' WHERE callee_id = '{CAROL}'"]),
    ("key-only delete", [f"DELETE FROM calls WHERE callee_id = '{CAROL}'"]),
    (
        "badge column dropped",
        [
            "ALTER TABLE calls REPLICA IDENTITY FULL",
            "ALTER TABLE calls DROP COLUMN seen_at",
            _call(ALICE, CAROL, "missed"),
        ],
    ),
]


def counts(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, list[dict[str, int]]]:
    result: dict[str, list[dict[str, int]]] = {}
    for badge in (UNREAD, MISSED):
        query = sql.SQL(BADGE_QUERIES[badge]).format(schema=sql.Identifier("public"))
        try:
            rows = conn.execute(query).fetchall()
        except psycopg.errors.UndefinedColumn:
            continue
        for user, counterpart, count in rows:
            result.setdefault(str(user), [{}, {}])[badge][str(counterpart)] = int(str(count))
    return result


def run_steps(dsn: str) -> dict[str, dict[str, list[dict[str, int]]]]:
    after: dict[str, dict[str, list[dict[str, int]]]] = {}
    with (
        psycopg.connect(dsn, autocommit=True) as marker,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        for step, statements in STEPS:
            marker.execute("SELECT pg_logical_emit_message(false, %s, %s)", (STEP_PREFIX, step))
            conn.execute("BEGIN")
            for statement in statements:
                conn.execute(statement.encode())
            if statements[-1] != "ROLLBACK":
                conn.execute("COMMIT")
            after[step] = counts(conn)
        marker.execute("SELECT pg_logical_emit_message(false, %s, 'end')", (STEP_PREFIX,))
    return after


class _Done(Exception):
    pass


async def stream(dsn: str) -> list[dict[str, str]]:
    repl = await ReplicationConnection.open(dsn)
    records: list[dict[str, str]] = []
    step = ""
    applied = 0

    def on_xlogdata(payload: memoryview, lsn: int) -> None:
        nonlocal step
        text = bytes(payload).decode()
        obj = json.loads(text)
        if obj.get("action") == "M" and obj.get("prefix") == STEP_PREFIX:
            if obj["content"] == "end":
                raise _Done
            step = obj["content"]
        records.append(
            {"step": step, "action": obj["action"], "lsn": format_lsn(lsn), "payload": text}
        )

    def keepalive(k: Keepalive) -> None:
        nonlocal applied
        applied = max(applied, k.wal_end)

    feedback: Callable[[], int] = lambda: applied  # noqa: E731
    try:
        await repl.start(SLOT, 0, stream_options([("public", "messages"), ("public", "calls")]))
        with anyio.fail_after(60):
            await repl.stream(on_xlogdata, keepalive, feedback)
    except _Done:
        pass
    finally:
        await repl.close()
    return records


def capture(dsn: str, out: Path) -> None:
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SETUP:
            conn.execute(statement.encode())
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (SLOT,))
        version = conn.info.server_version
    try:
        after = run_steps(dsn)
        records = anyio.run(stream, dsn)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    with out.open("w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps(record) + "\n")
            step = record["step"]
            last = i + 1 == len(records) or records[i + 1]["step"] != step
            if last and step in after:
                f.write(json.dumps({"step": step, "counts": after[step]}) + "\n")
    print(f"PostgreSQL {version}: {len(records)} messages -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "wal2json-pg15.jsonl")
    parser.add_argument("--dsn", help="an empty database on a server with wal2json")
    args = parser.parse_args()
    if args.dsn:
        capture(args.dsn, args.out)
        return
    bindir = wal2json_bindir()
    if bindir is None:
        sys.exit(MISSING)
    with tempfile.TemporaryDirectory(prefix="replicator-capture-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        cluster = PostgresCluster(bindir, root / "pg", settings={"fsync": "off"})
        cluster.start()
        try:
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                admin.execute("CREATE DATABASE capture")
            capture(cluster.dsn("capture"), args.out)
        finally:
            cluster.stop("fast")


if __name__ == "__main__":
    main()
