"""``replicator serve``: the database (embedded or given), the consumer, the hub and uvicorn."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from replicator.badges import spec as badge_spec
from replicator.config.settings import (
    Settings,
    anonymous_limit,
    require_jwt_key,
    reserved_limit,
)
from replicator.errors import ConfigError, ReplicatorError
from replicator.fanout.hub import Hub
from replicator.pipeline.consumer import Consumer, ConsumerOptions, log_progress
from replicator.runtime.collector import FreezingCollector
from replicator.runtime.embedded import embedded_database
from replicator.runtime.redact import RedactTokens
from replicator.web.app import BadgeApp
from replicator.web.auth import mint_token, verifier_for
from replicator.web.cors import CorsPolicy
from replicator.web.stream import KeepServerSend
from replicator.web.tickets import Tickets

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, ending every open stream as soon as shutdown starts."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self._service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._service.hub.close()
        await super().shutdown(sockets)


class Service:
    """One consumer, one hub, one app; the app's lifespan owns the background tasks."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        jwt_secret: str | None,
        demo_traffic: bool = False,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.demo_traffic = demo_traffic
        # the hub reads whichever state the consumer holds (a fresh snapshot replaces it)
        self.hub = Hub(
            lambda: self.consumer.state,
            max_per_user=settings.max_streams_per_user,
            max_total=settings.max_streams,
            max_per_address=settings.max_streams_per_address,
            max_anonymous=anonymous_limit(settings),
            reserved=reserved_limit(settings),
        )
        self.consumer = Consumer(
            ConsumerOptions(
                dsn=dsn,
                slot=settings.slot,
                publication=settings.publication,
                schema=settings.schema,
                decoder=settings.decoder,
                badges=badge_spec.load(settings.badges, schema=settings.schema),
            ),
            on_commit=self.hub.publish,
            on_live=self._on_live,
        )
        self.verifier = verifier_for(settings, jwt_secret)
        self.web = BadgeApp(
            self.consumer.view,
            self.hub,
            self.verifier,
            heartbeat=settings.heartbeat_s,
            send_timeout=settings.send_timeout_s,
            lifespan=self.lifespan,
            tickets=Tickets(jwt_secret),
            cors=CorsPolicy(settings.cors_origins),
        )
        self.server: uvicorn.Server | None = None
        self.exit_code = 0
        self.collector = FreezingCollector()
        self._gc_frozen = False

    @property
    def app(self) -> ASGIApp:
        return KeepServerSend(self.web.app)

    def _on_live(self, live: bool) -> None:
        logger.info("replication stream %s", "live" if live else "down")
        self.hub.publish_status(live, int(self.consumer.lag_seconds() * 1000))
        if live and not self._gc_frozen:
            # the stream goes live right after the snapshot is loaded
            self._freeze_gc()

    def _freeze_gc(self) -> None:
        # The snapshot leaves many long-lived objects; moving them out of the collector's
        # sight keeps later collections proportional to what is new, not to the whole state.
        self._gc_frozen = True
        self.collector.freeze_now()

    async def _run_consumer(self) -> None:
        try:
            await self.consumer.run()
        except ReplicatorError as exc:
            logger.error("replication stopped: %s", exc)
            if self.consumer.snapshots == 0 and self.server is not None:
                # Nothing was ever served: a set-up problem, so exit rather than idle.
                self.exit_code = 2
                self.server.should_exit = True

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_consumer)
            tg.start_soon(log_progress, self.consumer)
            tg.start_soon(self.hub.run)
            tg.start_soon(self.collector.run)
            if self.verifier.jwks is not None:
                tg.start_soon(self.verifier.jwks.run)
            if self.demo_traffic:
                from replicator.ops.demo import run_demo_traffic

                tg.start_soon(run_demo_traffic, self.dsn)
            try:
                yield
            finally:
                self.hub.close()
                tg.cancel_scope.cancel()
        await self.consumer.shutdown()

    def config(self, sock: socket.socket, **overrides: Any) -> uvicorn.Config:
        options: dict[str, Any] = {
            "lifespan": "on",
            "log_config": None,
            "timeout_graceful_shutdown": 3,
            "timeout_keep_alive": 30,
            "limit_concurrency": self.settings.max_streams + 1000,
            "backlog": 4096,
            "h11_max_incomplete_event_size": 16 * 1024,
            # h11 rather than httptools even where that is installed: only h11 bounds the
            # size of a request head (above), and uvloop already took most of the per-write
            # cost that httptools would save.
            "http": "h11",
            # The client address (per-address stream limits, access log) comes from
            # X-Forwarded-For only when the peer is one of these.
            "proxy_headers": bool(self.settings.trusted_proxies),
            "forwarded_allow_ips": list(self.settings.trusted_proxies),
        }
        options.update(overrides)
        return uvicorn.Config(self.app, **options)

    async def serve(self, sock: socket.socket) -> None:
        self.server = _Server(self.config(sock), self)
        await self.server.serve(sockets=[sock])


#: kernel send buffer per connection (Linux doubles it for bookkeeping)
SEND_BUFFER_BYTES = 128 * 1024


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Left to autotuning, the kernel would queue up to
    # several MB for a client that stopped reading before a write ever waits; capped, such a
    # stream soon blocks, costs little, and is closed after REPLICATOR_SEND_TIMEOUT_S.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); set REPLICATOR_PORT to a free port"
        ) from None
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def event_loop_options() -> dict[str, Any]:
    """uvloop where it is installed: its transports are smaller and cheaper to write to than
    asyncio's, and a closed one leaves no reference cycle (asyncio's socket transport does,
    which would make every closed stream garbage that only a full collection can free)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def install_log_filters() -> None:
    redact = RedactTokens()
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logging.getLogger(name).addFilter(redact)


def serve(settings: Settings) -> int:
    require_jwt_key(settings)
    install_log_filters()
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    with ExitStack() as stack:
        stack.callback(sock.close)
        secret: str | None
        if settings.embedded:
            db = stack.enter_context(embedded_database(settings.data_dir, serve=True))
            dsn, secret = db.dsn, settings.jwt_secret or db.jwt_secret
        else:
            assert settings.database_url is not None
            dsn, secret = settings.database_url, settings.jwt_secret
        demo = settings.demo_traffic if settings.demo_traffic is not None else settings.embedded
        service = Service(settings, dsn, jwt_secret=secret, demo_traffic=demo)
        if settings.embedded:
            from replicator.ops.demo import DEMO_USER, seed_demo

            seed_demo(dsn)
            assert secret is not None
            token = mint_token(secret, DEMO_USER, ttl=7 * 24 * 3600, audience=settings.jwt_audience)
            base = f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}"
            print(
                f"\n  replicator is starting on the embedded PostgreSQL\n"
                f"  demo page:  {base}/#access_token={token}\n"
                f"  psql:       psql {dsn}\n"
                f"  stream:     curl -N -H 'Authorization: Bearer {token}'"
                f" {base}/v1/badges/stream\n",
                file=sys.stdout,
                flush=True,
            )
        logger.info("listening on http://%s:%d", host, port)
        # uvicorn re-raises the signal that stopped it once it is done; with the default
        # SIGTERM disposition that would kill the process before the embedded PostgreSQL
        # is stopped, so SIGTERM gets a Python handler that lets the clean-up run.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            anyio.run(service.serve, sock, backend_options=event_loop_options())
        finally:
            signal.signal(signal.SIGTERM, previous)
        return service.exit_code
    return 0
