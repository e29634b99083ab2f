"""Record raw pgoutput messages from PostgreSQL 18 (embedded) and 15 (system) into JSONL files."""

from __future__ import annotations

import argparse
import json
import random
import string
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psycopg

from replicator.ops.migrate import migrate
from replicator.pg.lsn import format_lsn
from replicator.pg.walsender import ReplicationConnection
from replicator.pg.wire import Keepalive
from replicator.runtime.cluster import PostgresCluster, embedded_bindir, system_bindirs

HERE = Path(__file__).resolve().parent
PUBLICATION = "badges"
STEP_PREFIX = "capture.step"
ORIGIN = "capture_origin"
ORIGIN_LSN = "0/ABCDEF"

ALICE = "0a11ce00-0000-4000-8000-000000000001"
BOB = "0b0b0000-0000-4000-8000-000000000002"
CAROL = "0ca20100-0000-4000-8000-000000000003"
CREATED = "2024-05-06 07:08:09.123456+00"
READ = "2024-05-06 08:00:00+00"
# Random letters defeat pglz, so the body is stored out of line and an update of another
# column sends it as unchanged TOAST.
TOAST_BODY = "".join(random.Random(1).choices(string.ascii_letters + string.digits, k=6000))

NAMES = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("O"): "Origin",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
}

SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TABLE moods (id int PRIMARY KEY, mood mood NOT NULL, note text)",
    f"ALTER PUBLICATION {PUBLICATION} ADD TABLE moods",
    f"SELECT pg_replication_origin_create('{ORIGIN}')",
]


def message_sql(sender: str, recipient: str, body: str, read_at: str | None = None) -> str:
    read = f"'{read_at}'" if read_at else "NULL"
    return (
        "INSERT INTO messages (sender_id, recipient_id, body, created_at, read_at)"
        f" VALUES ('{sender}', '{recipient}', '{body}', '{CREATED}', {read})"
    )


#: (step, statements); each step runs as one transaction unless it manages its own
STEPS: list[tuple[str, list[str]]] = [
    (
        "insert",
        [message_sql(ALICE, BOB, "hello", None), message_sql(BOB, ALICE, "hi", READ)],
    ),
    (
        "call",
        [
            "INSERT INTO calls (caller_id, callee_id, status, created_at)"
            f" VALUES ('{ALICE}', '{BOB}', 'missed', '{CREATED}')"
        ],
    ),
    ("enum", ["INSERT INTO moods (id, mood, note) VALUES (1, 'ok', NULL)"]),
    ("read", [f"UPDATE messages SET read_at = '{READ}' WHERE id = 1"]),
    ("recipient", [f"UPDATE messages SET recipient_id = '{CAROL}' WHERE id = 2"]),
    ("call seen", [f"UPDATE calls SET seen_at = '{READ}' WHERE id = 1"]),
    ("enum update", ["UPDATE moods SET mood = 'happy', note = 'better' WHERE id = 1"]),
    ("delete", ["DELETE FROM messages WHERE id = 2"]),
    ("enum delete", ["DELETE FROM moods WHERE id = 1"]),
    ("toast insert", [message_sql(CAROL, ALICE, TOAST_BODY, None)]),
    ("toast update", [f"UPDATE messages SET read_at = '{READ}' WHERE id = 3"]),
    (
        "savepoint",
        [
            message_sql(ALICE, CAROL, "kept", None),
            "SAVEPOINT s",
            message_sql(ALICE, CAROL, "rolled back", None),
            "ROLLBACK TO SAVEPOINT s",
        ],
    ),
    (
        "transactional message",
        [
            message_sql(BOB, CAROL, "with a message", None),
            "SELECT pg_logical_emit_message(true, 'capture', 'inside a transaction')",
        ],
    ),
    ("message", ["SELECT pg_logical_emit_message(false, 'capture', '\\x00ff'::bytea)"]),
    ("origin", []),
    ("truncate", ["TRUNCATE messages, calls RESTART IDENTITY CASCADE"]),
    (
        "truncate then insert",
        ["TRUNCATE messages", message_sql(BOB, ALICE, "after truncate", None)],
    ),
    ("truncate one", ["TRUNCATE moods"]),
]


