"""Prometheus metrics, read from the consumer and the hub at scrape time (no per-event cost).

Every value is a counter or a length kept as things happen, so a scrape costs the same with
ten thousand open streams as with ten.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, generate_latest
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
            "replicator_replication_failed",
            "1 once replication stopped on an error that needs a fix (see /readyz)",
            c.error is not None,
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
            h.blocked,
        )
        yield GaugeMetricFamily("replicator_tasks", "tasks alive in the event loop", task_count())
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


class ProcessMetrics(Collector):
    """The process's memory, CPU, start time and open files, as prometheus_client's
    ProcessCollector names them. Listing /proc/self/fd costs time per open connection, so
    the files are counted only for a scrape: in the scrape itself while they are few (a
    bounded cost), past that off the event loop (``refresh``) and at most every ``STALE_S``
    seconds. A service nobody scrapes never lists them."""

    #: open files a scrape may list itself (about 0.4 ms)
    INLINE = 1000
    #: seconds a count of many open files is reported again before it is made afresh
    STALE_S = 5.0

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._pagesize = resource.getpagesize()
        self._boot_time = 0.0
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    self._boot_time = float(line.split()[1])
        self.open_files = 0
        self._counted_at = 0.0
        self.count_open_files()

    def count_open_files(self) -> None:
        self.open_files = len(os.listdir("/proc/self/fd"))
        self._counted_at = time.monotonic()

    async def refresh(self) -> None:
        """Before a scrape: count many open files again, off the event loop, if the last
        count is stale."""
        if self.open_files >= self.INLINE and time.monotonic() - self._counted_at > self.STALE_S:
            await anyio.to_thread.run_sync(self.count_open_files)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.open_files < self.INLINE:
            self.count_open_files()
        with open("/proc/self/stat", "rb") as stat:
            parts = stat.read().split(b")")[-1].split()
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", float(parts[20])
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            float(parts[21]) * self._pagesize,
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            float(parts[19]) / self._ticks + self._boot_time,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            (float(parts[11]) + float(parts[12])) / self._ticks,
        )
        yield GaugeMetricFamily(
            "process_open_fds", "Number of open file descriptors.", self.open_files
        )
        yield GaugeMetricFamily(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )


def task_count() -> int:
    """Tasks alive, without building the set ``asyncio.all_tasks()`` makes of all of them."""
    registry = getattr(asyncio.tasks, "_all_tasks", None)  # a WeakSet on CPython 3.11
    if registry is None:
        registry = getattr(asyncio.tasks, "_scheduled_tasks", None)  # 3.12 and later
    if registry is None:
        return len(asyncio.all_tasks())
    return len(registry)


def registry_for(consumer: ConsumerView, hub: Hub, *extra: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicatorCollector(consumer, hub))
    for collector in extra:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
