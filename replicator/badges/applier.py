"""Row changes into badge counts: ``contribution(new) - contribution(old)``, merged at commit.

Every row change goes into a buffer keyed by (badge, user, counterpart); the buffer is merged
into the state at commit, so memory for a transaction grows with the distinct pairs it
touches, never with its rows, and work that is never committed is never seen. The applier
is a ``ChangeSink``: rows reach it as plain lists of values, never as bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from replicator.badges.state import BADGE_NAMES, MISSED, UNREAD, BadgeState, Pair
from replicator.errors import SchemaError
from replicator.pg.changes import Projection, Relation, Values

logger = logging.getLogger(__name__)

CALL_STATUSES = frozenset({"ringing", "answered", "missed", "declined"})


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


class Applier:
    """Applies the rows of badge tables to a ``BadgeState``, one transaction at a time.

    ``on_commit`` is called with the commit LSN and the changed users after each transaction
    that changed something.
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
        self.on_commit = on_commit
        self._deltas: tuple[dict[Pair, int], dict[Pair, int]] = ({}, {})
        self._truncated: set[int] = set()
        self._rules: dict[int, BadgeRule] = {}

    @property
    def pending_pairs(self) -> int:
        """(badge, user, counterpart) pairs buffered for the open transaction."""
        return len(self._deltas[0]) + len(self._deltas[1])

    def tables(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """(schema, table) -> the columns the badges read of it."""
        return {(self.schema, rule.table): rule.columns for rule in RULES}

    # -- ChangeSink ------------------------------------------------------------------------

    def relation(self, rel: Relation) -> Projection | None:
        self._rules.pop(rel.relid, None)
        if rel.namespace != self.schema:
            return None
        rule = next((r for r in RULES if r.table == rel.name), None)
        if rule is None:
            return None
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
        self._rules[rel.relid] = rule
        logger.info(
            "relation %s (oid %d) feeds %s", rel.qualified_name, rel.relid, BADGE_NAMES[rule.badge]
        )
        return self._projection(rel, rule, tuple(slots), key_slot)

    def truncate(self, relids: tuple[int, ...]) -> None:
        for relid in relids:
            rule = self._rules.get(relid)
            if rule is not None:
                self._deltas[rule.badge].clear()
                self._truncated.add(rule.badge)

    def commit(self, commit_lsn: int, commit_time: int) -> None:
        deltas, truncated = self._deltas, self._truncated
        changed = self.state.merge(deltas, truncated, commit_lsn)
        for buffer in deltas:
            buffer.clear()
        truncated.clear()
        if changed and self.on_commit is not None:
            self.on_commit(commit_lsn, changed)

    def abandon(self) -> None:
        for buffer in self._deltas:
            buffer.clear()
        self._truncated.clear()

    # -- rows ------------------------------------------------------------------------------

    def _projection(
        self, rel: Relation, rule: BadgeRule, slots: tuple[int, ...], key_slot: int
    ) -> Projection:
        deltas = self._deltas[rule.badge]
        table = rel.qualified_name

        def pair(values: Values) -> Pair | None:
            if not rule.counts(values):
                if rule.badge == MISSED and values[2] not in CALL_STATUSES:
                    warn(values, f"has unknown status {values[2]!r}")
                return None
            user, counterpart = values[0], values[1]
            if type(user) is str and type(counterpart) is str:
                return user, counterpart
            if user is None or counterpart is None:
                missing = rule.user_column if user is None else rule.counterpart_column
                warn(values, f"has no {missing}; it counts for nobody")
            else:
                warn(values, "has a binary user id; it counts for nobody")
            return None

        def warn(values: Values, what: str) -> None:
            key = values[key_slot] if len(values) > key_slot else None
            logger.warning("skipping %s row id=%s: it %s", table, key, what)

        unread = rule.badge == UNREAD

        def insert(new: Values) -> None:
            # BadgeRule.counts, inlined: inserts are most of any stream
            if (new[2] is None) if unread else (new[2] == "missed" and new[3] is None):
                user, counterpart = new[0], new[1]
                if type(user) is str and type(counterpart) is str:
                    key = (user, counterpart)
                    deltas[key] = deltas.get(key, 0) + 1
                    return
            # a row that counts for nobody: pair says why, if it is not simply read or not missed
            pair(new)

        def change(old: Values | None, new: Values | None) -> None:
            if old is not None:
                key = pair(old)
                if key is not None:
                    deltas[key] = deltas.get(key, 0) - 1
            if new is not None:
                key = pair(new)
                if key is not None:
                    deltas[key] = deltas.get(key, 0) + 1

        def update(old: Values | None, new: Values) -> None:
            if old is None:
                raise SchemaError(
                    f"an UPDATE on {table} came without its old row;"
                    f" run ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
            change(old, new)

        def delete(old: Values | None) -> None:
            if old is None:
                raise SchemaError(
                    f"a DELETE on {table} came with only its key;"
                    f" run ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
            change(old, None)

        return Projection(slots, insert, update, delete)
