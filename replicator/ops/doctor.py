"""``replicator doctor``: the production checklist, run against a live database."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from psycopg import sql as psql

from replicator.badges import queries
from replicator.badges import spec as badge_spec
from replicator.badges.catalog import bind_sync, describe_sync
from replicator.badges.predicate import Always, quote_name, to_sql, to_text
from replicator.badges.spec import Badge, BadgeSpec
from replicator.badges.tables import TableMap, qualified
from replicator.config.settings import Settings
from replicator.errors import ReplicatorError, one_line
from replicator.pg import ddl
from replicator.pg.slots import WAL_POSITION
from replicator.runtime.cluster import PostgresCluster, embedded_bindir
from replicator.runtime.embedded import embedded_database

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_SERVER_VERSION = 14
_REPLICA_IDENTITY = {"d": "default", "n": "nothing", "f": "full", "i": "index"}

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class Check:
    """One line of the checklist; ``fix`` says what to do when it is not ok, and ``sql`` the
    statements that do it (what ``doctor --sql`` prints)."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    sql: tuple[str, ...] = ()


def fix_statements(*statements: str) -> dict[str, Any]:
    """``fix`` and ``sql`` of a check that SQL alone mends."""
    return {"fix": "; ".join(statements), "sql": statements}


def connect(dsn: str, *, statement_timeout: str | None = "30s") -> Conn:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise ReplicatorError(
            f"cannot connect to the database at {describe_dsn(dsn)}: {one_line(exc)}"
        ) from None
    if statement_timeout is not None:
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (statement_timeout,))
    return conn


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a connection string, without credentials."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}"


@contextmanager
def database_dsn(settings: Settings, *, start_embedded: bool) -> Iterator[str]:
    """DATABASE_URL, or the embedded default's DSN.

    A running embedded server (a ``replicator serve`` elsewhere) is used as it is and left
    running; otherwise it is started for the duration of the block when ``start_embedded``.
    """
    if settings.database_url:
        yield settings.database_url
        return
    data_dir = settings.data_dir.expanduser().resolve()
    cluster = PostgresCluster(embedded_bindir(), data_dir / "pgdata")
    if cluster.initialized() and cluster.is_running():
        cluster.port = cluster.running_port() or cluster.port
        yield cluster.dsn()
        return
    if not start_embedded:
        raise ReplicatorError(
            f"the embedded database in {data_dir} is not running;"
            " start `replicator serve` or set DATABASE_URL"
        )
    with embedded_database(data_dir) as db:
        yield db.dsn


