"""Configuration: a bad value stops start-up with one line naming the variable and the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.config.settings import (
    anonymous_limit,
    load_settings,
    require_jwt_key,
    reserved_limit,
)
from replicator.errors import ConfigError

BAD = [
    ("REPLICATOR_PORT", "eighty"),
    ("REPLICATOR_PORT", "70000"),
    ("REPLICATOR_SLOT", "Bad-Slot"),
    ("REPLICATOR_PUBLICATION", "x" * 70),
    ("REPLICATOR_DECODER", "test_decoding"),
    ("REPLICATOR_MAX_STREAMS_PER_USER", "0"),
    ("REPLICATOR_HEARTBEAT_S", "-1"),
    ("REPLICATOR_LINGER_MS", "500"),
    ("REPLICATOR_RECONNECT_RATE", "0"),
    ("REPLICATOR_DEMO_TRAFFIC", "maybe"),
    ("REPLICATOR_DEMO", "sometimes"),
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
    # the demo page and its routes: with the embedded database, or when asked for
    assert settings.demo_enabled
    assert not load_settings({"DATABASE_URL": "postgresql://u@h/db"}).demo_enabled
    url_and_demo = {"DATABASE_URL": "postgresql://u@h/db", "REPLICATOR_DEMO": "true"}
    assert load_settings(url_and_demo).demo_enabled
    assert not load_settings({"REPLICATOR_DEMO": "false"}).demo_enabled


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


SECRETS = [
    ("short", "too-short-secret", "is 16 bytes; an HS256 secret needs at least 32"),
    (
        "compose placeholder",
        "change-me-to-your-supabase-jwt-secret",
        "is a placeholder that anyone can sign tokens with",
    ),
    (
        "Supabase CLI default",
        "super-secret-jwt-token-with-at-least-32-characters-long",
        "is a placeholder",
    ),
    (
        "PEM key",
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----",
        "holds a PEM key, not an HS256 secret",
    ),
    ("JWK", '{"kty":"EC","crv":"P-256"}', "holds a JSON key, not an HS256 secret"),
]


@pytest.mark.parametrize(("case", "secret", "message"), SECRETS, ids=[c[0] for c in SECRETS])
def test_weak_or_misplaced_secrets_are_refused(case: str, secret: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"REPLICATOR_JWT_SECRET": secret})
    text = str(info.value)
    assert text.startswith("REPLICATOR_JWT_SECRET") and message in text and "\n" not in text
    if case in ("short", "PEM key", "JWK"):
        assert secret not in text  # a real secret is never echoed


def test_a_real_secret_and_an_empty_one_are_accepted() -> None:
    assert load_settings({"REPLICATOR_JWT_SECRET": "x8Yt2-" * 6}).jwt_secret == "x8Yt2-" * 6
    assert load_settings({"REPLICATOR_JWT_SECRET": ""}).jwt_secret is None


def test_a_jwks_or_public_key_replaces_the_secret() -> None:
    url = "postgresql://u@h/db"
    for extra in (
        {"REPLICATOR_JWKS_URL": "https://example.auth0.com/.well-known/jwks.json"},
        {"REPLICATOR_JWT_PUBLIC_KEY": "/etc/replicator/key.pem"},
    ):
        require_jwt_key(load_settings({"DATABASE_URL": url, **extra}))


ACCESS_BAD = [
    ("REPLICATOR_JWKS_URL", "ftp://idp/jwks", "is not an http(s) URL"),
    ("REPLICATOR_CORS_ORIGINS", "https://app.example.com/path", "is not an origin"),
    ("REPLICATOR_CORS_ORIGINS", "app.example.com", "is not an origin"),
    ("REPLICATOR_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local", "is not an IP address"),
    ("REPLICATOR_MAX_STREAMS_PER_ADDRESS", "0", "is out of range"),
    ("REPLICATOR_JWT_USER_CLAIM", " ", "is not a claim name"),
    ("REPLICATOR_JWKS_REFRESH_S", "1", "is out of range"),
]


@pytest.mark.parametrize(("variable", "value", "message"), ACCESS_BAD)
def test_bad_access_settings(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value})
    text = str(info.value)
    assert text.startswith(variable) and message in text and "\n" not in text
    assert value.split(",")[-1].strip() in text


def test_access_settings_are_parsed() -> None:
    settings = load_settings(
        {
            "REPLICATOR_CORS_ORIGINS": "https://App.Example.com/, http://localhost:5173, *",
            "REPLICATOR_TRUSTED_PROXIES": "10.0.0.1, 192.168.0.0/16, ::1",
            "REPLICATOR_JWT_ISSUER": "https://ref.supabase.co/auth/v1,supabase",
            "REPLICATOR_MAX_STREAMS": "1000",
        }
    )
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:5173", "*")
    assert settings.trusted_proxies == ("10.0.0.1/32", "192.168.0.0/16", "::1/128")
    assert settings.jwt_issuer == ("https://ref.supabase.co/auth/v1", "supabase")
    assert (anonymous_limit(settings), reserved_limit(settings)) == (100, 50)
    with pytest.raises(ConfigError, match="REPLICATOR_RESERVED_STREAMS=1000 leaves no room"):
        require_jwt_key(
            load_settings({"REPLICATOR_MAX_STREAMS": "1000", "REPLICATOR_RESERVED_STREAMS": "1000"})
        )


def test_placeholder_secret_stops_serve_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            "PATH": os.environ["PATH"],
            "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
            "REPLICATOR_JWT_SECRET": "change-me-to-your-supabase-jwt-secret",
        },
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "replicator: REPLICATOR_JWT_SECRET='change-me-to-your-supabase-jwt-secret' is a"
        " placeholder that anyone can sign tokens with; set the secret your auth server signs"
        " with (Supabase: the project's JWT secret)"
    ]
