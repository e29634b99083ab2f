"""JWT authentication: the same tokens Supabase Auth issues (HS256, ``sub``, ``exp``, ``aud``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from replicator.errors import ConfigError, ReplicatorError

ADMIN_ROLE = "service_role"
_ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"]
#: longest token accepted; anything larger is refused before it is parsed
MAX_TOKEN_LENGTH = 8192


class AuthError(ReplicatorError):
    """A request's credentials are missing or not acceptable; the message is safe to show."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    admin: bool


def load_public_key(value: str) -> str:
    """A PEM key given inline, or the path of a file that holds one."""
    if "-----BEGIN" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"REPLICATOR_JWT_PUBLIC_KEY={value!r} is neither a PEM key nor a readable file"
        ) from exc


class TokenVerifier:
    """Checks signature, expiry and audience; ``alg: none`` and unknown algorithms fail."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key: str | None = None,
        audience: str = "authenticated",
        leeway: float = 5.0,
    ) -> None:
        if not secret and not public_key:
            raise ConfigError("REPLICATOR_JWT_SECRET is not set; tokens cannot be checked")
        self._secret = secret
        self._public_key = load_public_key(public_key) if public_key else None
        self._audience = audience
        self._leeway = leeway

    def verify(self, token: str) -> Identity:
        if not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if alg == "HS256" and self._secret:
            key: Any = self._secret
            algorithms = ["HS256"]
        elif alg in _ASYMMETRIC and self._public_key:
            key = self._public_key
            algorithms = [str(alg)]
        else:
            raise AuthError(f"token algorithm {str(alg)[:16]!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"token audience is not {self._audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise AuthError("invalid token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthError("token subject is not a user id")
        return Identity(sub, claims.get("role") == ADMIN_ROLE)


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl: int = 24 * 3600,
    audience: str = "authenticated",
    admin: bool = False,
) -> str:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "aud": audience,
        "role": ADMIN_ROLE if admin else "authenticated",
        "iat": now,
        "exp": now + ttl,
    }
    return jwt.encode(claims, secret, algorithm="HS256")
