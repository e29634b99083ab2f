"""A seeded random workload over messages and calls that exercises every badge transition."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

import psycopg

Conn = psycopg.AsyncConnection[tuple[object, ...]]
STATUSES = ("ringing", "answered", "missed", "declined")


@dataclass
class Workload:
    seed: int
    users: int = 24
    rng: random.Random = field(init=False)
    people: list[str] = field(init=False)
    committed: int = 0
    rolled_back: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.people = [
            str(uuid.UUID(int=self.rng.getrandbits(128), version=4)) for _ in range(self.users)
        ]

    def _two(self) -> tuple[str, str]:
        a, b = self.rng.sample(self.people, 2)
        return a, b

    async def _statement(self, conn: Conn) -> None:
        rng = self.rng
        k = rng.randint(1, 50)
        op = rng.choices(
            [
                "insert",
                "read",
                "unread",
                "recipient",
                "sender",
                "delete",
                "body",
                "call",
                "call_status",
                "call_seen",
                "call_unseen",
                "call_callee",
                "call_delete",
            ],
            weights=[30, 12, 6, 4, 4, 5, 3, 14, 6, 5, 3, 3, 3],
        )[0]
        if op == "insert":
            rows = [(*self._two(), f"m{rng.random():.6f}") for _ in range(k)]
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO messages (sender_id, recipient_id, body) VALUES (%s, %s, %s)",
                    rows,
                )
        elif op == "read":
            recipient = rng.choice(self.people)
            await conn.execute(
                "UPDATE messages SET read_at = now() WHERE id IN (SELECT id FROM messages"
                " WHERE recipient_id = %s AND read_at IS NULL ORDER BY id LIMIT %s)",
                (recipient, k),
            )
        elif op == "unread":
            await conn.execute(
                "UPDATE messages SET read_at = NULL WHERE id IN (SELECT id FROM messages"
                " WHERE read_at IS NOT NULL ORDER BY id DESC LIMIT %s)",
                (k,),
            )
        elif op in ("recipient", "sender"):
            column = "recipient_id" if op == "recipient" else "sender_id"
            await conn.execute(
                f"UPDATE messages SET {column} = %s WHERE id IN (SELECT id FROM messages"  # type: ignore[arg-type]
                " ORDER BY id DESC OFFSET %s LIMIT %s)",
                (rng.choice(self.people), rng.randint(0, 40), k),
            )
        elif op == "delete":
            await conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                " ORDER BY id OFFSET %s LIMIT %s)",
                (rng.randint(0, 100), k),
            )
        elif op == "body":
            await conn.execute(
                "UPDATE messages SET body = body || '!' WHERE id IN (SELECT id FROM messages"
                " ORDER BY id DESC LIMIT %s)",
                (k,),
            )
        elif op == "call":
            rows = [(*self._two(), rng.choice(STATUSES)) for _ in range(rng.randint(1, 5))]
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO calls (caller_id, callee_id, status) VALUES (%s, %s, %s)", rows
                )
        elif op == "call_status":
            await conn.execute(
                "UPDATE calls SET status = %s WHERE id IN (SELECT id FROM calls"
                " ORDER BY id DESC OFFSET %s LIMIT %s)",
                (rng.choice(STATUSES), rng.randint(0, 20), rng.randint(1, 10)),
            )
        elif op == "call_seen":
            await conn.execute(
                "UPDATE calls SET seen_at = now() WHERE callee_id = %s AND seen_at IS NULL",
                (rng.choice(self.people),),
            )
        elif op == "call_unseen":
            await conn.execute(
                "UPDATE calls SET seen_at = NULL WHERE id IN (SELECT id FROM calls"
                " WHERE seen_at IS NOT NULL ORDER BY id DESC LIMIT %s)",
                (rng.randint(1, 10),),
            )
        elif op == "call_callee":
            await conn.execute(
                "UPDATE calls SET callee_id = %s WHERE id IN (SELECT id FROM calls"
                " ORDER BY id DESC OFFSET %s LIMIT 3)",
                (rng.choice(self.people), rng.randint(0, 20)),
            )
        else:
            await conn.execute(
                "DELETE FROM calls WHERE id IN (SELECT id FROM calls ORDER BY id OFFSET %s"
                " LIMIT %s)",
                (rng.randint(0, 30), rng.randint(1, 5)),
            )

    async def transaction(self, conn: Conn) -> None:
        """One transaction of 1-4 statements: committed, rolled back, or with a savepoint."""
        rng = self.rng
        shape = rng.choices(["commit", "rollback", "savepoint"], weights=[80, 10, 10])[0]
        await conn.execute("BEGIN")
        for _ in range(rng.randint(1, 4)):
            await self._statement(conn)
        if shape == "savepoint":
            await conn.execute("SAVEPOINT sp")
            for _ in range(rng.randint(1, 3)):
                await self._statement(conn)
            await conn.execute("ROLLBACK TO SAVEPOINT sp")
            await self._statement(conn)
        if shape == "rollback":
            await conn.execute("ROLLBACK")
            self.rolled_back += 1
        else:
            await conn.execute("COMMIT")
            self.committed += 1

    async def truncate(self, conn: Conn) -> None:
        await conn.execute("BEGIN")
        await self._statement(conn)
        await conn.execute("TRUNCATE messages")
        await self._statement(conn)
        await conn.execute("COMMIT")

    async def big_transaction(self, conn: Conn, rows: int = 100_000) -> None:
        """``rows`` messages in one transaction, spread over every pair of users."""
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO messages (sender_id, recipient_id, body, read_at)"
                " SELECT s.id, r.id, 'bulk',"
                "  CASE WHEN g %% 7 = 0 THEN now() END"
                " FROM generate_series(1, %s) g,"
                "  LATERAL (SELECT (%s::uuid[])[1 + (g %% %s)] AS id) s,"
                "  LATERAL (SELECT (%s::uuid[])[1 + ((g / %s) %% %s)] AS id) r",
                (
                    rows,
                    self.people,
                    len(self.people),
                    self.people,
                    len(self.people),
                    len(self.people),
                ),
            )
        self.committed += 1

    async def run(
        self,
        dsn: str,
        transactions: int,
        *,
        truncate_at: int | None = None,
        big_at: int | None = None,
        big_rows: int = 100_000,
    ) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for i in range(transactions):
                if i == truncate_at:
                    await self.truncate(conn)
                if i == big_at:
                    await self.big_transaction(conn, big_rows)
                await self.transaction(conn)
