"""The badge queries, composed from each badge's spec: the snapshot's, verify's, doctor's.

Every query returns ``(user, counterpart, count)`` rows as text, the counterpart ``''`` for a
badge without one: the same form the stream keeps counts in.
"""

from __future__ import annotations

from psycopg import sql

from replicator.badges import predicate
from replicator.badges.spec import Badge


def table(badge: Badge) -> sql.Composable:
    """The badge's table; ``ONLY`` a plain table, since the stream follows no inheritance child."""
    spec = badge.spec
    name = sql.Identifier(spec.schema, spec.table)
    return name if badge.table_kind == "p" else sql.SQL("ONLY {}").format(name)


def condition(badge: Badge) -> sql.Composable:
    """When a row counts: the predicate, and both ids present (a NULL id counts for nobody)."""
    spec = badge.spec
    parts = [
        predicate.to_sql(spec.where),
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(spec.user)),
    ]
    if spec.counterpart is not None:
        parts.append(sql.SQL("{} IS NOT NULL").format(sql.Identifier(spec.counterpart)))
    return sql.SQL(" AND ").join(parts)


def counts(badge: Badge, *, as_text: bool = True) -> sql.Composed:
    """The badge's counts: one ``(user, counterpart, count)`` row per pair with a count.

    ``as_text=False`` leaves the ids in their column's type (the snapshot reads them in
    binary); the rows are the same."""
    spec = badge.spec
    cast = sql.SQL("::text" if as_text else "")
    user = sql.SQL("{}{}").format(sql.Identifier(spec.user), cast)
    if spec.counterpart is None:
        return sql.SQL(
            "SELECT {user}, ''::text, count(*) FROM {table} WHERE {condition} GROUP BY 1"
        ).format(user=user, table=table(badge), condition=condition(badge))
    return sql.SQL(
        "SELECT {user}, {counterpart}{cast}, count(*) FROM {table} WHERE {condition} GROUP BY 1, 2"
    ).format(
        user=user,
        counterpart=sql.Identifier(spec.counterpart),
        cast=cast,
        table=table(badge),
        condition=condition(badge),
    )


def explain(badge: Badge) -> sql.Composed:
    """The counts query, planned but not run: the server's check of names, types and literals."""
    return sql.SQL("EXPLAIN {}").format(counts(badge))


def index_columns(badge: Badge) -> list[str]:
    spec = badge.spec
    return [spec.user, *([spec.counterpart] if spec.counterpart else [])]
