"""Settings, built once from environment variables and command-line options."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    badges: Path | None = None
    max_streams_per_user: int = 10
    max_streams: int = 20_000
    heartbeat_s: float = 15.0
    send_timeout_s: float = 30.0
    #: how long changes arriving close together may wait to be read together
    linger_ms: float = 5.0
    #: streams per second one instance takes back after a restart (paces the reconnects)
    reconnect_rate: float = 2000.0
    demo_traffic: bool | None = None
    log_level: str = "INFO"
    jwks_url: str | None = None
    jwks_refresh_s: float = 300.0
    jwt_issuer: tuple[str, ...] = ()
    jwt_user_claim: str = "sub"
    admin_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    max_streams_per_address: int = 200
    #: None: a tenth of max_streams
    max_anonymous_streams: int | None = None
    #: None: a twentieth of max_streams
    reserved_streams: int | None = None
    header_timeout_s: float = 10.0
    admin_address: tuple[str, int] | None = None
    metrics_token: str | None = None
    #: this instance's part of its slot name (None: derived from the host name and the port)
    instance: str | None = None
    slot_grace_s: float = 300.0
    primary_url: str | None = None
    #: None: on with the embedded database only
    demo: bool | None = None

    @property
    def embedded(self) -> bool:
        return not self.database_url

    @property
    def demo_enabled(self) -> bool:
        """Whether the demo page and its routes (which write demo rows) are served."""
        return self.demo if self.demo is not None else self.embedded


#: setting -> (environment variable, parser)
ENV: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "host": "REPLICATOR_HOST",
    "port": "REPLICATOR_PORT",
    "jwt_secret": "REPLICATOR_JWT_SECRET",
    "jwt_public_key": "REPLICATOR_JWT_PUBLIC_KEY",
    "jwt_audience": "REPLICATOR_JWT_AUDIENCE",
    "slot": "REPLICATOR_SLOT",
    "instance": "REPLICATOR_INSTANCE",
    "slot_grace_s": "REPLICATOR_SLOT_GRACE_S",
    "primary_url": "REPLICATOR_PRIMARY_URL",
    "publication": "REPLICATOR_PUBLICATION",
    "schema": "REPLICATOR_SCHEMA",
    "decoder": "REPLICATOR_DECODER",
    "data_dir": "REPLICATOR_DATA_DIR",
    "badges": "REPLICATOR_BADGES",
    "max_streams_per_user": "REPLICATOR_MAX_STREAMS_PER_USER",
    "max_streams": "REPLICATOR_MAX_STREAMS",
    "heartbeat_s": "REPLICATOR_HEARTBEAT_S",
    "send_timeout_s": "REPLICATOR_SEND_TIMEOUT_S",
    "linger_ms": "REPLICATOR_LINGER_MS",
    "reconnect_rate": "REPLICATOR_RECONNECT_RATE",
    "demo_traffic": "REPLICATOR_DEMO_TRAFFIC",
    "log_level": "REPLICATOR_LOG_LEVEL",
    "jwks_url": "REPLICATOR_JWKS_URL",
    "jwks_refresh_s": "REPLICATOR_JWKS_REFRESH_S",
    "jwt_issuer": "REPLICATOR_JWT_ISSUER",
    "jwt_user_claim": "REPLICATOR_JWT_USER_CLAIM",
    "admin_token": "REPLICATOR_ADMIN_TOKEN",
    "cors_origins": "REPLICATOR_CORS_ORIGINS",
    "trusted_proxies": "REPLICATOR_TRUSTED_PROXIES",
    "max_streams_per_address": "REPLICATOR_MAX_STREAMS_PER_ADDRESS",
    "max_anonymous_streams": "REPLICATOR_MAX_ANONYMOUS_STREAMS",
    "reserved_streams": "REPLICATOR_RESERVED_STREAMS",
    "header_timeout_s": "REPLICATOR_HEADER_TIMEOUT_S",
    "admin_address": "REPLICATOR_ADMIN_ADDRESS",
    "metrics_token": "REPLICATOR_METRICS_TOKEN",
    "demo": "REPLICATOR_DEMO",
}

#: shorter HS256 secrets are refused: RFC 7518 asks for a key at least as long as the hash
MIN_SECRET_BYTES = 32
#: secrets published in examples and templates: anyone could sign tokens with them
KNOWN_SECRETS = frozenset(
    {
        "super-secret-jwt-token-with-at-least-32-characters-long",
        "your-super-secret-jwt-token-with-at-least-32-characters-long",
    }
)
_PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|your[-_ ]?secret|placeholder", re.I)


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


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _secret(name: str, text: str) -> str | None:
    """An HS256 secret that is real: long enough, not a published placeholder, not a key."""
    if not text:
        return None
    if "-----BEGIN" in text:
        raise ConfigError(
            f"{name} holds a PEM key, not an HS256 secret; put a public key in"
            " REPLICATOR_JWT_PUBLIC_KEY (or its JWKS URL in REPLICATOR_JWKS_URL)"
        )
    if text.lstrip().startswith("{"):
        raise ConfigError(
            f"{name} holds a JSON key, not an HS256 secret; put the JWKS URL in REPLICATOR_JWKS_URL"
        )
    if text in KNOWN_SECRETS or _PLACEHOLDER.search(text):
        raise ConfigError(
            f"{name}={text!r} is a placeholder that anyone can sign tokens with; set the"
            " secret your auth server signs with (Supabase: the project's JWT secret)"
        )
    size = len(text.encode())
    if size < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{name} is {size} bytes; an HS256 secret needs at least {MIN_SECRET_BYTES}"
            " (use the one your auth server signs with, or: openssl rand -base64 32)"
        )
    return text


def _http_url(name: str, text: str) -> str | None:
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={text!r} is not an http(s) URL")
    return text


def _origins(name: str, text: str) -> tuple[str, ...]:
    """Origins as browsers send them (``scheme://host[:port]``, lower case), or ``*``."""
    found: list[str] = []
    for item in _items(text):
        if item == "*":
            found.append(item)
            continue
        parts = urlsplit(item.removesuffix("/"))
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise ConfigError(
                f"{name} entry {item!r} is not an origin; use scheme://host[:port]"
                " (like https://app.example.com) or *"
            )
        found.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(found)


def _networks(name: str, text: str) -> tuple[str, ...]:
    found: list[str] = []
    for item in _items(text):
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(
                f"{name} entry {item!r} is not an IP address or network (like 10.0.0.0/8)"
            ) from None
    return tuple(found)


def _parse(key: str, text: str) -> Any:
    name = ENV[key]
    if key == "jwt_secret":
        return _secret(name, text)
    if key in ("jwks_url",):
        return _http_url(name, text)
    if key == "jwks_refresh_s":
        return _float(name, text, 10, 86400)
    if key == "jwt_issuer":
        return tuple(_items(text))
    if key == "jwt_user_claim":
        if not text.strip() or len(text) > 256:
            raise ConfigError(f"{name}={text!r} is not a claim name (like sub or app_metadata.id)")
        return text.strip()
    if key == "cors_origins":
        return _origins(name, text)
    if key == "trusted_proxies":
        return _networks(name, text)
    if key in ("admin_token", "jwt_public_key"):
        return text or None
    if key == "max_streams_per_address":
        return _int(name, text, 1, 1_000_000)
    if key in ("max_anonymous_streams", "reserved_streams"):
        return _int(name, text, 0, 1_000_000)
    if key == "port":
        return _int(name, text, 0, 65535)
    if key in ("max_streams_per_user", "max_streams"):
        return _int(name, text, 1, 1_000_000)
    if key == "heartbeat_s":
        return _float(name, text, 0.05, 300)
    if key == "send_timeout_s":
        return _float(name, text, 0.1, 3600)
    if key == "linger_ms":
        return _float(name, text, 0, 100)
    if key == "reconnect_rate":
        return _float(name, text, 10, 1_000_000)
    if key in ("demo_traffic", "demo"):
        return _bool(name, text)
    if key == "data_dir":
        return Path(text).expanduser()
    if key == "badges":
        return Path(text).expanduser() if text else None
    if key in ("slot", "publication", "schema"):
        if not _IDENTIFIER.match(text) or (key == "slot" and len(text) > 42):
            most = 42 if key == "slot" else 63
            raise ConfigError(
                f"{name}={text!r} is not a valid name; use lowercase letters, digits and _"
                f" (at most {most})"
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
    if key == "instance":
        if not re.fullmatch(r"[a-z0-9]{1,20}", text):
            raise ConfigError(
                f"{name}={text!r} is not an instance id; use 1 to 20 lowercase letters and"
                " digits (or leave it unset: it is derived from the host name and the port)"
            )
        return text
    if key == "slot_grace_s":
        return _float(name, text, 1, 7 * 86400)
    if key in ("database_url", "primary_url"):
        if text and not (text.startswith(("postgresql://", "postgres://")) or "=" in text):
            raise ConfigError(
                f"{name}={text!r} is not a PostgreSQL URL; use postgresql://user@host:port/db"
            )
        return text or None
    if key == "host" and not text:
        raise ConfigError(f"{name}={text!r} is empty")
    if key == "header_timeout_s":
        return _float(name, text, 0.1, 3600)
    if key == "admin_address":
        return _address(name, text)
    if key == "metrics_token":
        if not text.strip() or text != text.strip():
            raise ConfigError(f"{name} is empty or has surrounding blanks; set a plain token")
        return text
    return text


def _address(name: str, text: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` for IPv6); empty means none."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name}={text!r} is not host:port; use for example 127.0.0.1:9090")
    return host, int(port)


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
    if (
        not settings.embedded
        and not settings.jwt_secret
        and not settings.jwt_public_key
        and not settings.jwks_url
    ):
        raise ConfigError(
            "REPLICATOR_JWT_SECRET is not set; with DATABASE_URL, set it to the HS256 secret"
            " your auth server signs tokens with, or set REPLICATOR_JWKS_URL or"
            " REPLICATOR_JWT_PUBLIC_KEY"
        )
    if settings.reserved_streams is not None and settings.reserved_streams >= settings.max_streams:
        raise ConfigError(
            f"REPLICATOR_RESERVED_STREAMS={settings.reserved_streams!r} leaves no room under"
            f" REPLICATOR_MAX_STREAMS={settings.max_streams!r}; use a smaller number"
        )


def anonymous_limit(settings: Settings) -> int:
    if settings.max_anonymous_streams is not None:
        return settings.max_anonymous_streams
    return max(1, settings.max_streams // 10)


def reserved_limit(settings: Settings) -> int:
    if settings.reserved_streams is not None:
        return settings.reserved_streams
    return settings.max_streams // 20
