"""``replicator serve``: the database (embedded or given), the consumer, the hub and uvicorn."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
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
from replicator.errors import ConfigError, ReplicatorError, StartupError
from replicator.fanout.hub import Hub
from replicator.pipeline.consumer import Consumer, ConsumerOptions, log_progress
from replicator.runtime.collector import FreezingCollector
from replicator.runtime.connections import ConnectionGuard, protocol_class
from replicator.runtime.embedded import embedded_database
from replicator.runtime.monitor import SlotMonitor, open_pool
from replicator.runtime.nudge import WalNudge
from replicator.runtime.ops_metrics import RuntimeCollector
from replicator.runtime.redact import RedactTokens
from replicator.web.app import BadgeApp
from replicator.web.auth import mint_token, verifier_for
from replicator.web.cors import CorsPolicy
from replicator.web.stream import KeepServerSend
from replicator.web.tickets import Tickets

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, ending every open stream as soon as shutdown starts, each told when to come
    back and given a ticket to come back with."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self._service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = self._service
        service.hub.close(rate=service.settings.reconnect_rate, ticket=service.web.return_ticket)
        await super().shutdown(sockets)


class _AdminServer(uvicorn.Server):
    """The second listener (REPLICATOR_ADMIN_ADDRESS): signals are the main server's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def instance_id(port: int) -> str:
    """An id for this instance that stays the same across its restarts: from the host name
    (a container's, a pod's) and the port it listens on, so that instances on one host differ."""
    seed = f"{socket.gethostname()}:{port}"
    return hashlib.sha256(seed.encode()).hexdigest()[:8]


def slot_name(settings: Settings, port: int) -> str:
    """``REPLICATOR_SLOT`` (the prefix) and this instance's id: each instance its own slot."""
    return f"{settings.slot}_{settings.instance or instance_id(port)}"


