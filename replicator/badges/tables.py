"""Which relations hold a badge table's rows: the table itself, or its partitions.

The stream names the relation a row lives in: a partition, with ``publish_via_partition_root``
off, rather than the partitioned table a badge names. A ``TableMap``, read from the catalog
with the badges, places every relation of the stream: a member of a badge table, another table
of the publication, or (when the map was read before it existed) unknown. It also says what
in a setup cannot be counted exactly, and whether the catalog changed in a way the stream
cannot follow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from replicator.badges.predicate import quote_name
from replicator.badges.spec import Badge
from replicator.errors import DatabaseSetupError, SchemaError, StartAfresh

Key = tuple[str, str]


def qualified(key: Key) -> str:
    return f"{quote_name(key[0])}.{quote_name(key[1])}"


def moved(was: Key, now: Key) -> str:
    """The one line for a badge table that changed its name or schema under the stream."""
    return (
        f"badge table {qualified(was)} is now {qualified(now)} (renamed or moved);"
        " change the badges file (or the name back) and restart"
    )


@dataclass(frozen=True)
class Member:
    """A relation whose rows are (part of) a badge table's rows."""

    oid: int
    key: Key
    #: the badge table it belongs to
    root: Key
    #: pg_class.relkind: r (rows live here), p (partitioned: rows live in its partitions), f...
    kind: str
    partition: bool
    replica_identity: str
    row_security: bool = False
    forced_row_security: bool = False
    #: the service's role owns it (owners are exempt from row security unless it is forced)
    owned: bool = False

    @property
    def holds_rows(self) -> bool:
        return self.kind != "p"


@dataclass
class TableMap:
    """The members of every badge table, and the other tables of the publication."""

    members: dict[Key, Member] = field(default_factory=dict)
    others: set[Key] = field(default_factory=set)
    #: the role may read past row security (superuser or BYPASSRLS)
    bypasses_row_security: bool = True
    #: the role the service connects as
    role: str = ""

    def leaves(self) -> list[Key]:
        """Every relation the stream carries rows of, for a badge."""
        return [key for key, m in self.members.items() if m.holds_rows]

    def oids(self) -> dict[int, Key]:
        return {m.oid: key for key, m in self.members.items()}

    def partitioned(self) -> bool:
        return any(m.partition or m.kind == "p" for m in self.members.values())

    def refusals(self) -> list[str]:
        """What in this setup cannot be counted exactly, each with its fix."""
        found: list[str] = []
        for key, m in self.members.items():
            if m.key != m.root and not m.partition:
                found.append(
                    f"table {qualified(key)} inherits from badge table {qualified(m.root)};"
                    " rows of inheritance children are not followed: count them with a badge of"
                    f" their own, or ALTER TABLE {qualified(key)} NO INHERIT {qualified(m.root)}"
                )
            elif m.kind == "f":
                found.append(
                    f"partition {qualified(key)} of {qualified(m.root)} is a foreign table,"
                    " whose changes are not in this database's WAL: detach it"
                )
        return found

    def identity_fixes(self) -> list[str]:
        """``ALTER TABLE ... REPLICA IDENTITY FULL`` for every member that needs it."""
        return [
            f"ALTER TABLE {qualified(key)} REPLICA IDENTITY FULL"
            for key, m in self.members.items()
            if m.holds_rows and m.replica_identity != "f"
        ]

    def row_security_problems(self) -> list[str]:
        """Members whose rows row security would hide from the snapshot."""
        if self.bypasses_row_security:
            return []
        return [
            qualified(key)
            for key, m in self.members.items()
            if m.row_security and (m.forced_row_security or not m.owned)
        ]

    def check(self) -> None:
        """Refuse, with the fix, what cannot be counted exactly."""
        refusals = self.refusals()
        if refusals:
            raise SchemaError(refusals[0])
        fixes = self.identity_fixes()
        if fixes:
            raise SchemaError(
                f"{len(fixes)} badge table{'s' * (len(fixes) != 1)} or partition"
                f"{'s' * (len(fixes) != 1)} without REPLICA IDENTITY FULL"
                f" (updates and deletes would not carry the old row); run {'; '.join(fixes)}"
            )
        hidden = self.row_security_problems()
        if hidden:
            raise DatabaseSetupError(
                f"row-level security on {', '.join(hidden)} would hide rows from role"
                f" {self.role!r} in the snapshot but not in the stream; run ALTER ROLE"
                f" {quote_name(self.role)}"
                " BYPASSRLS (as a superuser), or run the service as the tables' owner"
            )


def check_names(old: TableMap, new: TableMap, badges: Sequence[Badge]) -> None:
    """Raise ``SchemaError`` for a badge table renamed, moved or dropped since ``old``
    (``new`` read by the same badge tables' oids)."""
    new_oids = new.oids()
    for badge in badges:
        key = (badge.spec.schema, badge.spec.table)
        member = old.members.get(key)
        if member is None:
            continue
        now = new_oids.get(member.oid)
        if now is None:
            raise SchemaError(
                f"badge table {qualified(key)} was dropped; restore it or change the badges file"
            )
        if now != key:
            raise SchemaError(moved(key, now))


def changes(
    old: TableMap,
    new: TableMap,
    old_badges: Sequence[Badge],
    new_badges: Sequence[Badge],
    *,
    announced: bool,
    empty: Iterable[Key] = (),
) -> list[Member]:
    """What a catalog change means for a stream that started with ``old``.

    Raises ``SchemaError`` for what needs a person (a badge table renamed or gone, a badge
    column retyped, a member without full identity), ``StartAfresh`` for what a new snapshot
    mends (a partition detached, dropped or attached with rows). Returns the partitions added
    since that the stream can follow from their first row: new and ``empty`` ones, when
    ``announced`` (pgoutput announces every relation before its first row).
    """
    old_oids, new_oids = old.oids(), new.oids()
    check_names(old, new, old_badges)
    if len(new_badges) == len(old_badges):
        for before, after in zip(old_badges, new_badges, strict=True):
            for column, kind in before.types.items():
                now_type = after.types.get(column)
                if now_type is not None and now_type.type_oid != kind.type_oid:
                    table = qualified((before.spec.schema, before.spec.table))
                    # the values may have changed with the type: counted afresh, or refused
                    # by the new binding if the badges cannot compare the new type
                    raise StartAfresh(
                        f"column {column} of table {table}"
                        f" is no longer {kind.type_name} (now {now_type.type_name})"
                    )
    new.check()
    gone = [key for key, m in old.members.items() if new_oids.get(m.oid) != key]
    if gone:
        raise StartAfresh(
            f"partition {qualified(gone[0])} left its badge table (detached, dropped or renamed)"
        )
    added = [m for key, m in new.members.items() if m.oid not in old_oids]
    follow = set(empty)
    unfollowed = [m for m in added if m.holds_rows and not (announced and m.key in follow)]
    if unfollowed:
        m = unfollowed[0]
        raise StartAfresh(f"partition {qualified(m.key)} joined badge table {qualified(m.root)}")
    return added
