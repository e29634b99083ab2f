"""``replicator doctor``: the production checklist, run against a live database."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg

from replicator.config.settings import Settings
from replicator.errors import ReplicatorError, one_line
from replicator.runtime.cluster import PostgresCluster, embedded_bindir
from replicator.runtime.embedded import embedded_database

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_SERVER_VERSION = 14
TABLES = ("messages", "calls")
_REPLICA_IDENTITY = {"d": "default", "n": "nothing", "f": "full", "i": "index"}

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class Check:
    """One line of the checklist; ``fix`` says what to run when it is not ok."""

    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class BadgeIndex:
    """The partial index a badge query needs: leading key column and predicate terms."""

    badge: str
    table: str
    name: str
    columns: tuple[str, str]
    predicate: frozenset[str]
    where: str


BADGE_INDEXES = (
    BadgeIndex(
        "unread_messages",
        "messages",
        "idx_messages_read_at",
        ("recipient_id", "sender_id"),
        frozenset({"read_at is null"}),
        "read_at IS NULL",
    ),
    BadgeIndex(
        "missed_calls",
        "calls",
        "idx_calls_missed_unread",
        ("callee_id", "caller_id"),
        frozenset({"status = 'missed'", "seen_at is null"}),
        "status = 'missed' AND seen_at IS NULL",
    ),
)


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


def check_publication(conn: Conn, publication: str, schema: str) -> Check:
    names = ", ".join(f"{schema}.{t}" for t in TABLES)
    row = _rows(
        conn,
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication"
        " WHERE pubname = %s",
        (publication,),
    )
    if not row:
        return Check(
            "publication",
            FAIL,
            f"{publication} does not exist",
            f"replicator migrate, or CREATE PUBLICATION {publication} FOR TABLE {names}",
        )
    problems: list[str] = []
    fixes: list[str] = []
    ops = [
        op
        for op, on in zip(("insert", "update", "delete", "truncate"), row[0], strict=True)
        if not on
    ]
    if ops:
        problems.append(f"does not publish {', '.join(ops)}")
        fixes.append(
            f"ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
        )
    extra = ", rowfilter IS NOT NULL" if conn.info.server_version >= 150000 else ", false"
    published = {
        str(r[0]): bool(r[1])
        for r in _rows(
            conn,
            f"SELECT tablename{extra} FROM pg_publication_tables"
            " WHERE pubname = %s AND schemaname = %s",
            (publication, schema),
        )
    }
    missing = [f"{schema}.{t}" for t in TABLES if t not in published]
    if missing:
        problems.append(f"lacks {', '.join(missing)}")
        fixes.append(f"ALTER PUBLICATION {publication} ADD TABLE {', '.join(missing)}")
    filtered = [f"{schema}.{t}" for t in TABLES if published.get(t)]
    if filtered:
        problems.append(f"filters the rows of {', '.join(filtered)}")
        fixes.append(f"ALTER PUBLICATION {publication} SET TABLE {names}")
    if problems:
        return Check(
            "publication", FAIL, f"{publication} {' and '.join(problems)}", "; ".join(fixes)
        )
    return Check(
        "publication", OK, f"{publication} holds {names} (insert, update, delete, truncate)"
    )


def _tables(conn: Conn, schema: str) -> dict[str, str]:
    """Badge table -> replica identity letter, for the tables that exist."""
    return {
        str(name): str(ident)
        for name, ident in _rows(
            conn,
            "SELECT c.relname, c.relreplident FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
            (schema, list(TABLES)),
        )
    }


def check_replica_identity(conn: Conn, schema: str) -> Check:
    tables = _tables(conn, schema)
    problems: list[str] = []
    fixes: list[str] = []
    for table in TABLES:
        ident = tables.get(table)
        if ident is None:
            problems.append(f"{schema}.{table} does not exist")
            fixes.append("replicator migrate")
        elif ident != "f":
            problems.append(
                f"{schema}.{table} has replica identity {_REPLICA_IDENTITY.get(ident, ident)}"
            )
            fixes.append(f"ALTER TABLE {schema}.{table} REPLICA IDENTITY FULL")
    if problems:
        return Check("replica identity", FAIL, "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    return Check("replica identity", OK, f"full on {', '.join(f'{schema}.{t}' for t in TABLES)}")


def _predicate_terms(predicate: str) -> frozenset[str]:
    text = predicate.lower().replace("::text", "").replace("(", "").replace(")", "")
    text = re.sub(r"\s+", " ", text).strip()
    return frozenset(term.strip() for term in text.split(" and "))


def check_index(conn: Conn, schema: str, want: BadgeIndex) -> Check:
    name = f"index {want.table}"
    create = (
        f"CREATE INDEX CONCURRENTLY {want.name} ON {schema}.{want.table}"
        f" ({', '.join(want.columns)}) WHERE {want.where}"
    )
    rows = _rows(
        conn,
        "SELECT i.relname, pg_get_expr(x.indpred, x.indrelid), x.indisvalid AND x.indisready,"
        " ARRAY(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(attnum, ord)"
        "  JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum"
        "  ORDER BY k.ord)"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = %s AND t.relname = %s ORDER BY i.relname <> %s, i.relname",
        (schema, want.table, want.name),
    )
    invalid: list[str] = []
    for index, predicate, valid, columns in rows:
        if predicate is None or _predicate_terms(str(predicate)) != want.predicate:
            continue
        if not columns or columns[0] != want.columns[0]:
            continue
        if not valid:
            invalid.append(str(index))
            continue
        return Check(name, OK, f"{index} serves {want.badge}")
    if invalid:
        return Check(
            name,
            FAIL,
            f"{invalid[0]} on {schema}.{want.table} is invalid (an interrupted build)",
            f"REINDEX INDEX CONCURRENTLY {schema}.{invalid[0]}",
        )
    return Check(
        name,
        FAIL,
        f"no partial index on {schema}.{want.table} ({want.columns[0]}, ...) WHERE {want.where};"
        f" the {want.badge} snapshot scans the table",
        create,
    )


def check_slots(conn: Conn, slot: str) -> Check:
    limit, used, own = _rows(
        conn,
        "SELECT current_setting('max_replication_slots')::int,"
        " (SELECT count(*) FROM pg_replication_slots),"
        " EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
        (slot,),
    )[0]
    free = limit - used
    detail = f"{used} of {limit} used, {free} free"
    if own:
        return Check("replication slots", OK, f"{detail} ({slot} exists already)")
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
        " EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active)",
        (slot,),
    )[0]
    free = limit - active
    detail = f"{active} of {limit} active, {free} free"
    if own:
        return Check("wal senders", OK, f"{detail} (slot {slot} is streaming)")
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


def check_access(conn: Conn, schema: str) -> Check:
    tables = [f"{schema}.{t}" for t in TABLES if t in _tables(conn, schema)]
    denied = [
        table
        for table in tables
        if not _value(conn, "SELECT has_table_privilege(%s, 'SELECT')", (table,))
    ]
    role = _value(conn, "SELECT current_user")
    if denied:
        return Check(
            "table access",
            FAIL,
            f"{role} cannot read {', '.join(denied)} (the start-up snapshot reads them)",
            f'GRANT SELECT ON {", ".join(denied)} TO "{role}"',
        )
    if not tables:
        return Check(
            "table access", FAIL, f"no badge tables in schema {schema}", "replicator migrate"
        )
    return Check("table access", OK, f"{role} can read {', '.join(tables)}")


def check_inactive_slots(conn: Conn, slot: str) -> Check:
    rows = _rows(
        conn,
        "SELECT slot_name, slot_type, database, retained, pg_size_pretty(retained) FROM ("
        " SELECT slot_name, slot_type, database, pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery()"
        "  THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn) AS retained"
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
            own = ", the service's own from a stopped run" if name == slot else ""
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


def run_checks(conn: Conn, *, publication: str, schema: str, slot: str) -> list[Check]:
    """Every check, in order; a check that cannot run is a failure naming the error."""
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("server", lambda: check_server(conn)),
        ("wal_level", lambda: check_wal_level(conn)),
        ("publication", lambda: check_publication(conn, publication, schema)),
        ("replica identity", lambda: check_replica_identity(conn, schema)),
        *[
            (f"index {want.table}", lambda want=want: check_index(conn, schema, want))
            for want in BADGE_INDEXES
        ],
        ("replication slots", lambda: check_slots(conn, slot)),
        ("wal senders", lambda: check_senders(conn, slot)),
        ("replication role", lambda: check_role(conn)),
        ("table access", lambda: check_access(conn, schema)),
        ("inactive slots", lambda: check_inactive_slots(conn, slot)),
        ("max_slot_wal_keep_size", lambda: check_keep_size(conn)),
    ]
    checks = []
    for name, step in steps:
        try:
            checks.append(step())
        except psycopg.Error as exc:
            checks.append(Check(name, FAIL, f"could not check: {one_line(exc)}"))
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


def run_doctor(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Print the checklist; 0 when nothing failed, 1 otherwise."""
    with database_dsn(settings, start_embedded=True) as dsn, connect(dsn) as conn:
        print(
            f"checking database {conn.info.dbname} on {conn.info.host}:{conn.info.port}"
            f" as role {conn.info.user}",
            file=out,
        )
        checks = run_checks(
            conn, publication=settings.publication, schema=settings.schema, slot=settings.slot
        )
    for line in render(checks):
        print(line, file=out)
    return 0 if passed(checks) else 1
