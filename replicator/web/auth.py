"""JWT authentication: an HS256 secret, a PEM public key and/or a JWKS, any claim as the user.

Each key accepts only the algorithms its type allows (``keys.py``), so a token can never make
a public key act as an HMAC secret, nor an RSA key check an EC signature. A token's header
chooses nothing but the algorithm and the key id: ``jku``, ``x5u``, ``x5c`` and an embedded
``jwk`` are never read. Every way a token can be wrong is an ``AuthError`` (a ``401``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from replicator.config.settings import Settings
from replicator.errors import AuthError, ConfigError
from replicator.web.jwks import Jwks
from replicator.web.keys import Key, load_public_key, secret_key

__all__ = ["ADMIN_ROLE", "AuthError", "Identity", "TokenVerifier", "mint_token"]

logger = logging.getLogger(__name__)

ADMIN_ROLE = "service_role"
#: longest token accepted; anything larger is refused before it is parsed
MAX_TOKEN_LENGTH = 8192
#: a token without a key id is tried against at most this many keys of its algorithm
MAX_KEYS_TRIED = 8
MAX_USER_ID_LENGTH = 256


@dataclass(frozen=True)
class Identity:
    user_id: str
    admin: bool
    #: the token's ``exp`` (seconds since the epoch): its stream ends then
    expires: float = math.inf
    #: an anonymous sign-in (``is_anonymous: true``): a smaller share of the streams
    anonymous: bool = False


def claim_at(claims: Mapping[str, Any], path: str) -> object:
    """The claim named ``path``, or reached by its dotted path (``app_metadata.user_id``).

    A name that is itself a key wins, and longer prefixes are tried first, so claims whose
    names hold dots (Auth0's ``https://example.com/user_id``) are found too.
    """
    if path in claims:
        return claims[path]
    cut = path.rfind(".")
    while cut > 0:
        inner = claims.get(path[:cut])
        if isinstance(inner, Mapping):
            found = claim_at(inner, path[cut + 1 :])
            if found is not None:
                return found
        cut = path.rfind(".", 0, cut)
    return None


def user_id_from(claims: Mapping[str, Any], path: str) -> str:
    value = claim_at(claims, path)
    if value is None:
        raise AuthError(f"token has no {path[:64]!r} claim")
    # The user column's text form: a JSON number stands for a bigint id.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_USER_ID_LENGTH:
        raise AuthError(f"token claim {path[:64]!r} is not a user id")
    return value


class TokenVerifier:
    """Checks signature, expiry, audience and issuer; finds the user in the configured claim."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key: str | None = None,
        jwks: Jwks | None = None,
        audience: str = "authenticated",
        issuers: Sequence[str] = (),
        user_claim: str = "sub",
        leeway: float = 5.0,
    ) -> None:
        if not secret and not public_key and jwks is None:
            raise ConfigError("REPLICATOR_JWT_SECRET is not set; tokens cannot be checked")
        self._static: list[Key] = []
        if secret:
            self._static.append(secret_key(secret))
        if public_key:
            self._static.append(load_public_key(public_key))
        self.jwks = jwks
        self._audiences = [a.strip() for a in audience.split(",") if a.strip()]
        self._issuers = list(issuers) or None
        self._user_claim = user_claim
        self._leeway = leeway

    async def verify(self, token: str) -> Identity:
        """A user's token: audience checked, the user claim required."""
        claims = await self._claims(token, audience=True)
        return Identity(
            user_id_from(claims, self._user_claim),
            claims.get("role") == ADMIN_ROLE,
            float(claims["exp"]),
            claims.get("is_anonymous") is True,
        )

    async def verify_admin(self, token: str) -> Identity:
        """A token for the admin route: its ``role`` decides; no user or audience needed
        (Supabase's service_role key has neither)."""
        claims = await self._claims(token, audience=False)
        user = claim_at(claims, self._user_claim)
        return Identity(
            user if isinstance(user, str) else "",
            claims.get("role") == ADMIN_ROLE,
            float(claims["exp"]),
        )

    async def _claims(self, token: str, *, audience: bool) -> dict[str, Any]:
        alg, kid = self._header(token)
        keys = self._keys_for(alg, kid)
        jwks = self.jwks
        # A key we have not seen (rotation) or no keys yet (start-up): fetch, rate-limited.
        wanted = kid is not None or (jwks is not None and not jwks.loaded)
        if not keys and jwks is not None and wanted and await jwks.refetch():
            keys = self._keys_for(alg, kid)
        if not keys:
            if kid is not None and jwks is not None:
                raise AuthError(f"token key id {kid[:64]!r} is not known")
            raise AuthError(f"token algorithm {alg[:16]!r} is not accepted")
        for key in keys:
            claims = self._decode(token, key, alg, audience=audience)
            if claims is not None:
                return claims
        raise AuthError("token signature does not verify")

    def _header(self, token: str) -> tuple[str, str | None]:
        if not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
            raise AuthError("malformed token header")
        return alg, kid

    def _keys_for(self, alg: str, kid: str | None) -> list[Key]:
        if kid is not None and self.jwks is not None:
            key = self.jwks.get(kid)
            if key is not None:
                if alg not in key.algorithms:
                    raise AuthError(f"token algorithm {alg[:16]!r} does not match key {kid[:64]!r}")
                return [key]
        keys = [k for k in self._static if alg in k.algorithms]
        if kid is None and self.jwks is not None:
            keys += [k for k in self.jwks.keys if alg in k.algorithms]
        return keys[:MAX_KEYS_TRIED]

    def _decode(self, token: str, key: Key, alg: str, *, audience: bool) -> dict[str, Any] | None:
        """The token's claims, or None when its signature does not verify with ``key``."""
        check_audience = audience and bool(self._audiences)
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audiences if check_audience else None,
                issuer=self._issuers,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": check_audience},
            )
        except jwt.InvalidSignatureError:
            return None
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"token audience is not {','.join(self._audiences)!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"token issuer is not {','.join(self._issuers or ())!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token has no {exc.claim!r} claim") from None
        except Exception as exc:
            # Hostile input reaches the crypto library (odd points, sizes, encodings); what it
            # raises is about the token, never a fault of the service.
            logger.debug("token refused: %s: %s", type(exc).__name__, exc)
            raise AuthError("invalid token") from None


def verifier_for(settings: Settings, secret: str | None) -> TokenVerifier:
    jwks = None
    if settings.jwks_url:
        jwks = Jwks(settings.jwks_url, refresh_s=settings.jwks_refresh_s)
    return TokenVerifier(
        secret=secret,
        public_key=settings.jwt_public_key,
        jwks=jwks,
        audience=settings.jwt_audience,
        issuers=settings.jwt_issuer,
        user_claim=settings.jwt_user_claim,
    )


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl: float = 24 * 3600,
    audience: str = "authenticated",
    admin: bool = False,
    claims: Mapping[str, object] | None = None,
) -> str:
    """An HS256 token for ``user_id``; ``audience`` may list several (the first is used)."""
    now = int(time.time())
    body: dict[str, object] = {
        "sub": user_id,
        "role": ADMIN_ROLE if admin else "authenticated",
        "iat": now,
        "exp": int(now + ttl),
    }
    first = audience.split(",")[0].strip()
    if first:
        body["aud"] = first
    body.update(claims or {})
    return jwt.encode(body, secret, algorithm="HS256")
