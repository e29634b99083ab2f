"""What a database error means to the consumer: retry (the connection) or stop (with the fix)."""

from __future__ import annotations

import psycopg
from psycopg import errors

from replicator.errors import DatabaseSetupError, one_line

#: server errors that say "try again later" rather than "this cannot work"
_TRANSIENT = frozenset(("57P01", "57P02", "57P03", "53300", "53400", "40001", "40P01"))


def is_connection_error(exc: psycopg.Error) -> bool:
    """A lost or refused connection (retry), as opposed to an error in what we asked."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _TRANSIENT


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
