"""Two schemas of teams' own, with badges files, and a random workload over any such table.

``INBOX``: bigint ids, an ``is_read`` boolean, three badges on one table (one without a
counterpart). ``OPS``: text ids in a camelCase column, an enum, a numeric with NaN, ``in``,
``or``, ``<>`` over NULLs, and a varchar counterpart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from replicator.badges import spec as badge_spec
from replicator.badges.spec import BadgeSpec

Conn = psycopg.AsyncConnection[tuple[object, ...]]
Draw = Callable[[random.Random], object]


@dataclass(frozen=True)
class CustomSchema:
    name: str
    #: creates the tables (replica identity full) and the publication ``PUBLICATION``
    ddl: str
    badges_toml: str
    #: schema.table -> column -> a random value (None: NULL)
    columns: dict[str, dict[str, Draw]]
    #: the user ids a workload writes, as their text form
    users: list[str] = field(default_factory=list)

    def specs(self) -> list[BadgeSpec]:
        return badge_spec.parse(self.badges_toml, label=f"{self.name}.toml")

    def write_badges(self, directory: Path) -> Path:
        path = directory / f"{self.name}.toml"
        path.write_text(self.badges_toml)
        return path

    async def create(self, dsn: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(self.ddl.encode())


PUBLICATION = "team_badges"


def _maybe(value: Draw, nulls: float = 0.1) -> Draw:
    return lambda rng: None if rng.random() < nulls else value(rng)


INBOX_USERS = [str(n) for n in (1, 2, 3, 4, 5, 6, 9_000_000_000)]
INBOX = CustomSchema(
    name="inbox",
    ddl=f"""
CREATE SCHEMA inbox;
CREATE TABLE inbox.notes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint,
    author_id bigint,
    is_read boolean NOT NULL DEFAULT false,
    mentions_owner boolean,
    priority smallint,
    body text NOT NULL DEFAULT ''
);
ALTER TABLE inbox.notes REPLICA IDENTITY FULL;
CREATE INDEX notes_unread ON inbox.notes (owner_id, author_id) WHERE is_read = false;
CREATE PUBLICATION {PUBLICATION} FOR TABLE inbox.notes;
""",
    badges_toml="""
[[badge]]
name = "unread_notes"
table = "inbox.notes"
user = "owner_id"
counterpart = "author_id"
where = "is_read = false"

[[badge]]
name = "unread_mentions"
table = "inbox.notes"
user = "owner_id"
counterpart = "author_id"
where = "is_read is false and mentions_owner is true"

[[badge]]
name = "urgent"
table = "inbox.notes"
user = "owner_id"
where = "is_read = false and priority >= 3"
""",
    columns={
        "inbox.notes": {
            "owner_id": _maybe(lambda r: r.choice(INBOX_USERS), 0.05),
            "author_id": _maybe(lambda r: r.choice(INBOX_USERS), 0.05),
            "is_read": lambda r: r.random() < 0.4,
            "mentions_owner": _maybe(lambda r: r.random() < 0.5, 0.2),
            "priority": _maybe(lambda r: r.randint(-1, 5), 0.2),
            "body": lambda r: r.choice(["", "hi", "it's me", "👋 ünïcode"]),
        }
    },
    users=INBOX_USERS,
)

OPS_USERS = ["alice", "bob", "Carol", "d'Artagnan", "émile"]
OPS = CustomSchema(
    name="ops",
    ddl=f"""
CREATE SCHEMA ops;
CREATE TYPE ops.level AS ENUM ('debug', 'info', 'warn', 'error');
CREATE TABLE ops.alerts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "userName" text,
    source varchar(40),
    level ops.level,
    score numeric,
    acked_at timestamptz,
    muted boolean
);
ALTER TABLE ops.alerts REPLICA IDENTITY FULL;
CREATE PUBLICATION {PUBLICATION} FOR TABLE ops.alerts;
""",
    badges_toml="""
[[badge]]
name = "open_alerts"
table = "ops.alerts"
user = "userName"
counterpart = "source"
where = "acked_at IS NULL AND level IN ('warn', 'error')"

[[badge]]
name = "noisy"
table = "ops.alerts"
user = "userName"
where = "level <> 'debug' and (score > 2.5 or score is null) and muted is not true"
""",
    columns={
        "ops.alerts": {
            "userName": _maybe(lambda r: r.choice(OPS_USERS), 0.05),
            "source": _maybe(lambda r: r.choice(["ci", "db", "api", "the 'edge'"]), 0.05),
            "level": _maybe(lambda r: r.choice(["debug", "info", "warn", "error"]), 0.1),
            "score": _maybe(lambda r: r.choice(["0", "2.5", "2.50", "3", "NaN", "-1", "10.25"])),
            "acked_at": _maybe(lambda r: "2024-05-06 08:00:00+00", 0.6),
            "muted": _maybe(lambda r: r.random() < 0.3, 0.3),
        }
    },
    users=OPS_USERS,
)

SCHEMAS = {schema.name: schema for schema in (INBOX, OPS)}


@dataclass
class TableWorkload:
    """Random inserts, updates of any column, deletes and the odd truncate, in transactions
    that sometimes roll back (whole, or to a savepoint)."""

    schema: CustomSchema
    seed: int
    rng: random.Random = field(init=False)
    committed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _table(self) -> tuple[sql.Composable, dict[str, Draw]]:
        name = self.rng.choice(sorted(self.schema.columns))
        schema, table = name.split(".")
        return sql.Identifier(schema, table), self.schema.columns[name]

    async def _statement(self, conn: Conn) -> None:
        rng = self.rng
        table, columns = self._table()
        op = rng.choices(["insert", "update", "delete", "truncate"], [50, 35, 14, 0.2])[0]
        if op == "insert":
            names = list(columns)
            rows = [[columns[n](rng) for n in names] for _ in range(rng.randint(1, 6))]
            query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                table,
                sql.SQL(", ").join(sql.Identifier(n) for n in names),
                sql.SQL(", ").join(sql.Placeholder() for _ in names),
            )
            async with conn.cursor() as cur:
                await cur.executemany(query, rows)
        elif op == "update":
            column = rng.choice(list(columns))
            await conn.execute(
                sql.SQL(
                    "UPDATE {t} SET {c} = %s WHERE id IN (SELECT id FROM {t} ORDER BY random()"
                    " LIMIT %s)"
                ).format(t=table, c=sql.Identifier(column)),
                (columns[column](rng), rng.randint(1, 8)),
            )
        elif op == "delete":
            await conn.execute(
                sql.SQL(
                    "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT %s)"
                ).format(t=table),
                (rng.randint(1, 4),),
            )
        else:
            await conn.execute(sql.SQL("TRUNCATE {}").format(table))

    async def transaction(self, conn: Conn) -> None:
        rng = self.rng
        async with conn.transaction(force_rollback=rng.random() < 0.08):
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.1:
                    async with conn.transaction(force_rollback=True):
                        await self._statement(conn)
                else:
                    await self._statement(conn)
        self.committed += 1

    async def run(self, dsn: str, transactions: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("SELECT setseed(%s)", (self.rng.random() * 2 - 1,))
            for _ in range(transactions):
                await self.transaction(conn)
