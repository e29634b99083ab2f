"""The small commands: migrate and token."""

from __future__ import annotations

from replicator.config.settings import Settings
from replicator.errors import ConfigError
from replicator.ops.migrate import migrate
from replicator.runtime.embedded import embedded_database, jwt_secret_in
from replicator.web.auth import mint_token


def run_migrate(settings: Settings) -> int:
    if settings.database_url:
        applied = migrate(settings.database_url)
    else:
        with embedded_database(settings.data_dir) as db:
            applied = migrate(db.dsn)
    print(f"applied {', '.join(applied)}" if applied else "nothing to apply: schema is current")
    return 0


def signing_secret(settings: Settings) -> str:
    if settings.jwt_secret:
        return settings.jwt_secret
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return jwt_secret_in(settings.data_dir)
    raise ConfigError("REPLICATOR_JWT_SECRET is not set; it is needed to sign a token")


def run_token(settings: Settings, user_id: str, *, ttl: int, admin: bool) -> int:
    if not user_id.strip():
        raise ConfigError(f"USER_ID={user_id!r} is empty")
    print(
        mint_token(
            signing_secret(settings), user_id, ttl=ttl, audience=settings.jwt_audience, admin=admin
        )
    )
    return 0
