"""Which database errors are worth retrying: a lost or refused connection, not a refusal."""

from __future__ import annotations

import psycopg

#: server errors that say "try again later" rather than "this cannot work"
_TRANSIENT = frozenset(("57P01", "57P02", "57P03", "53300", "53400", "40001", "40P01"))


def is_connection_error(exc: psycopg.Error) -> bool:
    """A lost or refused connection (retry), as opposed to an error in what we asked."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _TRANSIENT
