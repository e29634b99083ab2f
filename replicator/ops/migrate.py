"""Versioned, idempotent schema migrations, recorded in ``replicator_migrations``.

They ship inside the package (``replicator/ops/migrations``, in a checkout a link to the
top-level ``sql/``, which stays the place to read them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg

from replicator.errors import ReplicatorError
from replicator.pg import ddl

logger = logging.getLogger(__name__)

SQL_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x7265706C  # "repl": one migrator at a time


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    """The migrations in order; none at all means a broken installation, never "current"."""
    files = sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise ReplicatorError(
            f"no migrations found in {sql_dir}: this installation of replicator is incomplete;"
            " reinstall it (pip install replicator)"
        )
    return files


def migrate(dsn: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not yet recorded; return the versions applied now."""
    applied_now: list[str] = []
    files = migration_files(sql_dir)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS replicator_migrations ("
                " version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {str(r[0]) for r in conn.execute("SELECT version FROM replicator_migrations")}
            for path in files:
                version = path.stem
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text().encode())
                    conn.execute(
                        "INSERT INTO replicator_migrations (version) VALUES (%s)", (version,)
                    )
                logger.info("applied migration %s", version)
                applied_now.append(version)
            install_ddl_signal(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def install_ddl_signal(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Install (or refresh) the DDL signal's event triggers, if the role may; see
    ``replicator.pg.ddl``. Without them the service looks at the catalog at an interval."""
    try:
        with conn.transaction():
            for statement in ddl.install_statements():
                conn.execute(statement.encode())
    except psycopg.errors.InsufficientPrivilege:
        logger.info(
            "the DDL signal (event triggers) was not installed: it needs a superuser;"
            " `replicator doctor --sql` prints its statements"
        )
        return False
    return True
