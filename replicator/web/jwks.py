"""An identity provider's JWKS: cached, refreshed in the background, refetched on demand.

One task (``run``, owned by the service's task group) does every fetch, with an async HTTP
client, so a slow or dead provider never holds up the event loop. A token naming a key id we
do not know asks that task for a fetch and waits for it; such asks are served at most once per
``cooldown_s``, so a flood of made-up key ids costs the provider one request per cooldown. When
a fetch fails, the keys already known keep working, and the failure is logged once per
``log_interval_s`` however often it is retried.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from time import monotonic
from urllib.parse import urlsplit

import anyio
import httpx

from replicator.errors import JwksUnavailable
from replicator.web.keys import Key, parse_jwks

logger = logging.getLogger(__name__)

#: a JWKS document larger than this is refused
MAX_JWKS_BYTES = 1 << 20


class Jwks:
    """The key set at one URL, as last fetched successfully."""

    def __init__(
        self,
        url: str,
        *,
        refresh_s: float = 300.0,
        cooldown_s: float = 5.0,
        timeout_s: float = 5.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.url = url
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
            logger.warning(
                "REPLICATOR_JWKS_URL=%r is plain http: anyone on the way can swap the keys;"
                " use https",
                url,
            )
        self.refresh_s = refresh_s
        self.cooldown_s = cooldown_s
        self.timeout_s = timeout_s
        self.log_interval_s = log_interval_s
        self._clock = clock
        self.keys: tuple[Key, ...] = ()
        self.by_kid: dict[str, Key] = {}
        self.loaded = False
        #: fetch attempts, and those that failed
        self.fetches = 0
        self.failures = 0
        self._wanted: anyio.Event | None = None
        #: set when the next fetch to start has finished
        self._next_done: anyio.Event | None = None
        self._in_flight: anyio.Event | None = None
        self._last_attempt = -math.inf
        self._last_logged = -math.inf
        self._failing = False
        self._skipped: list[str] = []

    def get(self, kid: str) -> Key | None:
        return self.by_kid.get(kid)

    async def refetch(self) -> bool:
        """Fetch again (a token names a key we do not have) and wait for it, bounded.

        False without waiting when the last fetch started less than ``cooldown_s`` ago and
        none is in flight or asked for.
        """
        self._make_events()
        assert self._wanted is not None and self._next_done is not None
        if self._in_flight is not None:
            done = self._in_flight
        elif self._wanted.is_set():
            done = self._next_done
        elif self._clock() - self._last_attempt >= self.cooldown_s:
            done = self._next_done
            self._wanted.set()
        else:
            return False
        with anyio.move_on_after(self.timeout_s + self.cooldown_s + 1):
            await done.wait()
        return True

    def _make_events(self) -> None:
        # Events belong to the running event loop, so they are made on first use there.
        if self._wanted is None:
            self._wanted, self._next_done = anyio.Event(), anyio.Event()

    async def run(self) -> None:
        """Fetch now, then every ``refresh_s`` and whenever ``refetch`` asks, until cancelled."""
        self._make_events()
        backoff = self.cooldown_s
        delay = 0.0
        async with httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=True,
            headers={"Accept": "application/json"},
        ) as client:
            while True:
                assert self._wanted is not None and self._next_done is not None
                with anyio.move_on_after(delay):
                    await self._wanted.wait()
                wait = self._last_attempt + self.cooldown_s - self._clock()
                if wait > 0:
                    await anyio.sleep(wait)
                done, self._next_done = self._next_done, anyio.Event()
                self._wanted = anyio.Event()
                self._in_flight = done
                self._last_attempt = self._clock()
                try:
                    ok = await self._fetch(client)
                finally:
                    self._in_flight = None
                    done.set()
                if ok:
                    delay, backoff = self.refresh_s, self.cooldown_s
                else:
                    delay, backoff = backoff, min(backoff * 2, self.refresh_s)

    async def _fetch(self, client: httpx.AsyncClient) -> bool:
        self.fetches += 1
        try:
            body = await self._download(client)
            try:
                keys, skipped = parse_jwks(body)
            except ValueError as exc:
                raise JwksUnavailable(str(exc)[:200]) from None
            if not keys:
                raise JwksUnavailable("it holds no usable signing key: " + "; ".join(skipped))
        except JwksUnavailable as exc:
            self._failed(str(exc))
            return False
        if skipped != self._skipped:
            self._skipped = skipped
            for line in skipped:
                logger.warning("JWKS at %s: ignoring %s", self.url, line)
        before = {k.kid for k in self.keys}
        self.keys = tuple(keys)
        self.by_kid = {k.kid: k for k in keys if k.kid is not None}
        self.loaded = True
        if self._failing:
            self._failing = False
            self._last_logged = -math.inf
            logger.info("JWKS at %s is reachable again", self.url)
        if {k.kid for k in keys} != before:
            described = ", ".join(
                f"{k.kid or '(no kid)'} {'/'.join(sorted(k.algorithms))}" for k in keys
            )
            logger.info("JWKS at %s: %d keys (%s)", self.url, len(keys), described)
        return True

    async def _download(self, client: httpx.AsyncClient) -> bytes:
        try:
            async with client.stream("GET", self.url) as response:
                if response.status_code != 200:
                    raise JwksUnavailable(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksUnavailable(f"larger than {MAX_JWKS_BYTES} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"{type(exc).__name__}: {exc}"[:200]) from None

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self._failing = True
        now = self._clock()
        if now - self._last_logged >= self.log_interval_s:
            self._last_logged = now
            logger.warning(
                "cannot fetch the JWKS at %s (%s); the keys already known (%d) keep working,"
                " retrying",
                self.url,
                reason,
                len(self.keys),
            )
        else:
            logger.debug("cannot fetch the JWKS at %s (%s)", self.url, reason)
