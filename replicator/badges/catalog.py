"""Badge specs against a live database: tables and column types from the catalog, and the
server's own check of every badge query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from replicator.badges import predicate, queries
from replicator.badges.predicate import Column
from replicator.badges.spec import Badge, BadgeSpec, Table, bind
from replicator.errors import BadgeFileError, one_line

#: every column of the badge tables, with its type resolved through one level of domain
CATALOG_QUERY = """
SELECT n.nspname, c.relname, c.relkind, c.relreplident, a.attname, a.atttypid,
       format_type(a.atttypid, a.atttypmod),
       coalesce(b.typname, t.typname), coalesce(b.typtype, t.typtype),
       coalesce(coll.collisdeterministic, true), coll.collname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
LEFT JOIN pg_collation coll ON coll.oid = a.attcollation AND a.attcollation <> 0
WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY n.nspname, c.relname, a.attnum
"""

_KINDS = {
    "text": predicate.TEXT,
    "varchar": predicate.TEXT,
    "uuid": predicate.UUID,
    "int2": predicate.INTEGER,
    "int4": predicate.INTEGER,
    "int8": predicate.INTEGER,
    "numeric": predicate.NUMERIC,
    "bool": predicate.BOOLEAN,
}


def _kind(base: str, typtype: str, deterministic: bool) -> str:
    if typtype == "e":
        return predicate.ENUM
    kind = _KINDS.get(base, predicate.OTHER)
    if kind == predicate.TEXT and not deterministic:
        return predicate.OTHER
    return kind


def tables_from_rows(rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str], Table]:
    """The catalog rows of ``CATALOG_QUERY`` as tables."""
    found: dict[tuple[str, str], tuple[str, str, dict[str, Column]]] = {}
    for schema, name, relkind, ident, column, oid, shown, base, typtype, det, coll in rows:
        entry = found.setdefault((str(schema), str(name)), (str(relkind), str(ident), {}))
        type_name = str(shown)
        if not det:
            type_name += f' collate "{coll}" (nondeterministic: equality is not byte equality)'
        entry[2][str(column)] = Column(
            type_name, _kind(str(base), str(typtype), bool(det)), int(oid)
        )
    return {key: Table(kind, ident, columns) for key, (kind, ident, columns) in found.items()}


def _params(specs: Sequence[BadgeSpec]) -> tuple[list[str], list[str]]:
    return [s.schema for s in specs], [s.table for s in specs]


def _query_error(badge: Badge, exc: psycopg.Error) -> BadgeFileError:
    return BadgeFileError(f"badge {badge.name!r}: where: the database refuses it: {one_line(exc)}")


def bind_sync(
    conn: psycopg.Connection[Any], specs: Sequence[BadgeSpec], *, explain: bool = True
) -> list[Badge]:
    """Bind ``specs`` to the database's catalog and have the server check each badge query
    (unless ``explain`` is false: planning needs the privilege to read the tables)."""
    rows = conn.execute(CATALOG_QUERY, _params(specs)).fetchall()
    badges = bind(specs, tables_from_rows(rows))
    for badge in badges if explain else ():
        try:
            with conn.transaction():
                conn.execute(queries.explain(badge))
        except psycopg.errors.DataError as exc:
            raise _query_error(badge, exc) from None
        except psycopg.errors.SyntaxErrorOrAccessRuleViolation as exc:
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                raise
            raise _query_error(badge, exc) from None
    return badges


async def bind_async(conn: psycopg.AsyncConnection[Any], specs: Sequence[BadgeSpec]) -> list[Badge]:
    """``bind_sync`` on an async connection."""
    cur = await conn.execute(CATALOG_QUERY, _params(specs))
    badges = bind(specs, tables_from_rows(await cur.fetchall()))
    for badge in badges:
        try:
            async with conn.transaction():
                await conn.execute(queries.explain(badge))
        except psycopg.errors.DataError as exc:
            raise _query_error(badge, exc) from None
        except psycopg.errors.SyntaxErrorOrAccessRuleViolation as exc:
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                raise
            raise _query_error(badge, exc) from None
    return badges
