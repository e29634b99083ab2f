"""Badge definitions: the ``[[badge]]`` entries of a badges file, checked and parsed once.

A ``BadgeSpec`` is what a file says. Bound to the columns' types (``bind``), it becomes a
``Badge``, from which everything else derives: the snapshot and verify queries
(``replicator.badges.queries``), the row test of the stream (``replicator.badges.applier``)
and doctor's checks.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicator.badges import predicate
from replicator.badges.predicate import Column, Node
from replicator.errors import BadgeFileError, PredicateError, SchemaError

DEFAULT_FILE = Path(__file__).resolve().parent / "default.toml"
KEYS = ("name", "table", "user", "counterpart", "where")
REQUIRED = ("name", "table", "user")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: event fields that no badge may produce
RESERVED = frozenset({"user_id", "lsn"})
#: what user and counterpart columns may be: their text form is their identity
ID_KINDS = frozenset({predicate.TEXT, predicate.UUID, predicate.INTEGER})


@dataclass(frozen=True)
class BadgeSpec:
    """One ``[[badge]]`` entry."""

    name: str
    schema: str
    table: str
    user: str
    counterpart: str | None
    where: Node

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def columns(self) -> list[str]:
        """Every column the badge reads: user, counterpart, then the predicate's."""
        found = dict.fromkeys([self.user, *([self.counterpart] if self.counterpart else [])])
        found.update(dict.fromkeys(predicate.columns(self.where)))
        return list(found)

    @property
    def fields(self) -> list[str]:
        """The event fields this badge adds."""
        return ([self.name] if self.counterpart else []) + [f"total_{self.name}"]


@dataclass(frozen=True)
class Table:
    """What the catalog says of a badge table."""

    #: pg_class.relkind: r (a table), p (partitioned), ...
    kind: str
    #: pg_class.relreplident: f (full), d (default), n (nothing), i (index)
    replica_identity: str
    #: column name -> type, in column order
    columns: Mapping[str, Column]
    oid: int = 0


@dataclass(frozen=True)
class Badge:
    """A spec bound to its table's column types: what the service counts."""

    spec: BadgeSpec
    #: the badge's place in the file, and in every per-badge list
    index: int
    #: column name -> its type, for every column the badge reads
    types: Mapping[str, Column]
    #: pg_class.relkind of the table
    table_kind: str = "r"
    table_oid: int = 0

    @property
    def name(self) -> str:
        return self.spec.name


#: the state packs a badge's number into one byte
MAX_BADGES = 255


