"""Migrations and the embedded default, end to end through the command line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from replicator.ops.demo import DEMO_USER
from replicator.ops.migrate import migrate
from replicator.runtime.cluster import PostgresCluster, embedded_bindir
from tests.conftest import Database


def test_migrate_twice_changes_nothing(database: Database) -> None:
    # the fixture migrated already
    assert migrate(database.dsn) == []
    with psycopg.connect(database.dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM replicator_migrations")]
        assert versions == sorted(versions) and len(versions) >= 3
        ident = conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relname IN ('messages', 'calls')"
        ).fetchall()
        assert sorted(ident) == [("calls", "f"), ("messages", "f")]
        tables = conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = 'badges'"
        ).fetchall()
        assert sorted(t[0] for t in tables) == ["calls", "messages"]
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE indexname IN"
            " ('idx_messages_read_at', 'idx_calls_missed_unread')"
        ).fetchall()
        assert len(indexes) == 2


def test_migrate_command(database: Database) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "migrate"],
        env={"DATABASE_URL": database.dsn, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to apply" in result.stdout


class Serve:
    """``replicator serve`` on the embedded default, in a data directory of the test's."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "replicator",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                "--demo-traffic",
                "false",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.proc.kill()
            raise AssertionError("no demo URL printed:\n" + "\n".join(self.lines))
        text = "\n".join(self.lines)
        match = re.search(r"demo page:\s+(http://[\d.:]+)/#access_token=(\S+)", text)
        assert match, text
        self.url, self.token = match.group(1), match.group(2)
        match = re.search(r"psql:\s+psql (\S+)", text)
        assert match, text
        self.dsn = match.group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "listening on" in line:
                self.ready.set()
        self.ready.set()

    def badges(self) -> dict[str, object]:
        deadline = time.monotonic() + 60
        while True:
            ready = httpx.get(self.url + "/readyz", timeout=10)
            if ready.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        response = httpx.get(
            self.url + "/v1/badges", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.mark.slow
def serve_once(data_dir: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``serve`` on the embedded server in ``data_dir``, expected to exit by itself."""
    command = [sys.executable, "-m", "replicator", "serve", "--port", "0"]
    return subprocess.run(
        [*command, "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=timeout
    )


def test_embedded_default_starts_seeds_and_persists(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Serve(data_dir)
    try:
        badges = first.badges()
        assert badges["user_id"] == DEMO_USER
        # the embedded default serves the demo page (REPLICATOR_DEMO defaults to on here)
        page = httpx.get(first.url + "/", timeout=10)
        assert (
            page.status_code == 200
            and "frame-ancestors 'none'" in page.headers["content-security-policy"]
        )
        seeded = badges["total_unread_messages"]
        assert isinstance(seeded, int) and seeded > 0
        with psycopg.connect(first.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO messages (sender_id, recipient_id) VALUES (gen_random_uuid(), %s)",
                (DEMO_USER,),
            )
        deadline = time.monotonic() + 30
        while first.badges()["total_unread_messages"] != seeded + 1:
            assert time.monotonic() < deadline, "insert never counted"
            time.sleep(0.1)
        # other commands on the same data directory leave the running service's server alone
        for command in (["migrate"], ["token", DEMO_USER]):
            result = subprocess.run(
                [sys.executable, "-m", "replicator", *command, "--data-dir", str(data_dir)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        assert first.badges()["total_unread_messages"] == seeded + 1
        # and a second service on it is refused with one line
        second_try = serve_once(data_dir, timeout=60)
        assert second_try.returncode == 2
        assert "is in use by another replicator serve" in second_try.stderr
        assert first.badges()["total_unread_messages"] == seeded + 1
    finally:
        assert first.stop() == 0
    cluster = PostgresCluster(embedded_bindir(), data_dir / "pgdata")
    assert not cluster.is_running(), "the embedded server must stop with the service"
    assert (data_dir / "jwt-secret").exists()

    second = Serve(data_dir)
    try:
        # same secret, so the first run's token still works; same data, so the count persists
        second.token = first.token
        assert second.badges()["total_unread_messages"] == seeded + 1
    finally:
        assert second.stop() == 0
    assert not cluster.is_running()

    # A badge column renamed while the service was stopped: the next start exits with one
    # line and code 1, and stops the server it started.
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("ALTER TABLE calls RENAME COLUMN seen_at TO seen")
        cluster.stop()
        failed = serve_once(data_dir, timeout=120)
        assert failed.returncode == 1, failed.stderr
        assert "Traceback" not in failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last == (
            "replicator: badge 'missed_calls': table public.calls has no column 'seen_at';"
            " add it, or fix the badges file"
        ), last
        assert not cluster.is_running(), "the embedded server must stop with the service"
    finally:
        cluster.remove()
