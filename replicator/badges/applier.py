"""Row changes into badge counts: ``contribution(new) - contribution(old)``, merged at commit.

Every row change goes into a buffer keyed by (badge, user, counterpart); the buffer is merged
into the state at commit, so memory for a transaction grows with the distinct pairs it
touches, never with its rows, and work that is never committed is never seen. The applier
is a ``ChangeSink``: rows reach it as plain lists of text values, never as bytes.

For each badge table the applier compiles one function over a row that tests every badge
reading that table, from the badges' predicate trees, and hands it to the decoder with the
columns it needs; a row then costs one call and no object of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from replicator.badges.predicate import RowTest
from replicator.badges.spec import Badge
from replicator.badges.state import BadgeState, Changes, Pair
from replicator.badges.tables import Key, TableMap, moved, qualified
from replicator.errors import NeedsCatalog, SchemaError, StartAfresh
from replicator.pg.changes import Projection, Relation, Values

logger = logging.getLogger(__name__)

#: a column whose value names a row in warnings, when the table has it
KEY_COLUMN = "id"
#: seconds between warnings about rows that count for nobody, per badge
WARN_EVERY_S = 60.0


class Applier:
    """Applies the rows of badge tables to a ``BadgeState``, one transaction at a time.

    ``on_commit`` is called with the commit LSN and what changed for whom after each
    transaction that changed something; ``on_message`` with each transactional logical message.

    ``tables`` places the relations of the stream: partitions of badge tables count for their
    table's badges, a relation it does not know raises ``NeedsCatalog``. Without it, badge
    tables are known by name and every other relation is ignored.
    """

    def __init__(
        self,
        state: BadgeState,
        badges: Sequence[Badge],
        *,
        tables: TableMap | None = None,
        on_commit: Callable[[int, Changes], None] | None = None,
        on_message: Callable[[str, str], None] | None = None,
    ) -> None:
        self.state = state
        self.badges = tuple(badges)
        self.on_commit = on_commit
        self.on_message = on_message
        self._roots = {(b.spec.schema, b.spec.table) for b in self.badges}
        #: member -> its badge table, for every relation whose rows count
        self._members: dict[Key, Key] = {key: key for key in self._roots}
        self._member_oids: dict[int, Key] = {}
        self._others: set[Key] | None = None
        if tables is not None:
            self._members = {key: m.root for key, m in tables.members.items()}
            self._member_oids = tables.oids()
            self._others = set(tables.others)
        #: relid -> name, for the partitions announced (a TRUNCATE of one needs a new count)
        self._partitions: dict[int, str] = {}
        self._deltas: tuple[dict[Pair, int], ...] = tuple({} for _ in self.badges)
        self._truncated: set[int] = set()
        #: relid -> the badges that read it
        self._relations: dict[int, tuple[Badge, ...]] = {}
        #: per badge: when rows that count for nobody were last logged, and how many since
        self._warned_at = [-WARN_EVERY_S] * len(self.badges)
        self._unlogged = [0] * len(self.badges)
        #: rows that counted for nobody (a NULL user or counterpart), per badge
        self.skipped_rows = [0] * len(self.badges)

    @property
    def pending_pairs(self) -> int:
        """(badge, user, counterpart) pairs buffered for the open transaction."""
        return sum(len(buffer) for buffer in self._deltas)

    def tables(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """Every relation whose rows count (badge tables and their partitions) -> the columns
        the badges read of it, in file order."""
        found: dict[Key, dict[str, None]] = {}
        for badge in self.badges:
            spec = badge.spec
            found.setdefault((spec.schema, spec.table), {}).update(dict.fromkeys(spec.columns))
        return {member: tuple(found[root]) for member, root in self._members.items()}

    def add_member(self, key: Key, oid: int, root: Key) -> None:
        """A relation learned since the start (a new partition) whose rows count for ``root``."""
        self._members[key] = root
        self._member_oids[oid] = key

    def add_other(self, key: Key) -> None:
        """A relation learned since the start whose rows count for nobody."""
        if self._others is not None:
            self._others.add(key)

    # -- ChangeSink ------------------------------------------------------------------------

    def relation(self, rel: Relation) -> Projection | None:
        self._relations.pop(rel.relid, None)
        self._partitions.pop(rel.relid, None)
        key = (rel.namespace, rel.name)
        known = self._member_oids.get(rel.relid)
        if known is not None and known != key:
            raise SchemaError(moved(known, key))
        root = self._members.get(key)
        if root is None:
            if self._others is None or key in self._others:
                return None
            raise NeedsCatalog(f"table {qualified(key)} is new to the stream", relation=rel)
        badges = tuple(b for b in self.badges if (b.spec.schema, b.spec.table) == root)
        if not badges:
            return None
        names = [c.name for c in rel.columns]
        for badge in badges:
            for column in badge.spec.columns:
                if column not in names:
                    raise SchemaError(
                        f"table {rel.qualified_name} has no column {column} any more;"
                        f" the {badge.name} badge needs it"
                    )
                announced = rel.columns[names.index(column)].type_oid
                bound = badge.types[column]
                if announced and bound.type_oid and announced != bound.type_oid:
                    # values may have changed with the type, row by row, without a row change
                    raise StartAfresh(
                        f"column {column} of table {rel.qualified_name} is no longer"
                        f" {bound.type_name} (type oid {bound.type_oid} became {announced})"
                    )
        if rel.replica_identity != "f":
            raise SchemaError(
                f"table {rel.qualified_name} has replica identity {rel.replica_identity!r};"
                f" run ALTER TABLE {rel.qualified_name} REPLICA IDENTITY FULL"
            )
        wanted = dict.fromkeys(c for b in badges for c in b.spec.columns)
        if KEY_COLUMN in names:
            wanted[KEY_COLUMN] = None
        slot_of = {column: slot for slot, column in enumerate(wanted)}
        slots = tuple(slot_of.get(name, -1) for name in names)
        self._relations[rel.relid] = badges
        if key != root:
            self._partitions[rel.relid] = rel.qualified_name
        logger.info(
            "relation %s (oid %d) feeds %s",
            rel.qualified_name,
            rel.relid,
            ", ".join(b.name for b in badges),
        )
        return self._projection(rel.qualified_name, badges, slot_of, slots)

    def truncate(self, relids: tuple[int, ...]) -> None:
        for relid in relids:
            partition = self._partitions.get(relid)
            if partition is not None:
                # the rows it held leave their table's counts with no row change to apply
                raise StartAfresh(f"partition {partition} was truncated")
        for relid in relids:
            for badge in self._relations.get(relid, ()):
                self._deltas[badge.index].clear()
                self._truncated.add(badge.index)

    def commit(self, commit_lsn: int, commit_time: int) -> None:
        deltas, truncated = self._deltas, self._truncated
        changed = self.state.merge(deltas, truncated, commit_lsn)
        for buffer in deltas:
            buffer.clear()
        truncated.clear()
        if changed and self.on_commit is not None:
            self.on_commit(commit_lsn, changed)

    def message(self, prefix: str, content: str) -> None:
        if self.on_message is not None:
            self.on_message(prefix, content)

    def abandon(self) -> None:
        for buffer in self._deltas:
            buffer.clear()
        self._truncated.clear()

    # -- rows ------------------------------------------------------------------------------

    def _projection(
        self,
        table: str,
        badges: tuple[Badge, ...],
        slot_of: dict[str, int],
        slots: tuple[int, ...],
    ) -> Projection:
        key_slot = slot_of.get(KEY_COLUMN)

        def skip(values: Values, badge: int) -> None:
            self.skipped_rows[badge] += 1
            now = time.monotonic()
            if now - self._warned_at[badge] < WARN_EVERY_S:
                self._unlogged[badge] += 1
                return
            spec = self.badges[badge].spec
            missing = spec.user if values[slot_of[spec.user]] is None else spec.counterpart
            key = f" id={values[key_slot]!s}" if key_slot is not None else ""
            more = self._unlogged[badge]
            logger.warning(
                "skipping %s row%s for %s: it has no %s; it counts for nobody%s",
                table,
                key,
                spec.name,
                missing,
                f" ({more} more such rows since the last warning)" if more else "",
            )
            self._warned_at[badge] = now
            self._unlogged[badge] = 0

        insert, change = _compile(badges, slot_of, self._deltas, skip)

        def update(old: Values | None, new: Values) -> None:
            if old is None:
                raise SchemaError(
                    f"an UPDATE on {table} came without its old row;"
                    f" run ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
            change(old, -1)
            change(new, 1)

        def delete(old: Values | None) -> None:
            if old is None:
                raise SchemaError(
                    f"a DELETE on {table} came with only its key;"
                    f" run ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
            change(old, -1)

        return Projection(slots, insert, update, delete)


def _compile(
    badges: Sequence[Badge],
    slot_of: dict[str, int],
    deltas: Sequence[dict[Pair, int]],
    skip: Callable[[Values, int], None],
) -> tuple[Callable[[Values], None], Callable[[Values, int], None]]:
    """``insert(row)`` and ``change(row, +1 or -1)`` for one table, unrolled over its badges.

    Inserts are most of any stream: for the default unread-messages badge the insert is
    ``if v[2] is None`` and one dict update, as fast as the code written by hand was.
    """
    namespace: dict[str, Any] = {"skip": skip}
    insert = ["def insert(v):"]
    change = ["def change(v, n):"]
    for badge in badges:
        b = badge.index
        spec = badge.spec
        test = RowTest(spec.where, slot_of, badge.types, prefix=f"_b{b}_")
        namespace.update(test.names)
        namespace[f"d{b}"] = deltas[b]
        user = f"v[{slot_of[spec.user]}]"
        if spec.counterpart is None:
            present = "u is not None"
            key = "(u, '')"
            read = f"u = {user}"
        else:
            present = "u is not None and c is not None"
            key = "(u, c)"
            read = f"u = {user}; c = v[{slot_of[spec.counterpart]}]"
        for lines, amount in ((insert, "1"), (change, "n")):
            lines += [
                f"    if {test.source}:",
                f"        {read}",
                f"        if {present}:",
                f"            k = {key}",
                f"            d{b}[k] = d{b}.get(k, 0) + {amount}",
                "        else:",
                f"            skip(v, {b})",
            ]
    source = "\n".join(insert) + "\n\n" + "\n".join(change) + "\n"
    exec(source, namespace)  # built from the badges' trees and slot numbers only
    return namespace["insert"], namespace["change"]
