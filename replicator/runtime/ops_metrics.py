"""Metrics of the process around the stream: HTTP connection guards, limits, the slot's WAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from replicator.runtime.connections import ConnectionGuard
from replicator.runtime.monitor import SlotMonitor


class RuntimeCollector(Collector):
    """Read at scrape time; each value is a counter or a length, so a scrape costs the same
    whatever the number of open streams."""

    def __init__(
        self,
        guard: ConnectionGuard,
        monitor: SlotMonitor,
        *,
        max_streams: int,
        open_connections: Callable[[], int],
    ) -> None:
        self.guard = guard
        self.monitor = monitor
        self.max_streams = max_streams
        self.open_connections = open_connections

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        g = self.guard
        yield CounterMetricFamily(
            "replicator_http_header_timeouts",
            "connections closed for not sending complete request headers in time",
            g.header_timeouts,
        )
        yield CounterMetricFamily(
            "replicator_http_heads_too_large",
            "requests refused (431) for headers over the size limit",
            g.heads_too_large,
        )
        yield CounterMetricFamily(
            "replicator_http_connections_refused",
            "connections refused (503) at the connection limit",
            g.refused,
        )
        yield GaugeMetricFamily(
            "replicator_http_connections", "open HTTP connections", self.open_connections()
        )
        yield GaugeMetricFamily(
            "replicator_http_connections_limit",
            "open HTTP connections allowed (below the open-files limit)",
            g.max_connections,
        )
        yield GaugeMetricFamily(
            "replicator_streams_limit", "open SSE streams allowed", self.max_streams
        )
        yield GaugeMetricFamily(
            "replicator_slot_wal_retained_bytes",
            "WAL the server keeps for the replication slot (periodic pg_replication_slots query)",
            self.monitor.retained_bytes,
        )
        yield CounterMetricFamily(
            "replicator_slot_checks_failed",
            "periodic slot queries that failed",
            self.monitor.failures,
        )
