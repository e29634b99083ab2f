"""Pure decoding of wal2json (format-version 2) output into pgoutput's message tuples, no I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from replicator.badges.state import RULES, Applier
from replicator.errors import ProtocolError
from replicator.pg.decoding import pgoutput
from replicator.pg.decoding.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    Truncate,
    Update,
    Values,
)
from replicator.pg.lsn import format_lsn, parse_lsn

Apply = Callable[[Message], None]
#: a decoded JSON object
Obj = dict[str, Any]

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: JSON scalars a column value may be; numbers stay strings (``parse_int=str``)
_SCALARS = (str, bool, type(None))


def stream_options(schema: str) -> dict[str, str]:
    """START_REPLICATION options: one JSON object per change, with LSNs, for the badge tables."""
    return {
        "format-version": "2",
        "include-transaction": "true",
        # B needs the commit LSN (to skip what a reconnect replays) and C the end LSN (feedback).
        "include-lsn": "true",
        # Only the lag metric reads it, but that metric is part of the contract.
        "include-timestamp": "true",
        "include-schemas": "true",
        "include-types": "false",
        "actions": "insert,update,delete,truncate",
        "add-tables": ",".join(f"{schema}.{rule.table}" for rule in RULES),
    }


class _Malformed(Exception):
    """A field is missing or has the wrong type; ``decode`` adds the action and the LSN."""


@dataclass(slots=True)
class _Table:
    relid: int
    columns: tuple[str, ...]
    replica_identity: str
    #: column name -> slot in the values list, as the applier asked (None: not wanted)
    slots: dict[str, int] | None = None
    width: int = 0


class Decoder:
    """Turns wal2json objects into the messages ``Applier.apply_message`` takes.

    wal2json has no Relation messages and no relation ids: a Relation with a made-up id is
    emitted the first time a table shows up and whenever its columns change. Like
    ``pgoutput.Decoder``, rows hold only the columns set with ``project(relid, slots)``,
    which the applier calls while it applies that Relation; this is why ``decode`` hands
    each message to ``apply`` before it builds the next one.
    """

    def __init__(self, schema: str = "public") -> None:
        self.relations: dict[int, Relation] = {}
        self._tables: dict[tuple[str, str], _Table] = {}
        self._by_relid: dict[int, _Table] = {}
        # A TRUNCATE names its table but carries no columns; a table first seen that way
        # is announced with the columns the badge rules need, and corrected by its next row.
        self._known = {(schema, rule.table): rule.columns for rule in RULES}

    def project(self, relid: int, slots: tuple[int, ...]) -> None:
        table = self._by_relid.get(relid)
        if table is None:
            return
        table.slots = {
            name: slot for name, slot in zip(table.columns, slots, strict=False) if slot >= 0
        }
        table.width = max(slots, default=-1) + 1

    def forget(self, relid: int) -> None:
        table = self._by_relid.get(relid)
        if table is not None:
            table.slots = None

    def decode(self, data: bytes | memoryview, lsn: int, apply: Apply) -> None:
        """Decode one wal2json object that arrived at WAL position ``lsn``; pass on its messages."""
        try:
            obj = json.loads(bytes(data), parse_int=str, parse_float=str, parse_constant=str)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"malformed wal2json message at {format_lsn(lsn)}: {exc}") from None
        if type(obj) is not dict:
            raise ProtocolError(
                f"wal2json message at {format_lsn(lsn)} is a JSON {type(obj).__name__},"
                " not an object"
            )
        action = obj.get("action")
        try:
            if action == "I":
                self._insert(obj, apply)
            elif action == "U":
                self._update(obj, apply)
            elif action == "D":
                self._delete(obj, apply)
            elif action == "B":
                apply(Begin(_lsn(obj, "lsn"), _time(obj), _xid(obj)))
            elif action == "C":
                apply(Commit(0, _lsn(obj, "lsn"), _lsn(obj, "nextlsn"), _time(obj)))
            elif action == "T":
                self._truncate(obj, apply)
            elif action == "M":
                apply(_message(obj, lsn))
            else:
                raise ProtocolError(
                    f"unknown wal2json action {str(action)[:20]!r} at {format_lsn(lsn)}"
                )
        except _Malformed as exc:
            raise ProtocolError(
                f"malformed wal2json {action!r} message at {format_lsn(lsn)}: {exc}"
            ) from None

    # -- relations -------------------------------------------------------------------------

    def _table(self, obj: Obj) -> tuple[tuple[str, str], _Table | None]:
        key = (_str(obj, "schema"), _str(obj, "table"))
        return key, self._tables.get(key)

    def _announce(
        self,
        key: tuple[str, str],
        table: _Table | None,
        columns: tuple[str, ...],
        replica_identity: str,
        apply: Apply,
    ) -> _Table:
        if table is None:
            relid = len(self._tables) + 1
            table = _Table(relid, columns, replica_identity)
            self._tables[key] = table
            self._by_relid[relid] = table
        else:
            table.columns, table.replica_identity = columns, replica_identity
        table.slots = None
        relation = Relation(
            table.relid,
            key[0],
            key[1],
            replica_identity,
            tuple(Column(name, 0, -1, False) for name in columns),
        )
        self.relations[table.relid] = relation
        apply(relation)
        return table

    # -- changes ---------------------------------------------------------------------------

    def _insert(self, obj: Obj, apply: Apply) -> None:
        key, table = self._table(obj)
        new = _columns(obj, "columns")
        names = _names(new)
        if table is None or names != table.columns:
            # An inserted row has every column, so its names are the table's columns.
            ident = "f" if table is None else table.replica_identity
            table = self._announce(key, table, names, ident, apply)
        apply(Insert(table.relid, _row(table, new)))

    def _update(self, obj: Obj, apply: Apply) -> None:
        key, table = self._table(obj)
        new = _columns(obj, "columns")
        names = _names(new)
        old = _columns(obj, "identity") if "identity" in obj else None
        old_names = _names(old) if old is not None else None
        # A full identity holds every column; the new row lacks unchanged TOASTed values,
        # and a key-only identity lacks nearly everything else.
        whole = old_names is not None and (old_names == names or set(old_names) >= set(names))
        full = old_names if whole else None
        if full is not None:
            if table is None or full != table.columns:
                table = self._announce(key, table, full, "f", apply)
        elif table is None:
            columns = names + tuple(n for n in old_names or () if n not in names)
            table = self._announce(key, None, columns, "d" if old is not None else "n", apply)
        values = _row(table, new)
        if values is not None and table.slots is not None:
            present = set(names)
            for name, slot in table.slots.items():
                if name not in present:
                    values[slot] = UNCHANGED
        old_values = _row(table, old) if old is not None else None
        kind = "O" if full is not None else ("K" if old is not None else "")
        apply(Update(table.relid, old_values, values, kind))

    def _delete(self, obj: Obj, apply: Apply) -> None:
        key, table = self._table(obj)
        old = _columns(obj, "identity")
        names = _names(old)
        if table is None:
            needed = self._known.get(key, ())
            full = set(needed) <= set(names)
            columns = names if full else names + tuple(n for n in needed if n not in names)
            table = self._announce(key, None, columns, "f" if full else "d", apply)
        elif names == table.columns:
            full = True
        else:
            # Either a key-only identity or a column dropped since the table's last row: the
            # old row is whole for our purpose when it holds every column the applier reads.
            wanted = table.slots.keys() if table.slots is not None else table.columns
            full = set(wanted) <= set(names)
            if full:
                table = self._announce(key, table, names, "f", apply)
        apply(Delete(table.relid, _row(table, old), "O" if full else "K"))

    def _truncate(self, obj: Obj, apply: Apply) -> None:
        key, table = self._table(obj)
        if table is None:
            table = self._announce(key, None, self._known.get(key, ()), "f", apply)
        # wal2json leaves out CASCADE and RESTART IDENTITY; neither changes a count.
        apply(Truncate((table.relid,), False, False))


def attach(
    applier: Applier, decoder: Decoder | None = None
) -> Callable[[bytes | memoryview, int], None]:
    """Make ``applier`` take wal2json payloads: returns ``feed(payload, wal_start)``."""
    decoder = decoder or Decoder(applier.schema)
    applier.decoder = _Projections(decoder)
    apply = applier.apply_message

    def feed(payload: bytes | memoryview, lsn: int) -> None:
        decoder.decode(payload, lsn, apply)

    return feed


class _Projections(pgoutput.Decoder):
    """Sits where the applier keeps its pgoutput decoder and passes its projections on."""

    def __init__(self, target: Decoder) -> None:
        super().__init__()
        self._target = target

    def project(self, relid: int, slots: tuple[int, ...]) -> None:
        self._target.project(relid, slots)

    def forget(self, relid: int) -> None:
        self._target.forget(relid)


# -- fields -----------------------------------------------------------------------------------


def _str(obj: Obj, key: str) -> str:
    value = obj.get(key)
    if type(value) is not str:
        raise _Malformed(f"{key} is {_show(value)}, expected a string")
    return value


def _lsn(obj: Obj, key: str) -> int:
    if key not in obj:
        raise _Malformed(f"no {key} (is wal2json started with include-lsn?)")
    try:
        return parse_lsn(_str(obj, key))
    except ProtocolError as exc:
        raise _Malformed(str(exc)) from None


def _xid(obj: Obj) -> int:
    value = obj.get("xid")
    if value is None:
        return 0
    if type(value) is not str or not value.isdigit() or len(value) > 10:
        raise _Malformed(f"xid is {_show(value)}, expected a transaction id")
    return int(value)


def _time(obj: Obj) -> int:
    """Commit time in microseconds since 2000-01-01, or 0 if absent or unreadable."""
    value = obj.get("timestamp")
    if type(value) is not str:
        return 0
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        # Only the lag metric reads it: a server-side format we cannot read is no reason to stop.
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _PG_EPOCH) // _MICROSECOND


def _message(obj: Obj, lsn: int) -> LogicalMessage:
    transactional = obj.get("transactional")
    if type(transactional) is not bool:
        raise _Malformed(f"transactional is {_show(transactional)}, expected true or false")
    # The XLogData of a message starts at the message's own LSN.
    at = _lsn(obj, "lsn") if "lsn" in obj else lsn
    content = _str(obj, "content")
    try:
        data = content.encode()
    except UnicodeEncodeError as exc:
        raise _Malformed(f"content is not UTF-8: {exc}") from None
    return LogicalMessage(transactional, at, _str(obj, "prefix"), data)


def _columns(obj: Obj, key: str) -> list[Obj]:
    value = obj.get(key)
    if type(value) is not list:
        raise _Malformed(f"{key} is {_show(value)}, expected a list of columns")
    return value


def _names(columns: list[Obj]) -> tuple[str, ...]:
    """The column names, checking each column on the way so that rows decode without failing."""
    names = []
    for col in columns:
        if type(col) is not dict:
            raise _Malformed(f"column is {_show(col)}, expected an object")
        name = col.get("name")
        if type(name) is not str:
            raise _Malformed(f"column name is {_show(name)}, expected a string")
        if "value" not in col:
            raise _Malformed(f"column {name!r} has no value")
        if not isinstance(col["value"], _SCALARS):
            raise _Malformed(f"column {name!r} has value {_show(col['value'])}")
        names.append(name)
    result = tuple(names)
    if len(set(result)) != len(result):
        raise _Malformed(f"repeated column names in {list(result)!r}"[:200])
    return result


def _row(table: _Table, columns: list[Obj]) -> Values | None:
    slots = table.slots
    if slots is None:
        return None
    values: Values = [None] * table.width
    for col in columns:
        slot = slots.get(col["name"])
        if slot is not None:
            value = col["value"]
            if value is True:
                values[slot] = "t"
            elif value is False:
                values[slot] = "f"
            else:
                values[slot] = value
    return values


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
