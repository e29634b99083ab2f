"""Stream tickets: short-lived, single-use stand-ins for a JWT in an ``EventSource`` URL.

URLs end up in proxy and access logs; a ticket found there is useless a few seconds later
and opens one stream at most. A ticket is signed rather than stored, so minting one costs
no memory; only used tickets are remembered, until they expire. Its key comes from the HS256
secret when there is one, so instances sharing that secret accept each other's tickets, and an
instance accepts the tickets it handed out before a restart.

At shutdown each stream is handed a ticket for coming back (``Hub.close``): it is valid until a
little after the client is told to return, so a reconnect after a restart is one request,
without the token. A ticket is remembered as used only by the instance that took it, so one
seen in a log may be taken once by each other instance sharing the secret until it expires:
that is why every ticket is short-lived.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time

from replicator.errors import AuthError
from replicator.web.auth import Identity

#: how long a ticket stays usable (never longer than its token)
TICKET_TTL_S = 30.0
MAX_TICKET_LENGTH = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tickets:
    def __init__(self, secret: str | None = None, *, ttl: float = TICKET_TTL_S) -> None:
        if secret:
            self._key = hmac.new(secret.encode(), b"replicator stream ticket", "sha256").digest()
        else:
            self._key = secrets.token_bytes(32)
        #: whether other instances, and this one after a restart, accept its tickets
        self.shared = bool(secret)
        self.ttl = ttl
        #: nonce -> expiry of tickets already used, oldest first
        self._used: dict[str, float] = {}

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def issue(self, identity: Identity, ttl: float | None = None) -> tuple[str, int]:
        """A ticket for the user, valid for ``ttl`` seconds (default: the tickets' own) and
        expiring with the token at the latest; and its lifetime."""
        now = time.time()
        expires = min(now + (self.ttl if ttl is None else ttl), identity.expires)
        if expires <= now:
            raise AuthError("token expired")
        fields = [
            identity.user_id,
            identity.expires,
            expires,
            int(identity.anonymous),
            secrets.token_urlsafe(12),
        ]
        body = _b64(json.dumps(fields, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}", math.ceil(expires - now)

    def redeem(self, ticket: str) -> Identity:
        """The identity a ticket stands for; each ticket works once."""
        if len(ticket) > MAX_TICKET_LENGTH:
            raise AuthError("ticket too long")
        body, _, mac = ticket.partition(".")
        if not hmac.compare_digest(self._mac(body).encode(), mac.encode("utf-8", "replace")):
            raise AuthError("invalid ticket")
        user, token_expires, expires, anonymous, nonce = json.loads(_unb64(body))
        now = time.time()
        if expires <= now:
            raise AuthError("ticket expired: get a new one from POST /v1/badges/ticket")
        used = self._used
        while used:
            oldest = next(iter(used))
            if used[oldest] > now:
                break
            del used[oldest]
        if nonce in used:
            raise AuthError("ticket already used: get a new one from POST /v1/badges/ticket")
        used[nonce] = expires
        return Identity(user, False, float(token_expires), bool(anonymous))