def load(path: Path | None, *, schema: str = "public") -> list[BadgeSpec]:
    """The badges of a file (the built-in default when ``path`` is None)."""
    source = path or DEFAULT_FILE
    label = str(path) if path is not None else "the default badges file"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadgeFileError(
            f"REPLICATOR_BADGES={str(path)!r} cannot be read: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise BadgeFileError(f"{label}: not UTF-8 text") from None
    return parse(text, label=label, schema=schema)


def parse(text: str, *, label: str = "badges file", schema: str = "public") -> list[BadgeSpec]:
    """Parse a badges file's text; every error names ``label``, the badge and the key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadgeFileError(f"{label}: not valid TOML: {exc}") from None
    unknown = [key for key in document if key != "badge"]
    if unknown:
        raise BadgeFileError(
            f"{label}: unknown top-level key {unknown[0]!r}; a badges file holds [[badge]] entries"
        )
    entries = document.get("badge")
    if not isinstance(entries, list) or not entries:
        raise BadgeFileError(f"{label}: no [[badge]] entries")
    if len(entries) > MAX_BADGES:
        raise BadgeFileError(
            f"{label}: {len(entries)} [[badge]] entries; a file holds at most {MAX_BADGES}"
        )
    specs: list[BadgeSpec] = []
    for number, entry in enumerate(entries, start=1):
        specs.append(_entry(entry, number, label, schema))
    _check_names(specs, label)
    return specs


def _entry(entry: Any, number: int, label: str, schema: str) -> BadgeSpec:
    if not isinstance(entry, dict):
        raise BadgeFileError(f"{label}: badge #{number} is not a table of keys")
    raw_name = entry.get("name")
    who = f"badge {raw_name!r}" if isinstance(raw_name, str) else f"badge #{number}"

    def fail(key: str, message: str) -> BadgeFileError:
        return BadgeFileError(f"{label}: {who}: {key}: {message}")

    for key in entry:
        if key not in KEYS:
            raise fail(key, f"unknown key; a badge has {', '.join(KEYS)}")
    for key in REQUIRED:
        if key not in entry:
            raise BadgeFileError(f"{label}: {who}: {key}: missing")
    for key, value in entry.items():
        if not isinstance(value, str):
            raise fail(key, f"must be a string, not {type(value).__name__}")
        if key != "where" and not value.strip():
            raise fail(key, "is empty")
    name = entry["name"]
    if not _NAME.match(name):
        raise fail(
            "name", f"{name!r}: use lower case letters, digits and _, starting with a letter"
        )
    if name in RESERVED:
        raise fail("name", f"{name!r} is an event field of its own; choose another name")
    table = entry["table"]
    table_schema, dot, table_name = table.partition(".")
    if not dot:
        table_schema, table_name = schema, table
    if not table_schema or not table_name:
        raise fail("table", f"{table!r}: write schema.table, or table")
    counterpart = entry.get("counterpart")
    if counterpart == entry["user"]:
        raise fail("counterpart", "is the user column itself")
    try:
        where = predicate.parse(entry["where"]) if "where" in entry else predicate.Always()
    except PredicateError as exc:
        raise fail("where", str(exc)) from None
    return BadgeSpec(name, table_schema, table_name, entry["user"], counterpart, where)


def _check_names(specs: Sequence[BadgeSpec], label: str) -> None:
    seen: dict[str, BadgeSpec] = {}
    for spec in specs:
        for field in spec.fields:
            other = seen.get(field)
            if other is not None:
                what = (
                    "is used twice"
                    if other.name == spec.name
                    else f"makes the event field {field!r}, as badge {other.name!r} does"
                )
                raise BadgeFileError(f"{label}: badge {spec.name!r}: name: {what}")
            seen[field] = spec


def bind(specs: Sequence[BadgeSpec], tables: Mapping[tuple[str, str], Table]) -> list[Badge]:
    """Bind each spec to its columns' types, as ``tables`` has them ((schema, table) -> table).

    Raises ``SchemaError`` for a missing table or column and ``BadgeFileError`` for a type
    the service cannot compare, each naming the badge and the fix.
    """
    badges = []
    for index, spec in enumerate(specs):
        table = tables.get((spec.schema, spec.table))
        if table is None:
            raise SchemaError(
                f"badge {spec.name!r}: table {spec.qualified_table} does not exist;"
                " create it, or fix table in the badges file"
            )
        if table.kind not in ("r", "p"):
            what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
            raise SchemaError(
                f"badge {spec.name!r}: {spec.qualified_table} is"
                f" {what.get(table.kind, 'not a table')}, whose changes are not streamed;"
                " a badge counts the rows of a table"
            )
        types: dict[str, Column] = {}
        for column in spec.columns:
            found = table.columns.get(column)
            if found is None:
                near = [c for c in table.columns if c.lower() == column.lower()]
                hint = f" (there is {near[0]!r}: quote it in where)" if near else ""
                raise SchemaError(
                    f"badge {spec.name!r}: table {spec.qualified_table} has no column"
                    f" {column!r}{hint}; add it, or fix the badges file"
                )
            types[column] = found
        for key, id_column in (("user", spec.user), ("counterpart", spec.counterpart)):
            if id_column is not None and types[id_column].kind not in ID_KINDS:
                raise BadgeFileError(
                    f"badge {spec.name!r}: {key}: column {id_column!r} is"
                    f" {types[id_column].type_name}; a {key} column must be uuid, text, varchar,"
                    " bigint, integer or smallint"
                )
        try:
            predicate.check_types(spec.where, types)
        except PredicateError as exc:
            raise BadgeFileError(f"badge {spec.name!r}: where: {exc}") from None
        badges.append(Badge(spec, index, types, table.kind, table.oid))
    return badges
