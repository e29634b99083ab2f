"""A plain (non-editable) install of the package can migrate, serve, doctor and verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Database, Server, drop_database
from tests.service_support import SECRET, running_service
from tests.support import slot_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv holding only the wheel built from this tree; its dependencies come
    from the test run's own environment (a path line, so nothing of ours comes along)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".replicator", "*cache*", "build", "*.egg-info", "tests", "benchmarks"
        ),
    )
    run = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*run, "wheel", "-q", "--no-deps", str(source), "-w", str(root / "dist")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next((root / "dist").glob("replicator-*.whl"))
    python = venv / "bin" / "python"
    subprocess.run(
        [*run, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    yield venv


def command(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(venv / "bin" / "replicator"), *args],
        env={**environ, **env},
        cwd=venv,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def empty_database(pg_server: Server) -> Iterator[Database]:
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    db = Database(pg_server, name, pg_server.dsn(name), slot=f"s_{name}")
    yield db
    drop_database(db)


def test_the_wheel_migrates_serves_doctors_and_verifies(
    installed: Path, empty_database: Database
) -> None:
    db = empty_database
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import replicator; print(replicator.__file__)"],
        cwd=installed,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed), where

    migrated = command(installed, "migrate", DATABASE_URL=db.dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == ("applied 001_schema, 002_badge_indexes, 003_replication")
    doctor = command(installed, "doctor", DATABASE_URL=db.dsn, **slot_env(db.slot))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr

    with running_service(db.dsn, db.slot, command=[str(installed / "bin" / "replicator")]) as svc:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO messages (sender_id, recipient_id)"
                " VALUES (gen_random_uuid(), gen_random_uuid())"
            )
        verified = command(
            installed,
            "verify",
            "--url",
            svc.url,
            DATABASE_URL=db.dsn,
            REPLICATOR_JWT_SECRET=SECRET,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_missing_migrations_are_an_error_not_current(
    installed: Path, empty_database: Database, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(installed, broken, symlinks=True)
    site = next(broken.glob("lib/python*/site-packages"))
    shutil.rmtree(site / "replicator" / "ops" / "migrations")
    # the copy's scripts point at the original interpreter path: run the module instead
    run = subprocess.run(
        [str(broken / "bin" / "python"), "-m", "replicator", "migrate"],
        env={"DATABASE_URL": empty_database.dsn, "PATH": "/usr/bin:/bin"},
        cwd=broken,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout == ""
    assert run.stderr.strip().startswith("replicator: no migrations found in ")
    assert "reinstall" in run.stderr
    with psycopg.connect(empty_database.dsn) as conn:
        row = conn.execute("SELECT to_regclass('messages')").fetchone()
        assert row == (None,)
