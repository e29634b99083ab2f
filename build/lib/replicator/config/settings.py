"""Settings, built once from environment variables and command-line options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from replicator.errors import ConfigError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DECODERS = ("pgoutput", "wal2json")


@dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str = "authenticated"
    slot: str = "replicator"
    publication: str = "badges"
    schema: str = "public"
    decoder: str = "pgoutput"
    data_dir: Path = Path(".replicator")
    max_streams_per_user: int = 10
    max_streams: int = 20_000
    heartbeat_s: float = 15.0
    send_timeout_s: float = 30.0
    demo_traffic: bool | None = None
    log_level: str = "INFO"

    @property
    def embedded(self) -> bool:
        return not self.database_url


#: setting -> (environment variable, parser)
ENV: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "host": "REPLICATOR_HOST",
    "port": "REPLICATOR_PORT",
    "jwt_secret": "REPLICATOR_JWT_SECRET",
    "jwt_public_key": "REPLICATOR_JWT_PUBLIC_KEY",
    "jwt_audience": "REPLICATOR_JWT_AUDIENCE",
    "slot": "REPLICATOR_SLOT",
    "publication": "REPLICATOR_PUBLICATION",
    "schema": "REPLICATOR_SCHEMA",
    "decoder": "REPLICATOR_DECODER",
    "data_dir": "REPLICATOR_DATA_DIR",
    "max_streams_per_user": "REPLICATOR_MAX_STREAMS_PER_USER",
    "max_streams": "REPLICATOR_MAX_STREAMS",
    "heartbeat_s": "REPLICATOR_HEARTBEAT_S",
    "send_timeout_s": "REPLICATOR_SEND_TIMEOUT_S",
    "demo_traffic": "REPLICATOR_DEMO_TRAFFIC",
    "log_level": "REPLICATOR_LOG_LEVEL",
}


def _bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean; use true or false")


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={text!r} is out of range {low}..{high}")
    return value


def _float(name: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={text!r} is out of range {low}..{high}")
    return value


def _parse(key: str, text: str) -> Any:
    name = ENV[key]
    if key == "port":
        return _int(name, text, 0, 65535)
    if key in ("max_streams_per_user", "max_streams"):
        return _int(name, text, 1, 1_000_000)
    if key == "heartbeat_s":
        return _float(name, text, 0.05, 300)
    if key == "send_timeout_s":
        return _float(name, text, 0.1, 3600)
    if key == "demo_traffic":
        return _bool(name, text)
    if key == "data_dir":
        return Path(text).expanduser()
    if key in ("slot", "publication", "schema"):
        if not _IDENTIFIER.match(text):
            raise ConfigError(
                f"{name}={text!r} is not a valid name; use lowercase letters, digits and _"
                " (at most 63)"
            )
        return text
    if key == "decoder":
        if text not in DECODERS:
            raise ConfigError(f"{name}={text!r} is not a decoder; use pgoutput or wal2json")
        return text
    if key == "log_level":
        level = text.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{name}={text!r} is not a log level; use debug, info or warning")
        return level
    if key == "database_url":
        if text and not (text.startswith(("postgresql://", "postgres://")) or "=" in text):
            raise ConfigError(
                f"{name}={text!r} is not a PostgreSQL URL; use postgresql://user@host:port/db"
            )
        return text or None
    if key == "host" and not text:
        raise ConfigError(f"{name}={text!r} is empty")
    return text


def load_settings(
    env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
) -> Settings:
    """Settings from ``env``, with command-line ``overrides`` (raw text) taking precedence."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}
    for key, var in ENV.items():
        text = env.get(var)
        if overrides and overrides.get(key) is not None:
            text = overrides[key]
        if text is not None and key in known:
            values[key] = _parse(key, text)
    return Settings(**values)


def require_jwt_key(settings: Settings) -> None:
    """Outside the embedded default, tokens need a key to be checked against."""
    if not settings.embedded and not settings.jwt_secret and not settings.jwt_public_key:
        raise ConfigError(
            "REPLICATOR_JWT_SECRET is not set; it is required with DATABASE_URL"
            " (use the HS256 secret your auth server signs tokens with)"
        )
