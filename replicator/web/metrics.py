"""Prometheus metrics, read from the consumer and the hub at scrape time (no per-event cost)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from replicator.fanout.hub import REFUSALS

if TYPE_CHECKING:
    from replicator.fanout.hub import Hub
    from replicator.pipeline.consumer import ConsumerView


class ReplicatorCollector(Collector):
    def __init__(self, consumer: ConsumerView, hub: Hub) -> None:
        self.consumer = consumer
        self.hub = hub
        self.started = time.time()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        c, h = self.consumer, self.hub
        yield GaugeMetricFamily(
            "replicator_replication_live", "1 while the replication stream is up", c.live
        )
        yield GaugeMetricFamily(
            "replicator_replication_lag_bytes",
            "WAL bytes the server has that the state has not applied",
            c.lag_bytes(),
        )
        yield GaugeMetricFamily(
            "replicator_replication_lag_seconds",
            "age of the last applied commit while behind the server",
            c.lag_seconds(),
        )
        yield GaugeMetricFamily(
            "replicator_applied_lsn", "WAL position applied to the state", c.applied_lsn
        )
        yield CounterMetricFamily(
            "replicator_changes_applied", "row changes applied", c.changes_applied
        )
        yield CounterMetricFamily(
            "replicator_transactions_applied", "transactions applied", c.transactions_applied
        )
        yield CounterMetricFamily(
            "replicator_reconnects", "replication reconnect attempts", c.reconnects
        )
        yield CounterMetricFamily("replicator_snapshots", "initial snapshots taken", c.snapshots)
        yield GaugeMetricFamily(
            "replicator_snapshot_duration_seconds",
            "duration of the last snapshot (slot creation and initial read)",
            c.snapshot_seconds,
        )
        yield GaugeMetricFamily(
            "replicator_users_with_badges", "users with at least one badge", len(c.state)
        )
        yield CounterMetricFamily(
            "replicator_events_sent", "SSE events written to clients", h.stats.events_sent
        )
        yield CounterMetricFamily(
            "replicator_events_published",
            "badge states encoded for connected users",
            h.stats.events_published,
        )
        yield GaugeMetricFamily("replicator_streams_connected", "open SSE streams", h.connected)
        yield GaugeMetricFamily(
            "replicator_streams_blocked",
            "open streams waiting on a client that does not read",
            h.blocked(),
        )
        yield GaugeMetricFamily(
            "replicator_tasks", "tasks alive in the event loop", len(asyncio.all_tasks())
        )
        yield GaugeMetricFamily(
            "replicator_users_connected", "users with at least one open stream", h.users_connected
        )
        yield CounterMetricFamily(
            "replicator_streams_opened", "SSE streams opened", h.stats.streams_opened
        )
        yield CounterMetricFamily(
            "replicator_streams_closed", "SSE streams closed", h.stats.streams_closed
        )
        refused = CounterMetricFamily(
            "replicator_streams_refused",
            "streams refused by a limit (429/503), by the limit's reason",
            labels=["reason"],
        )
        for reason in REFUSALS:
            refused.add_metric([reason], h.stats.refused[reason])
        yield refused
        yield GaugeMetricFamily(
            "replicator_streams_anonymous", "open streams of anonymous users", h.anonymous
        )


def registry_for(consumer: ConsumerView, hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicatorCollector(consumer, hub))
    # resident memory, CPU seconds and open file descriptors of this process
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
