"""Badge state: per-user unread-message and missed-call counts, changed only at commit.

Every row change is applied as ``contribution(new) - contribution(old)`` into a buffer keyed
by (badge, user, counterpart); the buffer is merged into the state at commit, so memory for a
transaction grows with the distinct pairs it touches, never with its rows, and work that is
never committed is never seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from replicator.errors import ProtocolError, SchemaError
from replicator.pg.decoding.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    Update,
    Values,
)
from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

UNREAD, MISSED = 0, 1
BADGE_NAMES = ("unread_messages", "missed_calls")
CALL_STATUSES = frozenset({"ringing", "answered", "missed", "declined"})

#: user -> [unread by sender, missed by caller]
Counts = list[dict[str, int]]
Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class BadgeRule:
    """Which table feeds a badge, and the columns the rule reads (in slot order)."""

    badge: int
    table: str
    user_column: str
    counterpart_column: str
    condition_columns: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.user_column, self.counterpart_column, *self.condition_columns)

    def counts(self, values: Values) -> bool:
        if self.badge == UNREAD:
            return values[2] is None
        return values[2] == "missed" and values[3] is None


MESSAGES_RULE = BadgeRule(UNREAD, "messages", "recipient_id", "sender_id", ("read_at",))
CALLS_RULE = BadgeRule(MISSED, "calls", "callee_id", "caller_id", ("status", "seen_at"))
RULES = (MESSAGES_RULE, CALLS_RULE)

# The single source of truth for what a badge is; the snapshot and `replicator verify` run these.
BADGE_QUERIES = {
    UNREAD: (
        "SELECT recipient_id::text, sender_id::text, count(*) FROM {schema}.messages"
        " WHERE read_at IS NULL AND recipient_id IS NOT NULL AND sender_id IS NOT NULL"
        " GROUP BY 1, 2"
    ),
    MISSED: (
        "SELECT callee_id::text, caller_id::text, count(*) FROM {schema}.calls"
        " WHERE status = 'missed' AND seen_at IS NULL"
        " AND callee_id IS NOT NULL AND caller_id IS NOT NULL"
        " GROUP BY 1, 2"
    ),
}


class BadgeState:
    """The counts of every user with at least one badge, exact as of ``lsn``."""

    def __init__(self) -> None:
        self.users: dict[str, Counts] = {}
        #: commit LSN of the last transaction applied (the LSN clients are shown)
        self.lsn = 0

    def load(self, badge: int, rows: Iterable[tuple[str, str, int]]) -> None:
        users = self.users
        for user, counterpart, count in rows:
            if count:
                counts = users.get(user)
                if counts is None:
                    counts = self.users[user] = [{}, {}]
                counts[badge][counterpart] = count

    def view(self, user: str) -> tuple[dict[str, int], dict[str, int]]:
        counts = self.users.get(user)
        if counts is None:
            return {}, {}
        return counts[UNREAD], counts[MISSED]

    def merge(
        self,
        deltas: tuple[dict[Pair, int], dict[Pair, int]],
        truncated: set[int],
        lsn: int,
    ) -> set[str]:
        """Apply one committed transaction; return the users whose counts changed."""
        changed: set[str] = set()
        users = self.users
        for badge in truncated:
            for user, held in users.items():
                if held[badge]:
                    held[badge] = {}
                    changed.add(user)
        for badge in (UNREAD, MISSED):
            for (user, counterpart), delta in deltas[badge].items():
                if not delta:
                    continue
                counts = users.get(user)
                if counts is None:
                    counts = [{}, {}]
                    users[user] = counts
                by_counterpart = counts[badge]
                total = by_counterpart.get(counterpart, 0) + delta
                if total:
                    if total < 0:
                        logger.error(
                            "%s of %s from %s would be %d at %s: state and database disagree",
                            BADGE_NAMES[badge],
                            user,
                            counterpart,
                            total,
                            format_lsn(lsn),
                        )
                    by_counterpart[counterpart] = total
                else:
                    del by_counterpart[counterpart]
                changed.add(user)
        for user in changed:
            left = users.get(user)
            if left is not None and not left[0] and not left[1]:
                del users[user]
        self.lsn = lsn
        return changed


class Applier:
    """Applies decoded pgoutput messages to a ``BadgeState``.

    ``on_commit`` is called with the commit LSN and the changed users after each transaction
    that changed something. Transactions whose commit LSN is below ``resume_lsn`` were applied
    before a reconnect and are skipped.
    """

    def __init__(
        self,
        state: BadgeState,
        *,
        schema: str = "public",
        on_commit: Callable[[int, set[str]], None] | None = None,
    ) -> None:
        self.state = state
        self.schema = schema
        self.decoder = Decoder()
        self.on_commit = on_commit
        self._rules: dict[int, BadgeRule] = {}
        self._key_slot: dict[int, int] = {}
        self._deltas: tuple[dict[Pair, int], dict[Pair, int]] = ({}, {})
        self._truncated: set[int] = set()
        self._in_transaction = False
        self._skipping = False
        #: WAL position through which every change is applied to the state
        self.applied_lsn = 0
        self.rows = 0
        self.transactions = 0
        self.skipped_transactions = 0
        self.last_commit_time = 0

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    @property
    def pending_pairs(self) -> int:
        """(badge, user, counterpart) pairs buffered for the open transaction."""
        return len(self._deltas[0]) + len(self._deltas[1])

    def apply(self, payload: bytes | memoryview, lsn: int) -> None:
        """Decode and apply one pgoutput message that arrived at WAL position ``lsn``."""
        if not payload or payload[0] != 0x49:
            self.apply_message(self.decoder.decode(payload, lsn))
            return
        # Inserts are most of any stream: this is ``_change`` for one, with the fewest calls.
        relid, new = self.decoder.insert_row(payload, lsn)
        rule = self._rules.get(relid)
        if rule is None or self._skipping:
            return
        self.rows += 1
        if new is None:
            return
        # BadgeRule.counts, inlined
        if (new[2] is None) if rule.badge == UNREAD else (new[2] == "missed" and new[3] is None):
            user, counterpart = new[0], new[1]
            if type(user) is str and type(counterpart) is str:
                deltas = self._deltas[rule.badge]
                pair = (user, counterpart)
                deltas[pair] = deltas.get(pair, 0) + 1
                return
        # a row that counts for nobody: _pair says why, if it is not simply read or not missed
        self._pair(relid, rule, new)

    def apply_message(self, msg: Message) -> None:
        """Apply one decoded message (from pgoutput, or another plugin's decoder)."""
        kind = type(msg)
        if kind is Insert:
            self._change(msg.relid, None, msg.new)  # type: ignore[union-attr]
        elif kind is Update:
            self._update(msg)  # type: ignore[arg-type]
        elif kind is Begin:
            self._begin(msg)  # type: ignore[arg-type]
        elif kind is Commit:
            self._commit(msg)  # type: ignore[arg-type]
        elif kind is Delete:
            self._delete(msg)  # type: ignore[arg-type]
        elif kind is Relation:
            self._relation(msg)  # type: ignore[arg-type]
        elif kind is Truncate:
            self._truncate(msg)  # type: ignore[arg-type]
        elif (
            kind is LogicalMessage
            and not msg.transactional  # type: ignore[union-attr]
            and not self._in_transaction
        ):
            # Every transaction that committed before this message was sent before it.
            self.advance(msg.lsn)  # type: ignore[union-attr]
        # Origin and Type need nothing from us.

    def advance(self, lsn: int) -> None:
        """Mark everything up to ``lsn`` as applied (a position between transactions)."""
        if lsn > self.applied_lsn and not self._in_transaction:
            self.applied_lsn = lsn

    def _relation(self, rel: Relation) -> None:
        self._rules.pop(rel.relid, None)
        self._key_slot.pop(rel.relid, None)
        if rel.namespace != self.schema:
            return
        rule = next((r for r in RULES if r.table == rel.name), None)
        if rule is None:
            return
        names = [c.name for c in rel.columns]
        for column in rule.columns:
            if column not in names:
                raise SchemaError(
                    f"table {rel.qualified_name} has no column {column} any more;"
                    f" the {BADGE_NAMES[rule.badge]} badge needs it"
                )
        if rel.replica_identity != "f":
            raise SchemaError(
                f"table {rel.qualified_name} has replica identity {rel.replica_identity!r};"
                f" run ALTER TABLE {rel.qualified_name} REPLICA IDENTITY FULL"
            )
        slots = [-1] * len(names)
        for slot, column in enumerate(rule.columns):
            slots[names.index(column)] = slot
        key_slot = len(rule.columns)
        if "id" in names:
            slots[names.index("id")] = key_slot
        self.decoder.project(rel.relid, tuple(slots))
        self._rules[rel.relid] = rule
        self._key_slot[rel.relid] = key_slot
        logger.info(
            "relation %s (oid %d) feeds %s", rel.qualified_name, rel.relid, BADGE_NAMES[rule.badge]
        )

    def abandon_transaction(self) -> None:
        """Forget a transaction cut off by a lost connection: it comes again from its Begin."""
        self._deltas, self._truncated = ({}, {}), set()
        self._in_transaction = self._skipping = False

    def _begin(self, msg: Begin) -> None:
        if self._in_transaction:
            # Only a reconnect puts a Begin inside a transaction; what came before is resent.
            self.abandon_transaction()
        self._in_transaction = True
        self._skipping = msg.final_lsn < self.applied_lsn

    def _commit(self, msg: Commit) -> None:
        if not self._in_transaction:
            raise ProtocolError(f"commit at {format_lsn(msg.commit_lsn)} without a begin")
        self._in_transaction = False
        if self._skipping:
            self._skipping = False
            self.skipped_transactions += 1
            return
        deltas, truncated = self._deltas, self._truncated
        self._deltas, self._truncated = ({}, {}), set()
        changed = self.state.merge(deltas, truncated, msg.commit_lsn)
        self.applied_lsn = max(self.applied_lsn, msg.end_lsn)
        self.transactions += 1
        self.last_commit_time = msg.commit_time
        if changed and self.on_commit is not None:
            self.on_commit(msg.commit_lsn, changed)

    def _pair(self, relid: int, rule: BadgeRule, values: Values) -> Pair | None:
        if not rule.counts(values):
            if rule.badge == MISSED and values[2] not in CALL_STATUSES:
                self._warn(relid, rule, values, f"has unknown status {values[2]!r}")
            return None
        user, counterpart = values[0], values[1]
        if type(user) is str and type(counterpart) is str:
            return user, counterpart
        if user is None or counterpart is None:
            missing = rule.user_column if user is None else rule.counterpart_column
            self._warn(relid, rule, values, f"has no {missing}; it counts for nobody")
        else:
            self._warn(relid, rule, values, "has a binary user id; it counts for nobody")
        return None

    def _warn(self, relid: int, rule: BadgeRule, values: Values, what: str) -> None:
        key = values[self._key_slot[relid]] if len(values) > self._key_slot[relid] else None
        logger.warning("skipping %s.%s row id=%s: it %s", self.schema, rule.table, key, what)

    def _change(self, relid: int, old: Values | None, new: Values | None) -> None:
        rule = self._rules.get(relid)
        if rule is None or self._skipping:
            return
        self.rows += 1
        deltas = self._deltas[rule.badge]
        if old is not None:
            pair = self._pair(relid, rule, old)
            if pair is not None:
                deltas[pair] = deltas.get(pair, 0) - 1
        if new is not None:
            pair = self._pair(relid, rule, new)
            if pair is not None:
                deltas[pair] = deltas.get(pair, 0) + 1

    def _update(self, msg: Update) -> None:
        rule = self._rules.get(msg.relid)
        if rule is None or self._skipping:
            return
        old, new = msg.old, msg.new
        if old is None or msg.old_kind != "O":
            raise SchemaError(
                f"an UPDATE on {self.schema}.{rule.table} came without its old row;"
                f" run ALTER TABLE {self.schema}.{rule.table} REPLICA IDENTITY FULL"
            )
        if new is not None and UNCHANGED in new:
            new = [o if n is UNCHANGED else n for o, n in zip(old, new, strict=True)]
        self._change(msg.relid, old, new)

    def _delete(self, msg: Delete) -> None:
        rule = self._rules.get(msg.relid)
        if rule is None or self._skipping:
            return
        if msg.old_kind != "O":
            raise SchemaError(
                f"a DELETE on {self.schema}.{rule.table} came with only its key;"
                f" run ALTER TABLE {self.schema}.{rule.table} REPLICA IDENTITY FULL"
            )
        self._change(msg.relid, msg.old, None)

    def _truncate(self, msg: Truncate) -> None:
        if self._skipping:
            return
        for relid in msg.relids:
            rule = self._rules.get(relid)
            if rule is not None:
                self._deltas[rule.badge].clear()
                self._truncated.add(rule.badge)
