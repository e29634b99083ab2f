"""What a database error means to the consumer: retry (the connection) or stop (with the fix)."""

from __future__ import annotations

import psycopg
from psycopg import errors

from replicator.errors import DatabaseSetupError, one_line
from replicator.pg.retry import is_connection_error

__all__ = ["explain", "is_connection_error"]


def explain(exc: psycopg.Error) -> DatabaseSetupError:
    """One line saying what the database refused and how to fix it."""
    what = one_line(exc)
    if isinstance(exc, errors.UndefinedTable):
        fix = (
            "run `replicator migrate`, or set REPLICATOR_SCHEMA to the schema that holds"
            " the badge tables"
        )
    elif isinstance(exc, errors.UndefinedColumn):
        fix = (
            "a badge table lacks a column the badge rules read; restore it (sql/ has the"
            " expected schema) and start again"
        )
    elif isinstance(exc, errors.InsufficientPrivilege):
        fix = (
            "grant the role read access to the badge tables and the REPLICATION attribute"
            " (`replicator doctor` prints the statements)"
        )
    else:
        fix = f"SQLSTATE {exc.sqlstate or '?'}; `replicator doctor` checks the set-up"
    return DatabaseSetupError(f"the database refused the badge queries: {what}; {fix}")