class Service:
    """One consumer, one hub, one app; the app's lifespan owns the background tasks."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        jwt_secret: str | None,
        demo_traffic: bool = False,
        max_connections: int | None = None,
        slot: str | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        #: this instance's replication slot: the prefix and the instance's own id
        self.slot = slot or slot_name(settings, settings.port)
        self.demo_traffic = demo_traffic
        self.guard = ConnectionGuard(
            header_timeout=settings.header_timeout_s,
            max_connections=max_connections or settings.max_streams + 1000,
        )
        #: short connections opened again and again (slot checks, demo writes)
        self.pool = open_pool(dsn)
        self.monitor = SlotMonitor(self.pool, self.slot)
        #: what must be written on the primary (with a standby, REPLICATOR_PRIMARY_URL)
        self.primary_pool = open_pool(settings.primary_url) if settings.primary_url else self.pool
        #: moves the stream past an LSN a reader waits for (min_lsn)
        self.nudge = WalNudge(self.primary_pool)
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
                slot=self.slot,
                slot_prefix=settings.slot,
                slot_grace_s=settings.slot_grace_s,
                primary_dsn=settings.primary_url,
                publication=settings.publication,
                schema=settings.schema,
                decoder=settings.decoder,
                badges=badge_spec.load(settings.badges, schema=settings.schema),
                linger_s=settings.linger_ms / 1000,
            ),
            on_commit=self.hub.publish,
            on_live=self._on_live,
        )
        self.verifier = verifier_for(settings, jwt_secret)
        demo = None
        if settings.demo_enabled:
            from replicator.ops.demo import demo_action

            demo = functools.partial(demo_action, self.pool)
        self.web = BadgeApp(
            self.consumer.view,
            self.hub,
            self.verifier,
            heartbeat=settings.heartbeat_s,
            send_timeout=settings.send_timeout_s,
            lifespan=self.lifespan,
            tickets=Tickets(jwt_secret),
            cors=CorsPolicy(settings.cors_origins),
            collectors=[
                RuntimeCollector(
                    self.guard,
                    self.monitor,
                    max_streams=settings.max_streams,
                    open_connections=self._open_connections,
                )
            ],
            ops_elsewhere=settings.admin_address is not None,
            metrics_token=settings.metrics_token,
            nudge=self.nudge.past,
            demo=demo,
        )
        self.server: uvicorn.Server | None = None
        #: why the service stopped before it ever streamed
        self.startup_error: ReplicatorError | None = None
        self.collector = FreezingCollector()
        self._gc_frozen = False

    @property
    def app(self) -> ASGIApp:
        return KeepServerSend(self.web.asgi)

    def _open_connections(self) -> int:
        return len(self.server.server_state.connections) if self.server is not None else 0

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
            if self.consumer.started or self.server is None:
                # Clients hold counts that were right: keep serving them, /readyz says why not.
                logger.error("replication stopped: %s", exc)
                return
            # Nothing was ever streamed: a set-up problem. Exit (the slot is dropped and an
            # embedded server stopped on the way out) rather than idle.
            self.startup_error = exc
            self.server.should_exit = True

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.pool.open(wait=False)
        if self.primary_pool is not self.pool:
            await self.primary_pool.open(wait=False)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_consumer)
                tg.start_soon(log_progress, self.consumer)
                tg.start_soon(self.hub.run)
                tg.start_soon(self.collector.run)
                tg.start_soon(self.monitor.run)
                if self.verifier.jwks is not None:
                    tg.start_soon(self.verifier.jwks.run)
                if self.demo_traffic:
                    from replicator.ops.demo import run_demo_traffic

                    tg.start_soon(run_demo_traffic, self.pool)
                try:
                    yield
                finally:
                    self.hub.close()
                    tg.cancel_scope.cancel()
            await self.consumer.shutdown()
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.pool.close()
                if self.primary_pool is not self.pool:
                    await self.primary_pool.close()

    def config(self, sock: socket.socket, **overrides: Any) -> uvicorn.Config:
        options: dict[str, Any] = {
            "app": self.app,
            "lifespan": "on",
            "log_config": None,
            "timeout_graceful_shutdown": 3,
            "timeout_keep_alive": 30,
            # the guard refuses connections beyond its cap as they are accepted; this is
            # uvicorn's own check (per request), one above so that it never fires first
            "limit_concurrency": self.guard.max_connections + 1,
            "backlog": 4096,
            # httptools, with the guards of runtime/connections.py
            "http": protocol_class(self.guard),
            # The client address (per-address stream limits, access log) comes from
            # X-Forwarded-For only when the peer is one of these.
            "proxy_headers": bool(self.settings.trusted_proxies),
            "forwarded_allow_ips": list(self.settings.trusted_proxies),
        }
        options.update(overrides)
        return uvicorn.Config(**options)

    async def serve(self, sock: socket.socket, admin_sock: socket.socket | None = None) -> None:
        self.server = _Server(self.config(sock), self)
        if admin_sock is None:
            await self.server.serve(sockets=[sock])
            return
        admin = _AdminServer(self.config(admin_sock, app=self.web.admin_app, lifespan="off"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(admin.serve, [admin_sock])
            try:
                await self.server.serve(sockets=[sock])
            finally:
                admin.should_exit = True


#: kernel send buffer per connection (Linux doubles it for bookkeeping)
SEND_BUFFER_BYTES = 128 * 1024


def bind(host: str, port: int, *, variable: str = "REPLICATOR_PORT") -> socket.socket:
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
            f"cannot listen on {host}:{port} ({exc.strerror}); set {variable} to a free port"
        ) from None
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


#: open files kept for everything but client connections (PostgreSQL connections, logs, ...)
RESERVED_FILES = 100


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(settings: Settings, open_files: int) -> int:
    """Connections to accept: room for every stream and some requests, kept below the
    open-files limit, so a flood meets a 503 rather than an accept loop out of files."""
    wanted = settings.max_streams + 1000
    cap = max(16, open_files - RESERVED_FILES)
    if cap < settings.max_streams:
        logger.warning(
            "the open-files limit (%d) allows %d connections, fewer than"
            " REPLICATOR_MAX_STREAMS=%d needs; raise it (ulimit -n) to serve more",
            open_files,
            cap,
            settings.max_streams,
        )
    return min(wanted, cap)


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
    cap = connection_cap(settings, raise_open_files_limit())
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    with ExitStack() as stack:
        stack.callback(sock.close)
        admin_sock = None
        if settings.admin_address is not None:
            admin_sock = bind(*settings.admin_address, variable="REPLICATOR_ADMIN_ADDRESS")
            stack.callback(admin_sock.close)
        secret: str | None
        if settings.embedded:
            db = stack.enter_context(embedded_database(settings.data_dir, serve=True))
            dsn, secret = db.dsn, settings.jwt_secret or db.jwt_secret
        else:
            assert settings.database_url is not None
            dsn, secret = settings.database_url, settings.jwt_secret
        demo = settings.demo_traffic if settings.demo_traffic is not None else settings.embedded
        service = Service(
            settings,
            dsn,
            jwt_secret=secret,
            demo_traffic=demo,
            max_connections=cap,
            slot=slot_name(settings, port),
        )
        if settings.embedded:
            from replicator.ops.demo import DEMO_USER, seed_demo

            seed_demo(dsn)
            assert secret is not None
            token = mint_token(secret, DEMO_USER, ttl=7 * 24 * 3600, audience=settings.jwt_audience)
            base = f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}"
            page = f"  demo page:  {base}/#access_token={token}\n" if settings.demo_enabled else ""
            print(
                f"\n  replicator is starting on the embedded PostgreSQL\n"
                f"{page}"
                f"  psql:       psql {dsn}\n"
                f"  stream:     curl -N -H 'Authorization: Bearer {token}'"
                f" {base}/v1/badges/stream\n",
                file=sys.stdout,
                flush=True,
            )
        logger.info("listening on http://%s:%d", host, port)
        if admin_sock is not None:
            admin_host, admin_port = admin_sock.getsockname()[:2]
            logger.info(
                "admin listener (/metrics, /readyz) on http://%s:%d", admin_host, admin_port
            )
        # uvicorn re-raises the signal that stopped it once it is done; with the default
        # SIGTERM disposition that would kill the process before the embedded PostgreSQL
        # is stopped, so SIGTERM gets a Python handler that lets the clean-up run.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            anyio.run(service.serve, sock, admin_sock, backend_options=event_loop_options())
        finally:
            signal.signal(signal.SIGTERM, previous)
        if service.startup_error is not None:
            raise StartupError(str(service.startup_error))
    return 0
