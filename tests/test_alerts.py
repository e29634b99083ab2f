"""The alert rules and the dashboard in docker/: valid, tested, and about metrics we export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import psycopg
import pytest

from replicator.runtime.monitor import SlotMonitor, open_pool
from tests.conftest import Database
from tests.service_support import running_service

DOCKER = Path(__file__).resolve().parents[1] / "docker"
RULES = DOCKER / "alerts.yml"
RULE_TESTS = DOCKER / "alerts.test.yml"
DASHBOARD = DOCKER / "grafana-dashboard.json"
#: series Prometheus makes itself rather than scraping
SYNTHETIC = {"up"}
_METRIC = re.compile(r"\b((?:replicator|process)_[a-z0-9_]+|up)\b")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus")
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def rule_exprs() -> list[str]:
    return re.findall(r"^\s+expr: (.+)$", RULES.read_text(), flags=re.MULTILINE)


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_rules_are_valid_and_each_alert_is_tested() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    with_tests = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts and alerts == with_tests, alerts ^ with_tests
    expected = set(re.findall(r"exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text()))
    assert expected, "some test must expect an alert to fire"


def test_a_real_scrape_passes_promtool_and_has_every_metric_used(database: Database) -> None:
    with running_service(database.dsn, database.slot) as service:
        with psycopg.connect(database.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO messages (sender_id, recipient_id)"
                " VALUES (gen_random_uuid(), gen_random_uuid())"
            )
        scrape = httpx.get(service.url + "/metrics", timeout=10).text
    linted = promtool("check", "metrics", stdin=scrape)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in scrape.splitlines()
        if line and not line.startswith("#")
    }
    used = {name for expr in rule_exprs() + dashboard_exprs() for name in _METRIC.findall(expr)}
    assert used - SYNTHETIC, "the rules and the dashboard should use our metrics"
    missing = used - SYNTHETIC - exported
    assert not missing, f"used by docker/ but not exported: {sorted(missing)}"
    assert "replicator_slot_checks_failed_total 0.0" in scrape


@pytest.mark.anyio
async def test_wal_retained_by_the_slot(database: Database) -> None:
    """The periodic query reports at least the WAL written since the slot was created."""
    slot = database.slot + "_held"
    async with await psycopg.AsyncConnection.connect(database.dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        await conn.execute(
            "INSERT INTO messages (sender_id, recipient_id)"
            " SELECT gen_random_uuid(), gen_random_uuid() FROM generate_series(1, 2000)"
        )
        cur = await conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = await cur.fetchone()
        assert row is not None
        at_least = int(row[0])  # type: ignore[call-overload]
        pool = open_pool(database.dsn)
        await pool.open()
        try:
            monitor = SlotMonitor(pool, slot)
            await monitor.check()
            absent = SlotMonitor(pool, slot + "_none")
            await absent.check()
        finally:
            await pool.close()
    assert at_least > 100_000  # 2,000 rows of WAL
    assert monitor.retained_bytes >= at_least and monitor.failures == 0
    assert absent.retained_bytes == 0 and absent.failures == 0
