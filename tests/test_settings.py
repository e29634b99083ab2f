"""Configuration: a bad value stops start-up with one line naming the variable and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from replicator.config.settings import load_settings, require_jwt_key
from replicator.errors import ConfigError

BAD = [
    ("REPLICATOR_PORT", "eighty"),
    ("REPLICATOR_PORT", "70000"),
    ("REPLICATOR_SLOT", "Bad-Slot"),
    ("REPLICATOR_PUBLICATION", "x" * 70),
    ("REPLICATOR_DECODER", "test_decoding"),
    ("REPLICATOR_MAX_STREAMS_PER_USER", "0"),
    ("REPLICATOR_HEARTBEAT_S", "-1"),
    ("REPLICATOR_DEMO_TRAFFIC", "maybe"),
    ("DATABASE_URL", "mysql://localhost/db"),
]


@pytest.mark.parametrize(("variable", "value"), BAD)
def test_bad_values_name_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value})
    message = str(info.value)
    assert variable in message and repr(value) in message
    assert "\n" not in message


def test_defaults_follow_the_contract() -> None:
    settings = load_settings({})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.slot == "replicator"
    assert settings.publication == "badges"
    assert settings.decoder == "pgoutput"
    assert settings.data_dir == Path(".replicator")
    assert settings.embedded
    assert settings.max_streams_per_user == 10


def test_flags_override_environment() -> None:
    settings = load_settings({"REPLICATOR_PORT": "9000"}, {"port": "9001"})
    assert settings.port == 9001


def test_secret_required_with_a_database_url() -> None:
    settings = load_settings({"DATABASE_URL": "postgresql://u@h/db"})
    with pytest.raises(ConfigError, match="REPLICATOR_JWT_SECRET"):
        require_jwt_key(settings)


def test_cli_exits_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "serve", "--port", "http"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["replicator: REPLICATOR_PORT='http' is not an integer"]


@pytest.mark.parametrize("command", ["serve", "migrate", "doctor", "verify", "token"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replicator", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "usage: replicator " + command in result.stdout