def _rows(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return conn.execute(query.encode(), params).fetchall()


def _value(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> Any:
    rows = _rows(conn, query, params)
    return rows[0][0] if rows else None


def check_server(conn: Conn) -> Check:
    version = conn.info.server_version
    text = str(_value(conn, "SHOW server_version")).split()[0]
    if version // 10000 < MIN_SERVER_VERSION:
        return Check(
            "server",
            FAIL,
            f"PostgreSQL {text} is older than {MIN_SERVER_VERSION}",
            f"upgrade to PostgreSQL {MIN_SERVER_VERSION} or newer",
        )
    return Check("server", OK, f"PostgreSQL {text}")


def check_wal_level(conn: Conn) -> Check:
    level = _value(conn, "SHOW wal_level")
    if level == "logical":
        return Check("wal_level", OK, "logical")
    return Check(
        "wal_level",
        FAIL,
        f"{level}; logical replication needs logical",
        "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
    )


def name(schema: str, table: str) -> str:
    """A table's name as SQL, quoted only where it must be."""
    return f"{quote_name(schema)}.{quote_name(table)}"


def check_badges(conn: Conn, specs: list[BadgeSpec]) -> tuple[Check, list[Badge]]:
    """The badges file against the catalog: tables, columns, types, and the server's parse."""
    unplanned = ""
    try:
        try:
            badges = bind_sync(conn, specs)
        except psycopg.errors.InsufficientPrivilege:
            # table access reports the missing privilege; the catalog is readable without it
            badges = bind_sync(conn, specs, explain=False)
            unplanned = " (queries not planned: no privilege to read the tables)"
    except ReplicatorError as exc:
        return Check("badges", FAIL, str(exc), "fix the table, the column or the badges file"), []
    described = ", ".join(f"{b.name} ({name(b.spec.schema, b.spec.table)})" for b in badges)
    count = f"{len(badges)} badge{'s' * (len(badges) != 1)}"
    return Check("badges", OK, f"{count}: {described}{unplanned}"), badges


def check_publication(
    conn: Conn,
    publication: str,
    tables: list[tuple[str, str]],
    members: TableMap | None = None,
) -> Check:
    names = ", ".join(name(*table) for table in tables)
    partitioned = members is not None and members.partitioned()
    row = _rows(
        conn,
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = %s",
        (publication,),
    )
    if not row:
        create = f"CREATE PUBLICATION {quote_name(publication)} FOR TABLE {names}"
        return Check(
            "publication",
            FAIL,
            f"{publication} does not exist",
            f"replicator migrate (the default schema), or {create}",
            (create,),
        )
    problems: list[str] = []
    fixes: list[str] = []
    ops = [
        op
        for op, on in zip(("insert", "update", "delete", "truncate"), row[0], strict=True)
        if not on
    ]
    pub = quote_name(publication)
    if ops:
        problems.append(f"does not publish {', '.join(ops)}")
        fixes.append(f"ALTER PUBLICATION {pub} SET (publish = 'insert, update, delete, truncate')")
    extra = ", rowfilter IS NOT NULL" if conn.info.server_version >= 150000 else ", false"
    published = {
        (str(r[0]), str(r[1])): bool(r[2])
        for r in _rows(
            conn,
            f"SELECT schemaname, tablename{extra} FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        )
    }
    # with partitions the publication lists their leaves, not the partitioned table
    wanted = tables if members is None else members.leaves()
    missing = [name(*table) for table in wanted if table not in published]
    if missing:
        problems.append(f"lacks {', '.join(missing)}")
        fixes.append(f"ALTER PUBLICATION {pub} ADD TABLE {', '.join(missing)}")
    filtered = [name(*table) for table in wanted if published.get(table)]
    if filtered:
        problems.append(f"filters the rows of {', '.join(filtered)}")
        fixes.append(f"ALTER PUBLICATION {pub} SET TABLE {names}")
    if partitioned and _value(
        conn, "SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (publication,)
    ):
        problems.append("publishes partitions as their root (which hides a partition's TRUNCATE)")
        fixes.append(f"ALTER PUBLICATION {pub} SET (publish_via_partition_root = false)")
    if problems:
        return Check(
            "publication", FAIL, f"{publication} {' and '.join(problems)}", **fix_statements(*fixes)
        )
    return Check(
        "publication", OK, f"{publication} holds {names} (insert, update, delete, truncate)"
    )


def _tables(conn: Conn, tables: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Badge table -> replica identity letter, for the tables that exist."""
    return {
        (str(schema), str(table)): str(ident)
        for schema, table, ident in _rows(
            conn,
            "SELECT n.nspname, c.relname, c.relreplident FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " AND c.relkind IN ('r', 'p')",
            ([s for s, _ in tables], [t for _, t in tables]),
        )
    }


def check_replica_identity(
    conn: Conn, tables: list[tuple[str, str]], members: TableMap | None = None
) -> Check:
    """Every badge table, and every partition of one, must log whole old rows."""
    found = _tables(conn, tables)
    if members is not None:
        found.update(
            {key: m.replica_identity for key, m in members.members.items() if m.holds_rows}
        )
        tables = list(dict.fromkeys([*tables, *members.leaves()]))
    problems: list[str] = []
    fixes: list[str] = []
    statements: list[str] = []
    for table in tables:
        ident = found.get(table)
        if ident is None:
            problems.append(f"{name(*table)} does not exist")
            fixes.append("replicator migrate (the default schema), or create it")
        elif ident != "f":
            problems.append(
                f"{name(*table)} has replica identity {_REPLICA_IDENTITY.get(ident, ident)}"
            )
            statement = f"ALTER TABLE {name(*table)} REPLICA IDENTITY FULL"
            fixes.append(statement)
            statements.append(statement)
    if problems:
        return Check(
            "replica identity",
            FAIL,
            "; ".join(problems),
            "; ".join(dict.fromkeys(fixes)),
            tuple(statements),
        )
    return Check("replica identity", OK, f"full on {', '.join(name(*t) for t in tables)}")


def _terms(predicate: str) -> frozenset[str]:
    """The top-level AND terms of a predicate as the server prints it, outer parentheses off."""
    terms: list[str] = []
    depth, quoted, start = 0, False, 0
    text = _unwrap(predicate.strip())
    i = 0
    while i < len(text):
        char = text[i]
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and text.startswith(" AND ", i):
            terms.append(text[start:i])
            start = i + 5
            i += 5
            continue
        i += 1
    terms.append(text[start:])
    return frozenset(_unwrap(term.strip()) for term in terms)


def _unwrap(text: str) -> str:
    """``(x)`` -> ``x`` while the outer parentheses enclose the whole text."""
    while text.startswith("(") and text.endswith(")"):
        depth, quoted = 0, False
        for i, char in enumerate(text):
            if char == "'":
                quoted = not quoted
            elif not quoted and char == "(":
                depth += 1
            elif not quoted and char == ")":
                depth -= 1
                if depth == 0 and i != len(text) - 1:
                    return text
        text = text[1:-1].strip()
    return text


def _wanted_predicate(conn: Conn, badge: Badge) -> str | None:
    """The badge's predicate as the server prints an index predicate: the same words an
    index built for it shows, from a probe index on an empty temporary copy of the table."""
    spec = badge.spec
    if isinstance(spec.where, Always):
        return None
    with conn.transaction(force_rollback=True):
        conn.execute(
            psql.SQL("CREATE TEMPORARY TABLE replicator_doctor_probe (LIKE {})").format(
                psql.Identifier(spec.schema, spec.table)
            )
        )
        conn.execute(
            psql.SQL(
                "CREATE INDEX replicator_doctor_probe_index ON replicator_doctor_probe ({})"
                " WHERE {}"
            ).format(psql.Identifier(spec.user), to_sql(spec.where))
        )
        found = _value(
            conn,
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
            " WHERE indexrelid = 'replicator_doctor_probe_index'::regclass",
        )
    return str(found)


def create_index(badge: Badge) -> str:
    """The statement that builds the index a badge's snapshot wants."""
    spec = badge.spec
    # a partitioned table cannot build its index concurrently
    how = "CREATE INDEX" if badge.table_kind == "p" else "CREATE INDEX CONCURRENTLY"
    index = quote_name(f"idx_{spec.table}_{spec.name}"[:63])
    columns = ", ".join(quote_name(c) for c in queries.index_columns(badge))
    where = "" if isinstance(spec.where, Always) else f" WHERE {to_text(spec.where)}"
    return f"{how} {index} ON {name(spec.schema, spec.table)} ({columns}){where}"


def check_index(conn: Conn, bound: list[Badge], spec: BadgeSpec) -> Check:
    check_name = f"index {spec.name}"
    badge = next((b for b in bound if b.spec is spec), None)
    if badge is None:
        return Check(check_name, FAIL, "not checked: the badges do not fit the database")
    table = name(spec.schema, spec.table)
    statement = create_index(badge)
    try:
        want = _wanted_predicate(conn, badge)
    except psycopg.errors.InsufficientPrivilege:
        return Check(check_name, WARN, f"not checked: no privilege to read {table} (table access)")
    except psycopg.errors.ReadOnlySqlTransaction:
        return Check(check_name, WARN, "not checked on a standby: run doctor on the primary")
    rows = _rows(
        conn,
        "SELECT i.relname, pg_get_expr(x.indpred, x.indrelid), x.indisvalid AND x.indisready,"
        " ARRAY(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(attnum, ord)"
        "  JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum"
        "  ORDER BY k.ord)"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = %s AND t.relname = %s ORDER BY i.relname",
        (spec.schema, spec.table),
    )
    invalid: list[str] = []
    for index, predicate, valid, columns in rows:
        if want is None:
            if predicate is not None:
                continue
        elif predicate is None or _terms(str(predicate)) != _terms(want):
            continue
        if not columns or columns[0] != spec.user:
            continue
        if not valid:
            invalid.append(str(index))
            continue
        return Check(check_name, OK, f"{index} serves {spec.name}")
    if invalid:
        reindex = f"REINDEX INDEX CONCURRENTLY {name(spec.schema, invalid[0])}"
        return Check(
            check_name,
            FAIL,
            f"{invalid[0]} on {table} is invalid (an interrupted build)",
            **fix_statements(reindex),
        )
    what = f"partial index on {table} ({spec.user}, ...) WHERE {to_text(spec.where)}"
    if want is None:
        what = f"index on {table} ({spec.user}, ...)"
    return Check(
        check_name,
        FAIL,
        f"no {what}; the {spec.name} snapshot scans the table",
        **fix_statements(statement),
    )


def instance_pattern(prefix: str) -> str:
    """The names of every instance's slot: the prefix, then an instance id."""
    return f"^{prefix}_[a-z0-9]+$"


def check_slots(conn: Conn, slot: str) -> Check:
    limit, used, own = _rows(
        conn,
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots),"
        " (SELECT count(*) FROM pg_replication_slots WHERE slot_name ~ %s)",
        (instance_pattern(slot),),
    )[0]
    free = limit - used
    detail = f"{used} of {limit} used, {free} free"
    if own:
        return Check(
            "replication slots",
            OK,
            f"{detail} ({own} of them the service's, one an instance; a new instance needs one)"
            if free >= 1
            else f"{detail} ({own} of them the service's; a new instance would find none)",
        )
    if free < 1:
        return Check(
            "replication slots",
            FAIL,
            f"{detail}; the service needs one for slot {slot}",
            "drop unused slots, or raise max_replication_slots (ALTER SYSTEM SET; restart)",
        )
    return Check("replication slots", OK, detail)


def check_senders(conn: Conn, slot: str) -> Check:
    limit, active, own = _rows(
        conn,
        "SELECT current_setting('max_wal_senders')::int,"
        " (SELECT count(*) FROM pg_stat_replication),"
        " (SELECT count(*) FROM pg_replication_slots WHERE slot_name ~ %s AND active)",
        (instance_pattern(slot),),
    )[0]
    free = limit - active
    detail = f"{active} of {limit} active, {free} free"
    if own:
        return Check("wal senders", OK, f"{detail} ({own} streaming for the service)")
    if free < 1:
        return Check(
            "wal senders",
            FAIL,
            f"{detail}; the service needs one to stream",
            "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = 10; restart)",
        )
    return Check("wal senders", OK, detail)


def check_role(conn: Conn) -> Check:
    role, superuser, replication = _rows(
        conn,
        "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
    )[0]
    if superuser:
        return Check("replication role", OK, f"{role} may replicate (superuser)")
    if replication:
        return Check("replication role", OK, f"{role} may replicate (REPLICATION attribute)")
    return Check(
        "replication role",
        FAIL,
        f"{role} may not replicate",
        f'ALTER ROLE "{role}" REPLICATION (as a superuser), or connect as a role that has it',
    )


def check_access(conn: Conn, tables: list[tuple[str, str]]) -> Check:
    found = [table for table in tables if table in _tables(conn, tables)]
    denied = [
        name(*table)
        for table in found
        if not _value(conn, "SELECT has_table_privilege(%s, 'SELECT')", (name(*table),))
    ]
    role = _value(conn, "SELECT current_user")
    if denied:
        return Check(
            "table access",
            FAIL,
            f"{role} cannot read {', '.join(denied)} (the start-up snapshot reads them)",
            **fix_statements(f'GRANT SELECT ON {", ".join(denied)} TO "{role}"'),
        )
    if not found:
        return Check(
            "table access",
            FAIL,
            "none of the badge tables exists",
            "replicator migrate (the default schema), or create your tables",
        )
    return Check("table access", OK, f"{role} can read {', '.join(name(*t) for t in found)}")


def check_inactive_slots(conn: Conn, slot: str) -> Check:
    rows = _rows(
        conn,
        "SELECT slot_name, slot_type, database, retained, pg_size_pretty(retained) FROM ("
        f" SELECT slot_name, slot_type, database, pg_wal_lsn_diff({WAL_POSITION}, restart_lsn)"
        " AS retained"
        " FROM pg_replication_slots WHERE NOT active) s"
        " ORDER BY retained DESC NULLS LAST, slot_name",
    )
    holding = [r for r in rows if r[3] is not None and r[3] > 0]
    idle = [str(r[0]) for r in rows if r[3] is None or r[3] <= 0]
    idle_text = f"{', '.join(idle)} inactive, holding no WAL" if idle else ""
    if holding:
        described = []
        for name, kind, database, _, pretty in holding:
            where = f"{kind}, database {database}" if database else str(kind)
            own = (
                ", an instance of the service that stopped"
                if re.match(instance_pattern(slot), str(name))
                else ""
            )
            described.append(f"{name} ({where}{own}) holds {pretty} of WAL")
        if idle_text:
            described.append(idle_text)
        drops = " ".join(f"SELECT pg_drop_replication_slot('{r[0]}');" for r in holding)
        return Check(
            "inactive slots",
            FAIL,
            "; ".join(described),
            f"if no consumer will come back for them: {drops}",
        )
    if idle:
        return Check(
            "inactive slots",
            WARN,
            idle_text,
            f"drop if unused: SELECT pg_drop_replication_slot('{idle[0]}')",
        )
    return Check("inactive slots", OK, "none")


def check_instances(conn: Conn, prefix: str) -> Check:
    """Every instance's slot, with how far behind it is and the WAL it keeps."""
    rows = _rows(
        conn,
        "SELECT slot_name, active, pg_size_pretty(pg_wal_lsn_diff(position,"
        " confirmed_flush_lsn)), pg_size_pretty(pg_wal_lsn_diff(position, restart_lsn))"
        f" FROM pg_replication_slots, (SELECT {WAL_POSITION} AS position) p"
        " WHERE slot_name ~ %s ORDER BY slot_name",
        (instance_pattern(prefix),),
    )
    if not rows:
        return Check("instances", OK, f"none running (slots {prefix}_<instance>)")
    described = [
        f"{name} ({'streaming' if active else 'idle'}, {lag} behind, keeps {kept})"
        for name, active, lag, kept in rows
    ]
    return Check("instances", OK, f"{len(rows)}: {'; '.join(described)}")


def check_standby(conn: Conn) -> Check:
    """On a standby: what keeps its logical slots from being invalidated again and again."""
    if not _value(conn, "SELECT pg_is_in_recovery()"):
        return Check("standby", OK, "not a standby (decoding on the primary)")
    if conn.info.server_version < 160000:
        return Check(
            "standby",
            FAIL,
            "logical decoding on a standby needs PostgreSQL 16 or newer",
            "point DATABASE_URL at the primary, or upgrade",
        )
    feedback = _value(conn, "SHOW hot_standby_feedback")
    slot = _value(conn, "SHOW primary_slot_name")
    problems, fixes = [], []
    if feedback != "on":
        problems.append("hot_standby_feedback is off (the primary may remove rows decoding needs)")
        fixes.append("ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf()")
    if not slot:
        problems.append("no primary_slot_name (the primary may remove WAL and catalog rows)")
        fixes.append(
            "create a physical slot on the primary and ALTER SYSTEM SET primary_slot_name here"
        )
    if problems:
        return Check(
            "standby",
            FAIL,
            "; ".join(problems) + ": the slot's conflicts would invalidate it again and again",
            "; ".join(fixes),
        )
    return Check("standby", OK, f"hot_standby_feedback on, primary_slot_name {slot}")


def check_row_security(conn: Conn, members: TableMap | None) -> Check:
    """Row security must not filter the snapshot: the stream is not filtered by it."""
    if members is None:
        return Check("row security", WARN, "not checked: the badges do not fit the database")
    hidden = members.row_security_problems()
    role = members.role
    if hidden:
        return Check(
            "row security",
            FAIL,
            f"{', '.join(hidden)} would hide rows from {role} in the snapshot, not in the stream",
            **fix_statements(f"ALTER ROLE {quote_name(role)} BYPASSRLS"),
        )
    guarded = [qualified(k) for k, m in members.members.items() if m.row_security]
    if not guarded:
        return Check("row security", OK, "off on every badge table")
    how = "bypasses it" if members.bypasses_row_security else "owns the tables"
    return Check("row security", OK, f"on for {', '.join(guarded)}; {role} {how}")


def check_ddl_signal(conn: Conn) -> Check:
    """The event triggers that show partition and rewrite DDL in the stream (optional)."""
    if _value(conn, ddl.INSTALLED_QUERY, ddl.installed_params()):
        return Check("ddl signal", OK, "event triggers show schema changes in the stream")
    return Check(
        "ddl signal",
        WARN,
        "not installed: partitions attached, detached or dropped are noticed within 5 s"
        " by a look at the catalog, and a same-type ALTER COLUMN ... USING not at all",
        "install it as a superuser (replicator migrate does, with a superuser)",
        tuple(ddl.install_statements()),
    )


def check_keep_size(conn: Conn) -> Check:
    value = str(_value(conn, "SHOW max_slot_wal_keep_size"))
    if value == "-1":
        return Check(
            "max_slot_wal_keep_size",
            WARN,
            "-1 (unlimited): a slot whose consumer stopped can fill the disk with WAL",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();"
            " (size it to the disk you can spare)",
        )
    return Check(
        "max_slot_wal_keep_size",
        OK,
        f"{value}: a slot further behind is invalidated rather than filling the disk",
    )


def run_checks(conn: Conn, *, publication: str, slot: str, specs: list[BadgeSpec]) -> list[Check]:
    """Every check, in order; a check that cannot run is a failure naming the error."""
    tables = list(dict.fromkeys((s.schema, s.table) for s in specs))
    bound: list[Badge] = []

    def badges() -> Check:
        check, found = check_badges(conn, specs)
        bound.extend(found)
        return check

    found: list[TableMap] = []

    def members() -> TableMap | None:
        if not found and bound:
            found.append(describe_sync(conn, bound, publication))
        return found[0] if found else None

    steps: list[tuple[str, Callable[[], Check]]] = [
        ("server", lambda: check_server(conn)),
        ("wal_level", lambda: check_wal_level(conn)),
        ("badges", badges),
        ("publication", lambda: check_publication(conn, publication, tables, members())),
        ("replica identity", lambda: check_replica_identity(conn, tables, members())),
        ("row security", lambda: check_row_security(conn, members())),
        *[
            (f"index {spec.name}", lambda spec=spec: check_index(conn, bound, spec))
            for spec in specs
        ],
        ("standby", lambda: check_standby(conn)),
        ("replication slots", lambda: check_slots(conn, slot)),
        ("instances", lambda: check_instances(conn, slot)),
        ("wal senders", lambda: check_senders(conn, slot)),
        ("replication role", lambda: check_role(conn)),
        ("table access", lambda: check_access(conn, tables)),
        ("inactive slots", lambda: check_inactive_slots(conn, slot)),
        ("max_slot_wal_keep_size", lambda: check_keep_size(conn)),
        ("ddl signal", lambda: check_ddl_signal(conn)),
    ]
    checks = []
    for check_name, step in steps:
        try:
            checks.append(step())
        except psycopg.Error as exc:
            checks.append(Check(check_name, FAIL, f"could not check: {one_line(exc)}"))
    return checks


def render(checks: list[Check]) -> list[str]:
    lines = []
    width = max(len(c.name) for c in checks)
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    warnings = f"{warned} warning{'s' * (warned != 1)}"
    if failed:
        lines.append(f"{failed} of {len(checks)} checks failed, {warnings}")
    else:
        lines.append(f"all {len(checks)} checks passed, {warnings}")
    return lines


def passed(checks: list[Check]) -> bool:
    """Warnings are advice: only a failed check fails the run."""
    return all(c.status != FAIL for c in checks)


def run_doctor(settings: Settings, out: TextIO = sys.stdout, *, as_sql: bool = False) -> int:
    """Print the checklist; 0 when nothing failed, 1 otherwise."""
    with database_dsn(settings, start_embedded=True) as dsn, connect(dsn) as conn:
        print(
            f"{'-- ' if as_sql else ''}checking database {conn.info.dbname}"
            f" on {conn.info.host}:{conn.info.port} as role {conn.info.user}",
            file=out,
        )
        checks = run_checks(
            conn,
            publication=settings.publication,
            slot=settings.slot,
            specs=badge_spec.load(settings.badges, schema=settings.schema),
        )
    for line in script(checks) if as_sql else render(checks):
        print(line, file=out)
    return 0 if passed(checks) else 1


def script(checks: list[Check]) -> list[str]:
    """The fixes of every check that did not pass, as one script for a DBA to review."""
    lines = ["-- replicator doctor: statements that fix what failed; review before running"]
    for check in checks:
        if check.status == OK or not check.fix:
            continue
        lines.append("")
        lines.append(f"-- {check.status} {check.name}: {check.detail}")
        if check.sql:
            lines += [statement.rstrip(";") + ";" for statement in check.sql]
        else:
            lines.append(f"-- (not SQL) {check.fix}")
    if len(lines) == 1:
        lines.append("-- nothing to fix")
    return lines
