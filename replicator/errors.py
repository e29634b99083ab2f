"""The one exception hierarchy of replicator.

::

    ReplicatorError
    ├── ConfigError          a setting has a bad value (names the variable and the value)
    │   ├── BadgeFileError   a badges file that cannot be used (names file, badge and key)
    │   └── PredicateError   a badge's where outside the grammar or its columns' types
    ├── AuthError            a request's token is missing or not acceptable (safe to show)
    ├── BadRequest           a request's parameters or body cannot be used (safe to show)
    ├── UnusableKey          a key that cannot verify tokens (a short RSA key, an odd curve)
    ├── JwksUnavailable      one JWKS fetch failed (logged; the keys already known stay)
    ├── DatabaseSetupError   the database is not set up for replication (publication, slot...)
    │   └── SlotInUseError   another process streams from our slot
    ├── ProtocolError        undecodable bytes from the server (names the byte and the LSN)
    ├── SchemaError          a badge table or column is missing, or changed under the stream
    ├── ReplicationLost      the replication connection broke; the caller may reconnect
    ├── StartAfresh          the stream cannot be followed past here; take a new snapshot
    │   └── SlotMissing      our slot is gone, invalidated, or not ours any more
    ├── NeedsCatalog         a change names a relation or DDL the stream alone cannot place;
    │                        the consumer looks it up in the catalog and feeds it again
    └── StartupError         ``serve`` could not start streaming (exit code 1)
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base of every error replicator raises on purpose."""


class ConfigError(ReplicatorError):
    """A configuration value is wrong; the message names the variable and the value."""


class BadgeFileError(ConfigError):
    """A badges file that cannot be used; the message names the file, the badge and the key."""


class PredicateError(ConfigError):
    """A ``where`` that is not in the grammar, or does not fit its columns' types."""


class AuthError(ReplicatorError):
    """A request's credentials are missing or not acceptable; the message is safe to show."""


class BadRequest(ReplicatorError):
    """A request's parameters or body cannot be used; the message says which and why."""


class UnusableKey(ReplicatorError):
    """A key that cannot verify tokens; the message says what it is."""


class JwksUnavailable(ReplicatorError):
    """A JWKS fetch gave no usable key set; the message says why."""


class DatabaseSetupError(ReplicatorError):
    """The database is not set up for replication the way replicator needs."""


class SlotInUseError(DatabaseSetupError):
    """The replication slot is active on another connection."""


class ProtocolError(ReplicatorError):
    """The replication stream holds bytes that cannot be decoded."""


class SchemaError(ReplicatorError):
    """A badge table's columns no longer allow exact counts."""


class ReplicationLost(ReplicatorError):
    """The replication connection is gone; resuming from the last applied LSN is safe."""


class StartAfresh(ReplicatorError):
    """What follows in the stream cannot be applied to the state (a partition truncated,
    detached or dropped, a table rewritten): the state must be counted afresh."""


class SlotMissing(StartAfresh):
    """Our slot disappeared, was invalidated, or was recreated by someone else."""


class NeedsCatalog(ReplicatorError):
    """A message the stream alone cannot place: a relation never seen (a new partition?) or
    a DDL signal. The feed attaches the message (``payload``, ``lsn``) so that the consumer
    can look the relation up and feed it again; ``again`` says whether it must."""

    def __init__(self, message: str, *, relation: object = None, oids: tuple[int, ...] = ()):
        super().__init__(message)
        self.relation = relation
        self.oids = oids
        self.payload: bytes = b""
        self.lsn = 0
        self.again = relation is not None


class StartupError(ReplicatorError):
    """``serve`` stopped before it ever streamed; the message says why and how to fix it."""


def one_line(exc: BaseException) -> str:
    """The first meaningful line of an error (driver errors span several), for logs."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
