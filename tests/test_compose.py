"""docker/compose.yaml: valid against the Compose specification's schema, and the topology the
README promises (a primary, a standby, two instances with identical settings, nginx in front).

No Docker engine runs here, so the file is checked, not started; what it starts is tested
elsewhere on the same parts (tests/test_instances.py: a standby made by pg_basebackup, two
instances with the same settings, docker/nginx.conf in front of them)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WHEEL = ROOT / ".venv" / "test-assets" / "docker_compose-1.29.2-py2.py3-none-any.whl"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    return found


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    if not WHEEL.exists():
        pytest.fail(f"{WHEEL} is missing: `make pytest` downloads it (pip download docker-compose)")
    with zipfile.ZipFile(WHEEL) as wheel:
        schema = json.loads(wheel.read("compose/config/compose_spec.json"))
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"primary", "standby", "migrate", "replicator-1", "replicator-2", "nginx"} <= set(
        services
    )
    one, two = services["replicator-1"], services["replicator-2"]
    assert one == two, "instances share every setting; each names its own slot"
    env = one["environment"]
    assert "@standby:" in env["DATABASE_URL"] and "@primary:" in env["REPLICATOR_PRIMARY_URL"]
    assert "REPLICATOR_SLOT" not in env and "REPLICATOR_INSTANCE" not in env
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on a service that is not there"
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    for instance in ("replicator-1:8080", "replicator-2:8080"):
        assert f"server {instance}" in nginx
    assert "proxy_buffering off;" in nginx and "proxy_read_timeout 1h;" in nginx
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["replicator-1:9090", "replicator-2:9090"]
