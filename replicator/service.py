"""``replicator serve``: the database (embedded or given), the consumer, and their lifetimes."""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack

import anyio

from replicator.consumer import Consumer, ConsumerOptions, log_progress
from replicator.embedded import embedded_database
from replicator.settings import Settings

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    with ExitStack() as stack:
        if settings.embedded:
            db = stack.enter_context(embedded_database(settings.data_dir))
            dsn = db.dsn
            logger.info("embedded PostgreSQL is up; connect with: psql %s", dsn)
        else:
            assert settings.database_url is not None
            dsn = settings.database_url
        options = ConsumerOptions(
            dsn=dsn, slot=settings.slot, publication=settings.publication, schema=settings.schema
        )
        anyio.run(_run_consumer, options)
    return 0


async def _run_consumer(options: ConsumerOptions) -> None:
    consumer = Consumer(options)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            tg.start_soon(log_progress, consumer)
            await consumer.run()
    finally:
        await consumer.shutdown()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
