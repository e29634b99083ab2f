"""The snapshot's own reading: every id type into the compact state, and work_mem only for an
aggregate that would spill."""

from __future__ import annotations

import logging

import psycopg
import pytest

from replicator.badges import spec as badge_spec
from replicator.pipeline.snapshot import _spilling_kb
from tests.conftest import Database
from tests.support import caught_up, database_counts, running_consumer, state_counts

pytestmark = pytest.mark.anyio

IDS_DDL = """
CREATE TABLE ids (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    u_small smallint,
    c_int integer,
    u_text text,
    c_uuid uuid,
    u_varchar varchar(40),
    c_big bigint
);
ALTER TABLE ids REPLICA IDENTITY FULL;
CREATE PUBLICATION ids_pub FOR TABLE ids;
"""
IDS_BADGES = """
[[badge]]
name = "small_by_int"
table = "ids"
user = "u_small"
counterpart = "c_int"
where = "id is not null"

[[badge]]
name = "text_by_uuid"
table = "ids"
user = "u_text"
counterpart = "c_uuid"
where = "id is not null"

[[badge]]
name = "varchar_by_bigint"
table = "ids"
user = "u_varchar"
counterpart = "c_big"
where = "id is not null"
"""
#: (u_small, c_int, u_text, c_uuid, u_varchar, c_big); '42' as text and 42 as smallint are
#: one user, and so are the uuid's canonical text and the varchar holding it
ROWS = [
    (42, 7, "42", "00000000-0000-4000-8000-000000000001", "42", 9_000_000_000),
    (42, -7, "042", "00000000-0000-4000-8000-000000000001", "0", -1),
    (-32768, 2147483647, "AAAAAAAA-0000-4000-8000-000000000001", None, "x", 0),
    (0, 0, "00000000-0000-4000-8000-00000000000a", "ffffffff-ffff-4fff-bfff-ffffffffffff", "", 1),
    (
        7,
        1,
        "Zoë",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-00000000000a",
        2,
    ),
]


async def test_every_id_type_loads_into_the_compact_state_exactly(database: Database) -> None:
    specs = badge_spec.parse(IDS_BADGES, label="ids.toml")
    insert = "INSERT INTO ids (u_small, c_int, u_text, c_uuid, u_varchar, c_big) VALUES"
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute(IDS_DDL.encode())
        for row in ROWS * 3:
            conn.execute(f"{insert} (%s, %s, %s, %s, %s, %s)".encode(), row)
    async with running_consumer(
        database.dsn, database.slot, badges=specs, publication="ids_pub"
    ) as consumer:
        expected = await database_counts(database.dsn, specs)
        assert state_counts(consumer.state) == expected
        assert set(expected["42"][1]) == {"00000000-0000-4000-8000-000000000001"}
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            for row in ROWS:
                conn.execute(f"{insert} (%s, %s, %s, %s, %s, %s)".encode(), row)
            conn.execute("DELETE FROM ids WHERE id % 2 = 0")
        await caught_up(consumer, database.dsn)
        assert state_counts(consumer.state) == await database_counts(database.dsn, specs)


async def test_an_aggregate_that_would_spill_gets_the_memory_it_needs(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        # no index to stream the groups from, and little memory: a hash aggregate that
        # would spill to disk
        conn.execute("DROP INDEX idx_messages_read_at")
        conn.execute(f"ALTER DATABASE {database.name} SET work_mem = '64kB'".encode())
        conn.execute(
            "INSERT INTO messages (sender_id, recipient_id) SELECT gen_random_uuid(),"
            " ('00000000-0000-4000-8000-' || lpad(to_hex(g % 500), 12, '0'))::uuid"
            " FROM generate_series(1, 20000) g"
        )
        conn.execute("ANALYZE messages")
    caplog.set_level(logging.INFO, logger="replicator.pipeline.snapshot")
    async with running_consumer(database.dsn, database.slot) as consumer:
        assert state_counts(consumer.state) == await database_counts(database.dsn)
    spilled = [r.getMessage() for r in caplog.records if "would spill" in r.getMessage()]
    assert spilled and "snapshot of unread_messages" in spilled[0]
    assert "past work_mem (64 kB)" in spilled[0]


def test_only_a_plan_that_would_spill_asks_for_memory() -> None:
    streamed = {
        "Node Type": "Aggregate",
        "Strategy": "Sorted",
        "Plan Rows": 1_000_000,
        "Plan Width": 40,
        "Plans": [{"Node Type": "Index Only Scan", "Plan Rows": 3_000_000, "Plan Width": 32}],
    }
    assert _spilling_kb(streamed, 4096) is None
    hashed = {"Node Type": "Aggregate", "Strategy": "Hashed", "Plan Rows": 1000, "Plan Width": 40}
    assert _spilling_kb(hashed, 4096) is None  # fits
    assert _spilling_kb({**hashed, "Planned Partitions": 4}, 4096) == 1000 * 104 * 2 // 1024 + 1
    sorted_input = {
        **streamed,
        "Plans": [{"Node Type": "Sort", "Plan Rows": 1_000_000, "Plan Width": 32}],
    }
    assert _spilling_kb(sorted_input, 4096) == 1_000_000 * 96 * 2 // 1024 + 1