def run_steps(dsn: str) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as marker,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        for step, statements in STEPS:
            marker.execute("SELECT pg_logical_emit_message(false, %s, %s)", (STEP_PREFIX, step))
            if step == "origin":
                run_with_origin(conn)
                continue
            if step == "message":
                for statement in statements:
                    conn.execute(statement.encode())
                continue
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement.encode())
        marker.execute("SELECT pg_logical_emit_message(false, %s, 'end')", (STEP_PREFIX,))


def run_with_origin(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """A transaction replayed from elsewhere, as a subscriber would write it."""
    conn.execute("SELECT pg_replication_origin_session_setup(%s)", (ORIGIN,))
    try:
        with conn.transaction():
            conn.execute("SELECT pg_replication_origin_xact_setup(%s, %s)", (ORIGIN_LSN, CREATED))
            conn.execute(
                "INSERT INTO calls (caller_id, callee_id, status, created_at)"
                " VALUES (%s, %s, 'answered', %s)",
                (BOB, CAROL, CREATED),
            )
    finally:
        conn.execute("SELECT pg_replication_origin_session_reset()")


def _step_marker(payload: bytes) -> str | None:
    """The step name if ``payload`` is one of our non-transactional step markers."""
    if payload[:1] != b"M" or payload[1] & 1:
        return None
    end = payload.index(b"\0", 10)
    if payload[10:end].decode() != STEP_PREFIX:
        return None
    (length,) = struct.unpack_from(">I", payload, end + 1)
    return payload[end + 5 : end + 5 + length].decode()


class _Done(Exception):
    pass


@dataclass
class Recorder:
    kind: str
    records: list[dict[str, str]] = field(default_factory=list)
    step: str = ""

    def __call__(self, payload: memoryview, lsn: int) -> None:
        data = bytes(payload)
        marker = _step_marker(data)
        if marker == "end":
            raise _Done
        if marker is not None:
            self.step = marker
            return
        self.records.append(
            {
                "pass": self.kind,
                "step": self.step,
                "label": NAMES.get(data[0], chr(data[0])),
                "lsn": format_lsn(lsn),
                "payload": data.hex(),
            }
        )


async def stream(dsn: str, slot: str, kind: str, options: dict[str, str]) -> list[dict[str, str]]:
    repl = await ReplicationConnection.open(dsn)
    recorder = Recorder(kind)
    applied = 0

    def keepalive(k: Keepalive) -> None:
        nonlocal applied
        applied = max(applied, k.wal_end)

    feedback: Callable[[], int] = lambda: applied  # noqa: E731
    try:
        await repl.start(slot, 0, options)
        with anyio.fail_after(60):
            await repl.stream(recorder, keepalive, feedback)
    except _Done:
        pass
    finally:
        await repl.close()
    return recorder.records


def capture(bindir: Path, root: Path, out: Path) -> None:
    cluster = PostgresCluster(bindir, root / bindir.parent.name, settings={"fsync": "off"})
    cluster.start()
    try:
        base = cluster.dsn()
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute("CREATE DATABASE capture")
        dsn = cluster.dsn("capture")
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in SETUP:
                conn.execute(statement.encode())
            for slot in ("capture_text", "capture_binary"):
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            version = conn.info.server_version
        run_steps(dsn)
        # Text and dates come out of the walsender in its session's settings.
        repl_dsn = f"{dsn}?options=-c%20TimeZone%3DUTC%20-c%20DateStyle%3DISO"
        base_options = {"proto_version": "1", "publication_names": PUBLICATION, "messages": "true"}
        records = anyio.run(stream, repl_dsn, "capture_text", "text", base_options)
        records += anyio.run(
            stream, repl_dsn, "capture_binary", "binary", {**base_options, "binary": "true"}
        )
    finally:
        cluster.stop("fast")
    with out.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"PostgreSQL {version}: {len(records)} messages -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    system = [b for b in system_bindirs() if b.parent.name == "15"]
    if not system:
        sys.exit("PostgreSQL 15 binaries not found under /usr/lib/postgresql/15/bin")
    with tempfile.TemporaryDirectory(prefix="replicator-capture-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        capture(embedded_bindir(), root, args.out / "pg18.jsonl")
        capture(system[0], root, args.out / "pg15.jsonl")


if __name__ == "__main__":
    main()
