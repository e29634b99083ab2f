"""The neutral change model: what a decoder makes of any output plugin's messages.

Decoders (pgoutput, wal2json) produce these; ``replicator.pg.feed`` frames them into
transactions and hands rows, as plain lists of text values, to whoever asked for a relation's
columns. No message here holds bytes of the wire format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol


class _Unchanged:
    """An unchanged TOASTed value (``u``): the column keeps its old value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = str | bytes | None | _Unchanged
Values = list[Value]


class Begin(NamedTuple):
    final_lsn: int
    commit_time: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


class Origin(NamedTuple):
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


class Type(NamedTuple):
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    relid: int
    new: Values | None


class Update(NamedTuple):
    relid: int
    old: Values | None
    new: Values | None
    #: ``O`` when the old tuple is the whole row (replica identity full), ``K`` for the key only
    old_kind: str


class Delete(NamedTuple):
    relid: int
    old: Values | None
    old_kind: str


class Truncate(NamedTuple):
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


class LogicalMessage(NamedTuple):
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


class Projection(NamedTuple):
    """What the receiver of changes wants of one relation.

    ``slots`` gives, for each column of the relation, the slot of its value in a row (``-1``:
    not wanted). Rows are handed over as plain lists: ``insert(new)``, ``update(old, new)``
    and ``delete(old)``, where ``old`` is None when the server did not log the whole old row
    (replica identity other than full). Unchanged TOASTed values of ``new`` are already
    filled in from ``old``.
    """

    slots: tuple[int, ...]
    insert: Callable[[Values], None]
    update: Callable[[Values | None, Values], None]
    delete: Callable[[Values | None], None]


class ChangeSink(Protocol):
    """The receiver of a change stream, framed into transactions by ``replicator.pg.feed``."""

    def relation(self, relation: Relation) -> Projection | None:
        """A relation was announced (again): the columns wanted of it, or None for none."""

    def truncate(self, relids: tuple[int, ...]) -> None:
        """The relations were truncated in the open transaction."""

    def message(self, prefix: str, content: str) -> None:
        """A transactional logical message in the open transaction."""

    def commit(self, commit_lsn: int, commit_time: int) -> None:
        """The open transaction committed: what it changed becomes visible."""

    def abandon(self) -> None:
        """The open transaction was cut off (a lost connection): forget what it changed."""
