"""The one exception hierarchy of replicator.

::

    ReplicatorError
    ├── ConfigError          a setting has a bad value (names the variable and the value)
    ├── DatabaseSetupError   the database is not set up for replication (publication, slot...)
    │   └── SlotInUseError   another process streams from our slot
    ├── ProtocolError        undecodable bytes from the server (names the byte and the LSN)
    ├── SchemaError          a badge table lost a column the badge rules need
    ├── ReplicationLost      the replication connection broke; the caller may reconnect
    └── StartupError         ``serve`` could not start streaming (exit code 1)
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base of every error replicator raises on purpose."""


class ConfigError(ReplicatorError):
    """A configuration value is wrong; the message names the variable and the value."""


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


class StartupError(ReplicatorError):
    """``serve`` stopped before it ever streamed; the message says why and how to fix it."""


def one_line(exc: BaseException) -> str:
    """The first meaningful line of an error (driver errors span several), for logs."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
