"""Badge specs against a live database: tables and column types from the catalog, and the
server's own check of every badge query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from replicator.badges import predicate, queries
from replicator.badges.predicate import Column
from replicator.badges.spec import Badge, BadgeSpec, Table, bind
from replicator.badges.tables import Member, TableMap
from replicator.errors import BadgeFileError, one_line

#: every column of the badge tables, with its type resolved through one level of domain
CATALOG_QUERY = """
SELECT n.nspname, c.relname, c.relkind, c.relreplident, c.oid, a.attname, a.atttypid,
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
    found: dict[tuple[str, str], tuple[str, str, int, dict[str, Column]]] = {}
    for schema, name, relkind, ident, reloid, column, oid, shown, base, typtype, det, coll in rows:
        entry = found.setdefault(
            (str(schema), str(name)), (str(relkind), str(ident), int(reloid), {})
        )
        type_name = str(shown)
        if not det:
            type_name += f' collate "{coll}" (nondeterministic: equality is not byte equality)'
        kind = _kind(str(base), str(typtype), bool(det))
        entry[3][str(column)] = Column(type_name, kind, int(oid))
    return {
        key: Table(relkind, ident, columns, reloid)
        for key, (relkind, ident, reloid, columns) in found.items()
    }


def _params(specs: Sequence[BadgeSpec]) -> tuple[list[str], list[str]]:
    return [s.schema for s in specs], [s.table for s in specs]


def _refused(badge: Badge, exc: psycopg.Error) -> psycopg.Error | BadgeFileError:
    """What to raise when the server would not plan a badge's query: the file's fault (a
    literal of the wrong type, an unknown enum label), or the error as it is (a privilege)."""
    planning = (psycopg.errors.DataError, psycopg.errors.SyntaxErrorOrAccessRuleViolation)
    if isinstance(exc, planning) and not isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return BadgeFileError(
            f"badge {badge.name!r}: where: the database refuses it: {one_line(exc)}"
        )
    return exc


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
        except psycopg.Error as exc:
            raise _refused(badge, exc) from None
    return badges


async def bind_async(
    conn: psycopg.AsyncConnection[Any], specs: Sequence[BadgeSpec], *, explain: bool = True
) -> list[Badge]:
    """``bind_sync`` on an async connection."""
    cur = await conn.execute(CATALOG_QUERY, _params(specs))
    badges = bind(specs, tables_from_rows(await cur.fetchall()))
    for badge in badges if explain else ():
        try:
            async with conn.transaction():
                await conn.execute(queries.explain(badge))
        except psycopg.Error as exc:
            raise _refused(badge, exc) from None
    return badges


#: every relation under the badge tables (partitions and inheritance children, any depth)
MEMBERS_QUERY = """
WITH RECURSIVE tree(root, relid, depth) AS (
    SELECT c.oid, c.oid, 0 FROM pg_class c WHERE c.oid = ANY(%s::oid[])
    UNION ALL
    SELECT tree.root, i.inhrelid, tree.depth + 1
    FROM tree JOIN pg_inherits i ON i.inhparent = tree.relid
)
SELECT rn.nspname, r.relname, c.oid, n.nspname, c.relname, c.relkind, c.relispartition,
       c.relreplident, c.relrowsecurity, c.relforcerowsecurity, pg_has_role(c.relowner, 'USAGE')
FROM tree
JOIN pg_class c ON c.oid = tree.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = tree.root
JOIN pg_namespace rn ON rn.oid = r.relnamespace
ORDER BY tree.depth, c.oid
"""
ROLE_QUERY = (
    "SELECT current_user, rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
)
PUBLISHED_QUERY = "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s"
#: whether a relation holds no row (a partition created empty, which the stream can follow)
EMPTY_QUERY = "SELECT NOT EXISTS (SELECT 1 FROM ONLY {})"


def table_map(
    members: Sequence[Sequence[Any]], role: Sequence[Any], published: Sequence[Sequence[Any]]
) -> TableMap:
    """A ``TableMap`` from the rows of ``MEMBERS_QUERY``, ``ROLE_QUERY`` and ``PUBLISHED_QUERY``."""
    found = TableMap(role=str(role[0]), bypasses_row_security=bool(role[1]))
    for rs, rn, oid, schema, name, kind, partition, ident, rls, forced, owned in members:
        key = (str(schema), str(name))
        found.members.setdefault(
            key,
            Member(
                int(oid),
                key,
                (str(rs), str(rn)),
                str(kind),
                bool(partition),
                str(ident),
                bool(rls),
                bool(forced),
                bool(owned),
            ),
        )
    found.others = {(str(s), str(t)) for s, t in published} - found.members.keys()
    return found


def _oids(badges: Sequence[Badge]) -> list[int]:
    return sorted({b.table_oid for b in badges})


def describe_sync(
    conn: psycopg.Connection[Any], badges: Sequence[Badge], publication: str
) -> TableMap:
    """The members of the badge tables, and what else the publication holds."""
    members = conn.execute(MEMBERS_QUERY, (_oids(badges),)).fetchall()
    role = conn.execute(ROLE_QUERY).fetchone()
    published = conn.execute(PUBLISHED_QUERY, (publication,)).fetchall()
    assert role is not None
    return table_map(members, role, published)


async def describe_async(
    conn: psycopg.AsyncConnection[Any], badges: Sequence[Badge], publication: str
) -> TableMap:
    """``describe_sync`` on an async connection."""
    members = await (await conn.execute(MEMBERS_QUERY, (_oids(badges),))).fetchall()
    role = await (await conn.execute(ROLE_QUERY)).fetchone()
    published = await (await conn.execute(PUBLISHED_QUERY, (publication,))).fetchall()
    assert role is not None
    return table_map(members, role, published)


async def empty_relations(
    conn: psycopg.AsyncConnection[Any], keys: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Those of ``keys`` that hold no row."""
    empty = []
    for key in keys:
        cur = await conn.execute(sql.SQL(EMPTY_QUERY).format(sql.Identifier(*key)))
        row = await cur.fetchone()
        if row is not None and row[0]:
            empty.append(key)
    return empty
