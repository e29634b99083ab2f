"""REPLICATOR_ADMIN_ADDRESS and REPLICATOR_METRICS_TOKEN: where /metrics and /readyz answer."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx

from tests.conftest import Database
from tests.service_support import SECRET, running_service

TOKEN = "scrape-token-0123456789"


def test_metrics_and_detailed_readiness_moved_to_the_admin_listener(database: Database) -> None:
    with running_service(
        database.dsn,
        database.slot,
        env={"REPLICATOR_ADMIN_ADDRESS": "127.0.0.1:0", "REPLICATOR_METRICS_TOKEN": TOKEN},
    ) as service:
        match = re.search(
            r"admin listener \(/metrics, /readyz\) on (http://[\d.]+:\d+)", service.log
        )
        assert match, service.log
        admin = match.group(1)
        with httpx.Client(timeout=10) as client:
            # the public address: no /metrics, and readiness as one word
            assert client.get(service.url + "/metrics").status_code == 404
            public = client.get(service.url + "/readyz")
            assert public.status_code == 200 and public.json() == {"status": "ready"}
            assert client.get(service.url + "/healthz").status_code == 200
            # the admin address: the details, and /metrics behind the token
            detailed = client.get(admin + "/readyz").json()
            assert detailed["status"] == "ready" and "applied_lsn" in detailed
            assert client.get(admin + "/metrics").status_code == 401
            wrong = client.get(admin + "/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
            right = client.get(admin + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code == 200 and "replicator_replication_live 1.0" in right.text
            # badge routes are not on the admin address
            assert client.get(admin + "/v1/badges").status_code == 404


def test_metrics_token_on_the_main_address(database: Database) -> None:
    with running_service(
        database.dsn, database.slot, env={"REPLICATOR_METRICS_TOKEN": TOKEN}
    ) as service:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            assert client.get("/metrics").status_code == 401
            ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
            # not moved: /readyz keeps its details
            assert "applied_lsn" in client.get("/readyz").json()


def test_a_bad_admin_address_is_one_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "replicator", "serve"],
        env={
            "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
            "REPLICATOR_JWT_SECRET": SECRET,
            "REPLICATOR_ADMIN_ADDRESS": "localhost",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "replicator: REPLICATOR_ADMIN_ADDRESS='localhost' is not host:port;"
        " use for example 127.0.0.1:9090"
    )
