"""Fan-out benchmark: commit -> client latency, RSS and CPU of the SSE service at N open streams.

One throwaway embedded PostgreSQL, one ``replicator serve`` process, load processes holding the
SSE streams on raw sockets (``fanout_load.py``), and writer threads committing one badge change
per transaction at a fixed rate, each to a random connected user. For each N (ascending, streams
are added to those already open) the run measures:

- ``rss_per_stream_kb``: (service RSS with N idle streams - RSS with none) / N;
- ``idle_cpu_s_per_s``: service CPU while the N streams are idle (heartbeats, timers);
- latency: receive time of each badges event minus the time its transaction was sent by the
  writer (so it includes the commit itself); events are matched to commits through their LSN;
- ``cpu_s_per_1000_changes``: all service CPU during the write window per 1000 committed changes;
  ``marginal_cpu_s_per_1000_changes`` subtracts the idle CPU rate measured just before at the
  same N, leaving what the changes themselves cost (decode, apply, encode, deliver). The
  contract's "cost per change does not grow with the number of clients" is about the latter;
  both are reported.

``events`` can be a little below ``changes``: two changes to one user close together may be
coalesced into one event (the contract allows skipping intermediate states, never the last).
Heartbeats are part of the idle CPU: N streams cost about N / REPLICATOR_HEARTBEAT_S comment
writes per second whether anything changes or not. On loopback the kernel bills most of the
receiving side of each write to the sender, so the service's CPU includes some of the clients'.

Writes ``benchmarks/results/fanout.json`` (one record per N) and ``fanout.png``
(``fanout-quick.*`` with ``--quick``).

``--url http://host:port --dsn ... --secret ...`` measures a deployment someone already runs
(one instance of it, through its load balancer or not) instead of a service this script starts:
the same phases less the storm and the baseline, CPU and memory read from its ``/metrics``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.baseline import (  # noqa: E402
    baseline_python,
    comparison_arguments,
    counts,
    cpu_seconds,
    head,
    load_average,
    log,
    wait_for_quiet,
)
from replicator.ops.migrate import migrate  # noqa: E402
from replicator.runtime.cluster import PostgresCluster, embedded_bindir  # noqa: E402
from replicator.web.auth import mint_token  # noqa: E402

RESULTS = HERE / "results"
SECRET = "fanout-benchmark-secret-0123456789abcdef"
#: the audience of the users' tokens (``--audience``)
AUDIENCE = "authenticated"
LISTEN = re.compile(r"listening on http://[\d.]+:(\d+)")
PG_SETTINGS = {
    # Durability is not under test; commit latency stays sub-millisecond.
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "wal_sender_timeout": "60s",
    "log_min_messages": "warning",
}
#: a few senders only, so that a user's badge JSON stays the size of a real one
SENDERS = [f"10000000-0000-4000-8000-{i:012x}" for i in range(6)]


def user_id(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012x}"


# -- the service process ------------------------------------------------------------------------


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def metric_in(text: str, name: str) -> float:
    """The value of an unlabelled metric in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


class Service:
    """``python -m replicator serve`` on a port of its own choosing, its log in a file."""

    def __init__(
        self,
        dsn: str,
        workdir: Path,
        env: dict[str, str],
        *,
        python: str = sys.executable,
        profile: Path | None = None,
    ) -> None:
        self.logfile = workdir / "service.log"
        environ = {
            **os.environ,
            "DATABASE_URL": dsn,
            "REPLICATOR_JWT_SECRET": SECRET,
            "REPLICATOR_HOST": "127.0.0.1",
            "REPLICATOR_PORT": "0",
            "REPLICATOR_SLOT": "fanout",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.profile = profile
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        # Its log goes to a file, as a deployment's does: a pipe read by this process would
        # make each log line wait for us, and bill that to the service.
        with self.logfile.open("w") as out:
            self.process = subprocess.Popen(
                [python, *profiler, "-m", "replicator", "serve"],
                env=environ,
                # not the repository: -m would import this tree's package, whichever Python runs
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid
        deadline = time.monotonic() + 60
        while True:
            match = LISTEN.search(self.logfile.read_text())
            if match:
                self.port = int(match.group(1))
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise SystemExit("service did not start:\n" + self.log_tail())
            time.sleep(0.02)
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_ready(self.url):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit("service did not get ready:\n" + self.log_tail())

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return metric_in(response.read().decode(), name)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 30) -> float:
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return time.monotonic() - started


class Deployment:
    """A service someone else runs (``--url``): what the benchmark reads of it comes from its
    ``/metrics`` (the process collector's CPU seconds and resident memory), not from /proc."""

    def __init__(
        self, url: str, dsn: str, metrics_url: str | None, metrics_token: str | None
    ) -> None:
        self.dsn = dsn
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"--url {url!r}: give http://host:port of one instance")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.pid = None
        self.profile = None
        self.logfile = None
        self._metrics = (metrics_url or self.url).rstrip("/") + "/metrics"
        self._token = metrics_token

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not is_ready(self.url):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.url}/readyz did not answer 200 within {timeout:g} s")
            time.sleep(0.5)
        # and has applied what the benchmark just wrote, so that no phase measures its apply
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            wrote = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
        assert wrote is not None
        while self.metric("replicator_applied_lsn") < float(wrote[0]):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.url} did not apply up to the database's LSN in time")
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        request = urllib.request.Request(self._metrics)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            raise SystemExit(
                f"cannot read {self._metrics} ({exc}); with REPLICATOR_ADMIN_ADDRESS give"
                " --metrics-url, with REPLICATOR_METRICS_TOKEN --metrics-token"
            ) from None
        return metric_in(text, name)

    def rss_kb(self) -> int:
        return int(self.metric("process_resident_memory_bytes") // 1024)

    def cpu_s(self) -> float:
        return self.metric("process_cpu_seconds_total")

    def log_tail(self, lines: int = 30) -> str:
        return ""

    def stop(self, timeout: float = 30) -> float:
        return 0.0  # not ours to stop


def warm_up(port: int, count: int = 20, host: str = "127.0.0.1") -> None:
    """Open and close a few streams, so that one-time allocations are not counted per stream."""
    socks = []
    for i in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        token = mint_token(SECRET, user_id(0xFFFF_0000 + i), audience=AUDIENCE)
        sock.sendall(
            f"GET /v1/badges/stream HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        socks.append(sock)
    for sock in socks:
        sock.recv(65536)
        sock.close()


# -- load processes -----------------------------------------------------------------------------


class LoadProcess:
    """One ``fanout_load.py`` holding up to ``count`` streams for users first..first+count-1."""

    def __init__(self, port: int, first: int, count: int, host: str = "127.0.0.1") -> None:
        self.first = first
        self.count = count
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fanout_load.py"),
                "--host",
                host,
                "--port",
                str(port),
                "--first",
                str(first),
                "--count",
                str(count),
            ],
            env={**os.environ, "FANOUT_JWT_SECRET": SECRET, "PYTHONPATH": str(HERE.parent)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._answers.put(json.loads(line))

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit(f"load process {self.process.pid} did not answer") from None

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def ask_all(loads: list[LoadProcess], timeout: float, **command: Any) -> list[dict[str, Any]]:
    for load in loads:
        load.send(**command)
    return [load.answer(timeout) for load in loads]


# -- the writer ---------------------------------------------------------------------------------


@dataclass
class Commit:
    user: int
    #: WAL insert position read inside the transaction: the commit record comes after it,
    #: and before the position read by the next transaction for the same user
    before_lsn: int
    sent: float
    committed: float


def write_changes(
    dsn: str,
    users: int,
    rate: float,
    duration: float,
    writers: int,
    *,
    first: int = 0,
    senders: list[str] | None = None,
) -> list[Commit]:
    """Commit ``rate`` single-row transactions per second for ``duration`` seconds, each a
    message to one of users ``first .. first + users - 1`` from one of ``senders``.

    Each writer thread owns the users whose index is congruent to it modulo ``writers``, so
    one user's transactions are strictly ordered and an event's LSN names its transaction.
    """
    per_writer = int(rate * duration / writers)
    interval = writers / rate
    start = time.monotonic() + 0.2
    deadline = start + duration + 10
    results: list[list[Commit]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        owned = list(range(first + w, first + users, writers))
        chosen = senders or SENDERS
        rng = random.Random(w)
        done = results[w]
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                query = (
                    "INSERT INTO messages (sender_id, recipient_id) VALUES (%s, %s)"
                    " RETURNING pg_current_wal_insert_lsn() - '0/0'::pg_lsn"
                )
                cur = conn.cursor()
                for i in range(per_writer):
                    due = start + (i + w / writers) * interval
                    now = time.monotonic()
                    if now > deadline:
                        break
                    if due > now:
                        time.sleep(due - now)
                    user = rng.choice(owned)
                    sent = time.monotonic()
                    cur.execute(query, (rng.choice(chosen), user_id(user)), prepare=True)
                    row = cur.fetchone()
                    assert row is not None
                    done.append(Commit(user, int(row[0]), sent, time.monotonic()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    if errors:
        raise errors[0]
    return sorted((c for r in results for c in r), key=lambda c: c.sent)


def latencies(commits: list[Commit], events: list[list[Any]]) -> tuple[list[float], int]:
    """Latency in seconds of each event that shows a writer's commit; and how many did not."""
    by_user: dict[int, tuple[list[int], list[float]]] = {}
    for c in sorted(commits, key=lambda c: c.before_lsn):
        lsns, sent = by_user.setdefault(c.user, ([], []))
        lsns.append(c.before_lsn)
        sent.append(c.sent)
    found: list[float] = []
    unmatched = 0
    for user, lsn, received in events:
        entry = by_user.get(user)
        if entry is None:
            unmatched += 1
            continue
        k = bisect.bisect_right(entry[0], lsn) - 1
        if k < 0:
            unmatched += 1
            continue
        found.append(received - entry[1][k])
    return found, unmatched


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the run ------------------------------------------------------------------------------------


@contextmanager
def database(workdir: Path) -> Iterator[str]:
    cluster = PostgresCluster(embedded_bindir(), workdir / "pg", settings=PG_SETTINGS)
    cluster.start()
    try:
        dsn = cluster.dsn()
        migrate(dsn)
        yield dsn
    finally:
        cluster.stop("immediate")


def run(args: argparse.Namespace) -> dict[str, Any]:
    clients: list[int] = sorted(args.clients)
    most = clients[-1]
    workdir = Path(tempfile.mkdtemp(prefix="replicator-fanout-"))
    workdir.chmod(0o755)
    results: dict[str, Any] = {}
    if args.url:
        # someone's own deployment: its database and one of its instances, as they are
        try:
            seed_wide(args.dsn, args.wide)
            results["deployment"] = args.url
            results["ours"] = run_version(args, args.dsn, workdir, "deployment", "", clients)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            remove_rows(args.dsn)
        return results
    versions = [("ours", sys.executable, clients)]
    if args.baseline != "none":
        python, sha = baseline_python(args.baseline)
        versions.append(("baseline", str(python), [most]))
        results["baseline_commit"] = sha
    try:
        with database(workdir) as dsn:
            seed_wide(dsn, args.wide)
            for label, python, sizes in versions:
                results[label] = run_version(args, dsn, workdir, label, python, sizes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def run_version(
    args: argparse.Namespace,
    dsn: str,
    workdir: Path,
    label: str,
    python: str,
    clients: list[int],
) -> dict[str, Any]:
    """Every phase for one version of the service, from its start to its stop."""
    most = clients[-1]
    found: dict[str, Any] = {"streams": []}
    loads: list[LoadProcess] = []
    service: Service | None = None
    env = {
        "REPLICATOR_MAX_STREAMS": str(most + args.stalled + 1000),
        # the stalled streams stay open through their phase (10 per stalled user)
        "REPLICATOR_MAX_STREAMS_PER_USER": "20",
        # every stream comes from this host; none is held back for reconnects
        "REPLICATOR_MAX_STREAMS_PER_ADDRESS": "1000000",
        "REPLICATOR_RESERVED_STREAMS": "0",
        "REPLICATOR_SEND_TIMEOUT_S": "600",
        "REPLICATOR_HEARTBEAT_S": str(args.heartbeat),
        **dict(kv.split("=", 1) for kv in args.service_env),
    }
    log(f"{label}: starting the service ({python})" if not args.url else f"using {args.url}")
    try:
        service = (
            Deployment(args.url, dsn, args.metrics_url, args.metrics_token)  # type: ignore[assignment]
            if args.url
            else Service(
                dsn, workdir, env, python=python, profile=args.profile if label == "ours" else None
            )
        )
        service.wait_ready()
        log(f"{label}: service pid {service.pid} on {service.url}")
        warm_up(service.port, host=service.host)
        # with no stream open, so that the heartbeats of many streams add no noise
        found["wide"] = [wide_phase(args, dsn, service, counterparts) for counterparts in args.wide]
        found["instance"] = instance = instance_phase(args, dsn, service, most)
        time.sleep(args.settle)
        rss0 = service.rss_kb()
        log(f"{label}: service RSS with no stream: {rss0} kB")
        per_load = -(-most // args.load_procs)
        loads = [
            LoadProcess(service.port, first, min(per_load, most - first), service.host)
            for first in range(0, most, per_load)
        ]
        for n in clients:
            found["streams"].append(phase(args, dsn, service, loads, n, rss0, workdir))
        instance["delivery_cpu_ms_per_change"] = round(
            found["streams"][-1]["marginal_cpu_ms_per_change"]
            - instance["instance_cpu_ms_per_change"],
            4,
        )
        log(f"delivering a change to its stream: {instance['delivery_cpu_ms_per_change']} ms")
        if args.stalled and label == "ours":
            log(f"{args.stalled} more streams that never read, for users already streaming")
            stalled, blocked = open_stalled(service, dsn, args.stalled)
            log(f"{blocked} of them blocked in a write")
            try:
                record = phase(args, dsn, service, loads, most, rss0, workdir)
                record["stalled_clients"] = args.stalled
                record["stalled_blocked_at_start"] = blocked
                record["stalled_blocked_at_end"] = int(service.metric("replicator_streams_blocked"))
                found["stalled"] = record
            finally:
                for sock in stalled:
                    sock.close()
        if args.storm and not args.url:
            found["storm"], service = storm_phase(
                args, dsn, service, loads, most, workdir, env, python
            )
        took = service.stop()
        if not args.url:
            log(f"{label}: service with {most} streams stopped in {took:.2f} s")
        found["shutdown_s_at_max"] = round(took, 2)
    finally:
        for load in loads:
            load.stop()
        if service is not None:
            service.stop()
            if args.service_log is not None and service.logfile is not None:
                shutil.copyfile(service.logfile, args.service_log.with_suffix(f".{label}.log"))
    return found


def instance_phase(
    args: argparse.Namespace, dsn: str, service: Service, users: int
) -> dict[str, Any]:
    """What every instance pays for every change (decode, apply), whoever is connected: the
    same changes, before any stream is open; less the idle rate measured just before."""
    cpu_a = service.cpu_s()
    time.sleep(args.wide_idle)
    idle = (service.cpu_s() - cpu_a) / args.wide_idle
    log(f"{args.rate:.0f} changes/s for {args.duration:.0f} s, no stream open")
    cpu_a = service.cpu_s()
    started = time.monotonic()
    commits = write_changes(dsn, users, args.rate, args.duration, args.writers)
    time.sleep(args.drain)
    busy_s = time.monotonic() - started
    cpu_s = service.cpu_s() - cpu_a
    instance = (cpu_s - idle * busy_s) / len(commits) * 1000
    log(f"every instance pays {instance:.3f} ms per change (decode, apply)")
    return {
        "changes": len(commits),
        "instance_cpu_ms_per_change": round(instance, 4),
        "idle_cpu_s_per_s": round(idle, 4),
    }


#: wide users get user indexes from here on, far from the streaming ones
WIDE_BASE = 0x0F00_0000


def wide_user(counterparts: int) -> str:
    return user_id(WIDE_BASE + counterparts)


def wide_sender(i: int) -> str:
    return f"20000000-0000-4000-8000-{i:012x}"


def remove_rows(dsn: str) -> None:
    """Delete what the benchmark wrote: every recipient it uses has the ``user_id`` prefix."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "DELETE FROM messages WHERE recipient_id::text LIKE '00000000-0000-4000-8000-%'"
        )
        log(f"removed the {cur.rowcount} messages the benchmark wrote")


def seed_wide(dsn: str, sizes: list[int]) -> None:
    """One user per size with that many senders of one unread message each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for counterparts in sizes:
            conn.execute(
                "INSERT INTO messages (sender_id, recipient_id)"
                " SELECT ('20000000-0000-4000-8000-' || lpad(to_hex(s), 12, '0'))::uuid, %s"
                " FROM generate_series(0, %s - 1) s",
                (wide_user(counterparts), counterparts),
            )


class StreamReader:
    """One stream on a raw socket, read in a thread: bytes and count of each event."""

    def __init__(self, port: int, user: str, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        token = mint_token(SECRET, user, ttl=3600, audience=AUDIENCE)
        self.sock.sendall(
            f"GET /v1/badges/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        self.sizes: list[int] = []
        self.kinds: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            # chunk framing is left in: a few bytes per event, the same for both versions
            buffer += data
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                name = re.search(rb"event: ([\w-]+)", block)
                if name is not None:
                    self.kinds.append(name.group(1).decode())
                    self.sizes.append(len(block) + 2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def wide_phase(
    args: argparse.Namespace,
    dsn: str,
    service: Service,
    counterparts: int,
) -> dict[str, Any]:
    """Changes to a user with ``counterparts`` senders and one open stream: the bytes of each
    event, and what a change costs."""
    user = wide_user(counterparts)
    reader = StreamReader(service.port, user, service.host)
    deadline = time.monotonic() + 60
    while not reader.kinds and time.monotonic() < deadline:
        time.sleep(0.05)
    first = reader.sizes[0] if reader.sizes else 0
    rate, duration = args.wide_rate, args.wide_changes / args.wide_rate
    # the idle rate right before, subtracted: at a few changes per second it weighs
    cpu_a = service.cpu_s()
    time.sleep(args.wide_idle)
    idle = (service.cpu_s() - cpu_a) / args.wide_idle
    cpu_a = service.cpu_s()
    started = time.monotonic()
    senders = [wide_sender(i) for i in range(0, counterparts, max(1, counterparts // 50))]
    commits = write_changes(
        dsn, 1, rate, duration, 1, first=WIDE_BASE + counterparts, senders=senders
    )
    time.sleep(args.drain)
    busy_s = time.monotonic() - started
    cpu_s = service.cpu_s() - cpu_a
    reader.close()
    later = reader.sizes[1:]
    cpu = (cpu_s - idle * busy_s) / len(commits) * 1000
    record = {
        "counterparts": counterparts,
        "changes": len(commits),
        "events": len(later),
        "event_kinds": sorted(set(reader.kinds[1:])),
        "first_event_bytes": first,
        "mean_event_bytes": round(statistics.mean(later), 1) if later else None,
        "cpu_ms_per_change": round(cpu, 4),
        "changes_per_s": rate,
    }
    log(
        f"user with {counterparts} counterparts: first event {first} bytes, then"
        f" {record['mean_event_bytes']} bytes per event, {cpu:.3f} ms CPU per change"
    )
    return record


def storm_phase(
    args: argparse.Namespace,
    dsn: str,
    service: Service,
    loads: list[LoadProcess],
    n: int,
    workdir: Path,
    env: dict[str, str],
    python: str,
) -> tuple[dict[str, Any], Service]:
    """Restart the service under ``n`` open streams that come back as badges.js does; how long
    until each has the current state again, against how long its retry waits alone take."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        target = int(row[0])
    ask_all(loads, 30, cmd="reconnect", target=target)
    log(f"N={n}: restarting the service; every stream comes back as badges.js would")
    stopped_at, stopped_wall = time.monotonic(), time.time()
    service.stop()
    profile = service.profile and service.profile.with_name(service.profile.name + ".restarted")
    restarted = Service(
        dsn, workdir, {**env, "REPLICATOR_PORT": str(service.port)}, python=python, profile=profile
    )
    listening_at = time.monotonic()
    cpu_a = restarted.cpu_s()
    restarted.wait_ready(timeout=120)
    ready_at = time.monotonic()
    paths = [workdir / f"storm-{i}.json" for i in range(len(loads))]
    for load, path in zip(loads, paths, strict=True):
        load.send(cmd="storm", path=str(path), timeout=args.storm_timeout)
    answers = [load.answer(args.storm_timeout + 60) for load in loads]
    cpu_s = restarted.cpu_s() - cpu_a
    # when the new service went live, from its own log (polling /readyz waits in the crowd)
    live = re.search(r"^(\S+ [\d:]+),(\d+) .*replication stream live", restarted.log_text(), re.M)
    assert live is not None, "the restarted service never went live"
    live_wall = time.mktime(time.strptime(live.group(1), "%Y-%m-%d %H:%M:%S"))
    live_at = stopped_at + live_wall + int(live.group(2)) / 1000 - stopped_wall
    reached: list[float] = []
    bounds: list[float] = []
    #: from the attempt that got through to the current state: the wait the service added
    served: list[float] = []
    #: when the attempt that got through began
    arrived: list[float] = []
    attempts = 0
    for path in paths:
        data = json.loads(path.read_text())
        reached += [float(t) for t in data["reached"].values()]
        for index, t in data["reached"].items():
            tries = [a for a in data["attempts"].get(index, []) if a <= t]
            if tries:
                served.append(float(t) - tries[-1])
                arrived.append(tries[-1] - stopped_at)
        for tries in data["attempts"].values():
            attempts += len(tries)
            after = [t for t in tries if t >= listening_at]
            if after:
                # the first attempt the new service could have answered, had it been free
                bounds.append(max(live_at, after[0]))
    got = sum(a["reached"] for a in answers)
    back = sorted(t - stopped_at for t in reached)
    record = {
        "clients": n,
        "reached": got,
        "restart_listening_s": round(listening_at - stopped_at, 2),
        "restart_live_s": round(live_at - stopped_at, 2),
        "restart_readyz_s": round(ready_at - stopped_at, 2),
        "all_current_s": round(back[-1], 2) if back else None,
        "p50_current_s": round(percentile(back, 0.5), 2),
        "p99_current_s": round(percentile(back, 0.99), 2),
        "retry_bound_s": round(max(bounds) - stopped_at, 2) if bounds else None,
        "p50_served_ms": round(percentile(served, 0.5) * 1000, 1) if served else None,
        "p99_served_ms": round(percentile(served, 0.99) * 1000, 1) if served else None,
        # each a percentile of the clients, 0 % to 100 % in steps of 2 %: for the plot
        "current_curve_s": [round(percentile(back, q / 50), 3) for q in range(51)],
        "arrival_curve_s": [round(percentile(arrived, q / 50), 3) for q in range(51)],
        "attempts": attempts,
        "cpu_s": round(cpu_s, 2),
        "cpu_ms_per_reconnect": round(cpu_s / max(1, got) * 1000, 3),
    }
    log(
        f"N={n}: {got} of {n} streams current again {record['all_current_s']} s after the"
        f" restart began (p50 {record['p50_current_s']} s); the retry waits alone allow"
        f" {record['retry_bound_s']} s; the service was listening after"
        f" {record['restart_listening_s']} s and live after {record['restart_live_s']} s;"
        f" from its attempt to the current state p50 {record['p50_served_ms']} ms, p99"
        f" {record['p99_served_ms']} ms; {record['cpu_ms_per_reconnect']} ms CPU per reconnect"
    )
    return record, restarted


STALLED_USERS = 100
#: distinct senders of each stalled user: its badge events weigh ~20 kB, as a busy inbox's do
STALLED_SENDERS = 500


def open_stalled(service: Service, dsn: str, count: int) -> tuple[list[socket.socket], int]:
    """``count`` streams of users 0..99 that are opened and then never read from again.

    The users get a large inbox and a burst of changes first, so the streams really are stuck
    in a write (the service's send buffer is full) when the measured phase starts. Returns the
    sockets and how many streams the service reports blocked.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO messages (sender_id, recipient_id)"
            " SELECT gen_random_uuid(), ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))"
            "::uuid FROM generate_series(0, %s) u, generate_series(1, %s)",
            (STALLED_USERS - 1, STALLED_SENDERS),
        )
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((service.host, service.port))
        token = mint_token(SECRET, user_id(i % STALLED_USERS), ttl=6 * 3600, audience=AUDIENCE)
        # whole states (a version without changes ignores the parameter): ~20 kB per event
        sock.sendall(
            f"GET /v1/badges/stream?events=full HTTP/1.1\r\nHost: {service.host}:{service.port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        socks.append(sock)
    blocked = 0
    for _ in range(5):
        with psycopg.connect(dsn, autocommit=True) as conn:
            # rounds of one commit per stalled user, each an event of ~20 kB for each of its
            # streams; paced, so that streams send each state rather than skip to the last
            conn.execute(
                "DO $$ BEGIN FOR i IN 1..20 LOOP FOR u IN 0.."
                + str(STALLED_USERS - 1)
                + " LOOP INSERT INTO messages (sender_id, recipient_id) VALUES"
                " ('10000000-0000-4000-8000-000000000000',"
                " ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))::uuid);"
                " COMMIT; END LOOP; PERFORM pg_sleep(0.1); END LOOP; END $$"
            )
        time.sleep(1)
        blocked = int(service.metric("replicator_streams_blocked"))
        log(f"{blocked} of {count} streams that never read are blocked in a write")
        if blocked >= count * 0.95:
            break
    return socks, blocked


def phase(
    args: argparse.Namespace,
    dsn: str,
    service: Service,
    loads: list[LoadProcess],
    n: int,
    rss0: int,
    workdir: Path,
) -> dict[str, Any]:
    log(f"N={n}: opening streams")
    started = time.monotonic()
    for load in loads:
        load.send(cmd="open", total=max(0, min(load.count, n - load.first)))
    answers = [load.answer(600) for load in loads]
    opened = sum(a["open"] for a in answers)
    failed = sum(a["failed"] for a in answers)
    log(f"N={n}: {opened} streams open ({failed} failed) in {time.monotonic() - started:.1f} s")
    if opened < n:
        raise SystemExit(f"only {opened} of {n} streams opened:\n" + service.log_tail())

    time.sleep(args.settle)
    rss = service.rss_kb()
    ask_all(loads, 30, cmd="record")
    cpu_a = service.cpu_s()
    time.sleep(args.idle)
    idle_cpu = (service.cpu_s() - cpu_a) / args.idle
    idle = ask_all(loads, 60, cmd="collect", path=str(workdir / "idle.json"))
    heartbeats = sum(a["heartbeats"] for a in idle)
    log(
        f"N={n}: RSS {rss} kB ({(rss - rss0) / n:.1f} kB/stream), idle CPU {idle_cpu * 100:.1f} %,"
        f" {heartbeats / args.idle:.0f} heartbeats/s"
    )

    ask_all(loads, 30, cmd="record")
    log(f"N={n}: writing {args.rate:.0f} changes/s for {args.duration:.0f} s")
    cpu_a = service.cpu_s()
    write_started = time.monotonic()
    commits = write_changes(dsn, n, args.rate, args.duration, args.writers)
    write_s = time.monotonic() - write_started
    time.sleep(args.drain)
    cpu_s = service.cpu_s() - cpu_a
    busy_s = write_s + args.drain
    events: list[list[Any]] = []
    for i, load in enumerate(loads):
        path = workdir / f"events-{i}.json"
        load.send(cmd="collect", path=str(path))
        load.answer(120)
        events.extend(json.loads(path.read_text()))
    found, unmatched = latencies(commits, events)
    span = commits[-1].sent - commits[0].sent if len(commits) > 1 else write_s
    per_1000 = cpu_s / len(commits) * 1000
    marginal = (cpu_s - idle_cpu * busy_s) / len(commits) * 1000
    record = {
        "clients": n,
        "changes_per_s": round(len(commits) / span, 1),
        "p50_ms": round(percentile(found, 0.50) * 1000, 2),
        "p95_ms": round(percentile(found, 0.95) * 1000, 2),
        "p99_ms": round(percentile(found, 0.99) * 1000, 2),
        "max_ms": round(max(found, default=float("nan")) * 1000, 2),
        "events_per_s": round(len(found) / span, 1),
        "rss_per_stream_kb": round((rss - rss0) / n, 2),
        "cpu_ms_per_change": round(per_1000, 4),
        "marginal_cpu_ms_per_change": round(marginal, 4),
        "idle_cpu_s_per_s": round(idle_cpu, 4),
        "heartbeats_per_s": round(heartbeats / args.idle, 1),
        "changes": len(commits),
        "events": len(found),
        "events_unmatched": unmatched,
        "rss_kb": rss,
        "rss_kb_no_streams": rss0,
        "target_rate": args.rate,
        "duration_s": args.duration,
        "heartbeat_s": args.heartbeat,
    }
    log(
        f"N={n}: {record['changes_per_s']} changes/s, {len(found)} events"
        f" ({unmatched} unmatched), p50 {record['p50_ms']} ms, p95 {record['p95_ms']} ms,"
        f" p99 {record['p99_ms']} ms, {per_1000:.3f} CPU ms per change"
        f" ({marginal:.3f} marginal)"
    )
    return record


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = results["ours"]
    records = ours["streams"]
    base = results.get("baseline")
    n = [r["clients"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    (latency, cost), (wide, storm) = axes
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        latency.plot(n, [r[key] for r in records], style, label=key.removesuffix("_ms"))
    stalled = ours.get("stalled")
    if stalled:
        latency.plot(
            [stalled["clients"]],
            [stalled["p99_ms"]],
            "kx",
            markersize=9,
            label=f"p99 with {stalled['stalled_clients']} non-reading streams",
        )
    if base:
        b = base["streams"][-1]
        latency.plot([b["clients"]], [b["p99_ms"]], "rv", label="p99, baseline")
    latency.axhline(100, color="grey", linestyle="--", linewidth=0.8, label="p99 target")
    latency.set_xscale("log")
    latency.set_yscale("log")
    latency.set_xlabel("connected SSE streams")
    latency.set_ylabel("commit -> client latency (ms)")
    latency.set_title(f"latency at {records[0]['target_rate']:.0f} changes/s")
    latency.legend(fontsize=7)
    latency.grid(True, which="both", alpha=0.3)

    cost.plot(n, [r["cpu_ms_per_change"] for r in records], "s-", label="all service CPU")
    cost.plot(n, [r["marginal_cpu_ms_per_change"] for r in records], "s:", label="less idle CPU")
    instance = ours["instance"]["instance_cpu_ms_per_change"]
    cost.axhline(
        instance, color="tab:green", linewidth=0.8, label="decode + apply (every instance)"
    )
    if base:
        b = base["streams"][-1]
        cost.plot([b["clients"]], [b["cpu_ms_per_change"]], "rv", label="all CPU, baseline")
    cost.axhline(0.12, color="grey", linestyle="--", linewidth=0.8, label="0.12 ms (target)")
    cost.set_xscale("log")
    cost.set_ylim(bottom=0)
    cost.set_xlabel("connected SSE streams")
    cost.set_ylabel("service CPU ms per change")
    cost.set_title("CPU per change")
    cost.legend(fontsize=7)
    cost.grid(True, which="both", alpha=0.3)

    for label, found, style in (("this version", ours, "o-"), ("baseline", base, "s:")):
        if not found:
            continue
        rows = found["wide"]
        wide.plot(
            [r["counterparts"] for r in rows],
            [r["mean_event_bytes"] for r in rows],
            style,
            label=f"bytes per event, {label}",
        )
    rows = ours["wide"]
    # the whole state, for scale: what every event would weigh without badges-change
    wide.plot(
        [r["counterparts"] for r in rows],
        [r["first_event_bytes"] for r in rows],
        "^--",
        color="grey",
        label="the whole state (first event)",
    )
    wide.set_xscale("log")
    wide.set_yscale("log")
    wide.set_xlabel("counterparts of the user")
    wide.set_ylabel("bytes per event after a change")
    wide.set_title("events that cost what changed")
    wide.legend(fontsize=7)
    wide.grid(True, which="both", alpha=0.3)

    shares = [q * 2 for q in range(51)]
    for label, found, color in (("this version", ours, "#2b6cb0"), ("baseline", base, "#a0aec0")):
        st = (found or {}).get("storm")
        if not st or "current_curve_s" not in st:
            continue
        storm.plot(
            st["current_curve_s"], shares, color=color, lw=3, label=f"{label}: current again"
        )
        # drawn over it: where the two lines meet, no client waited for the service
        storm.plot(
            st["arrival_curve_s"],
            shares,
            color="black" if found is ours else color,
            ls="--",
            lw=1,
            label=f"{label}: came back",
        )
        storm.axvline(st["restart_live_s"], color=color, ls=":", lw=1)
    storm.set_xlabel("seconds after the restart began (dotted: the service live)")
    storm.set_ylabel("% of the clients")
    storm.set_title(f"reconnect storm, {records[-1]['clients']} clients")
    storm.legend(fontsize=7)
    storm.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    head_line = (
        f"{'version':>9} {'clients':>8} {'changes/s':>9} {'p50 ms':>7} {'p95 ms':>7}"
        f" {'p99 ms':>7} {'events/s':>8} {'kB/stream':>9} {'CPU ms':>7} {'marginal':>8}"
        f" {'idle CPU':>8}"
    )
    lines = [head_line]
    for label in ("ours", "baseline"):
        found = results.get(label)
        if not found:
            continue
        rows = list(found["streams"]) + ([found["stalled"]] if found.get("stalled") else [])
        for r in rows:
            clients = f"{r['clients']}" + ("+stall" if r.get("stalled_clients") else "")
            lines.append(
                f"{label:>9} {clients:>8} {r['changes_per_s']:>9.0f} {r['p50_ms']:>7.1f}"
                f" {r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['events_per_s']:>8.0f}"
                f" {r['rss_per_stream_kb']:>9.1f} {r['cpu_ms_per_change']:>7.3f}"
                f" {r['marginal_cpu_ms_per_change']:>8.3f} {r['idle_cpu_s_per_s'] * 100:>7.1f}%"
            )
    for label in ("ours", "baseline"):
        found = results.get(label)
        if not found:
            continue
        inst = found["instance"]
        lines.append(
            f"{label}: every instance pays {inst['instance_cpu_ms_per_change']:.3f} ms per change"
            f" (decode, apply); delivery to its streams {inst['delivery_cpu_ms_per_change']:.3f} ms"
        )
        for w in found["wide"]:
            lines.append(
                f"{label}: user with {w['counterparts']:>6} counterparts:"
                f" {w['mean_event_bytes']} bytes per event, {w['cpu_ms_per_change']:.3f} ms"
                f" CPU per change"
            )
        st = found.get("storm")
        if st:
            lines.append(
                f"{label}: restart under {st['clients']} streams: all current after"
                f" {st['all_current_s']} s (p50 {st['p50_current_s']} s), retry bound"
                f" {st['retry_bound_s']} s, service live after {st['restart_live_s']} s,"
                f" from each attempt to the current state p99 {st.get('p99_served_ms')} ms,"
                f" {st['cpu_ms_per_reconnect']} ms CPU per reconnect"
            )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[str]:
    """The issues' targets, each with the figure measured against it."""
    ours = results["ours"]
    records = ours["streams"]
    by_n = {r["clients"]: r for r in records}
    most = by_n[max(by_n)]
    worst = max(records, key=lambda r: r["p99_ms"])
    lines = [
        f"{most['clients']} concurrent streams held by one process: yes",
        f"p99 commit -> client < 100 ms at {most['target_rate']:.0f} changes/s:"
        f" worst {worst['p99_ms']:.1f} ms (at {worst['clients']} streams)",
        f"RSS per idle stream < 20 kB: {most['rss_per_stream_kb']:.1f} kB"
        f" (at {most['clients']} streams)",
        f"CPU per change at {most['clients']} streams <= 0.12 ms:"
        f" {most['cpu_ms_per_change']:.3f} ms",
    ]
    base = results.get("baseline")
    if base:
        b = base["streams"][-1]
        lines.append(
            f"  the baseline ({results['baseline_commit']}) in the same run:"
            f" {b['cpu_ms_per_change']:.3f} ms, p99 {b['p99_ms']:.1f} ms"
        )
    least = by_n[min(by_n)]
    if least is not most:
        raw = most["cpu_ms_per_change"] / least["cpu_ms_per_change"]
        marginal = most["marginal_cpu_ms_per_change"] / least["marginal_cpu_ms_per_change"]
        lines.append(
            f"CPU per change at {most['clients']} streams <= 1.2 x at {least['clients']}:"
            f" {raw:.2f} x (all CPU), {marginal:.2f} x (marginal)"
        )
    stalled = ours.get("stalled")
    if stalled:
        lines.append(
            f"with {stalled['stalled_clients']} more streams that never read"
            f" ({stalled['stalled_blocked_at_start']} blocked in a write): p99"
            f" {stalled['p99_ms']:.1f} ms for the {stalled['clients']} reading streams"
            f" (without them {by_n[stalled['clients']]['p99_ms']:.1f} ms)"
        )
    storm = ours.get("storm")
    if storm and storm.get("p99_served_ms") is not None:
        lines.append(
            f"reconnect storm of {storm['clients']} bounded by the retry, not the service:"
            f" all current {storm['all_current_s']} s after the restart began, the retry"
            f" waits alone {storm['retry_bound_s']} s; from its attempt to the current state"
            f" p99 {storm['p99_served_ms']} ms"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--clients",
        type=counts,
        default=[100, 1000, 5000, 10_000],
        help="comma-separated stream counts (default 100,1000,5000,10000)",
    )
    parser.add_argument("--rate", type=float, default=1000, help="changes per second")
    parser.add_argument("--duration", type=float, default=30, help="seconds of writing per N")
    parser.add_argument("--idle", type=float, default=15, help="seconds of idle CPU per N")
    parser.add_argument("--settle", type=float, default=3, help="seconds before reading RSS")
    parser.add_argument("--drain", type=float, default=1.5, help="seconds after the last write")
    parser.add_argument("--heartbeat", type=float, default=15, help="REPLICATOR_HEARTBEAT_S")
    parser.add_argument("--writers", type=int, default=4, help="writer connections")
    parser.add_argument("--load-procs", type=int, default=2, help="load processes")
    parser.add_argument(
        "--stalled",
        type=int,
        default=1000,
        help="then this many more streams that never read, and the largest N again (0: skip)",
    )
    parser.add_argument(
        "--wide",
        type=counts,
        default=[10, 1000, 20_000],
        help="counterparts of the wide users (default 10,1000,20000)",
    )
    parser.add_argument("--wide-changes", type=int, default=400, help="changes per wide user")
    parser.add_argument("--wide-rate", type=float, default=40, help="changes/s to a wide user")
    parser.add_argument("--wide-idle", type=float, default=5, help="seconds of idle CPU before")
    parser.add_argument(
        "--storm", type=int, default=1, help="restart the service under the streams (0: skip)"
    )
    parser.add_argument("--storm-timeout", type=float, default=180, help="seconds at most")
    comparison_arguments(parser, "git commit measured at the largest N in the same run")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service (repeatable)",
    )
    parser.add_argument("--service-log", type=Path, help="keep the service's log here")
    parser.add_argument(
        "--profile", type=Path, help="run the service under cProfile, its stats written here"
    )
    parser.add_argument(
        "--url",
        help="measure a running deployment instead: http://host:port of one instance (then"
        " --dsn and --secret are needed; the storm and the baseline are skipped). It writes"
        " messages to recipients 00000000-0000-4000-8000-* and deletes them at the end: use a"
        " staging database with the default schema",
    )
    parser.add_argument("--dsn", help="with --url: the deployment's database (its primary)")
    parser.add_argument(
        "--secret",
        help="with --url: an HS256 secret the deployment accepts (REPLICATOR_JWT_SECRET), to"
        " sign the load's user tokens",
    )
    parser.add_argument(
        "--audience",
        default="authenticated",
        help="with --url: the audience its tokens must name (REPLICATOR_JWT_AUDIENCE)",
    )
    parser.add_argument(
        "--metrics-url", help="with --url: the admin listener's URL, if /metrics is there"
    )
    parser.add_argument("--metrics-token", help="with --url: REPLICATOR_METRICS_TOKEN")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument(
        "--quick", action="store_true", help="100 and 1000 streams, short phases (a smoke run)"
    )
    args = parser.parse_args()
    if args.url:
        if not args.dsn or not args.secret:
            parser.error("--url needs --dsn (the database) and --secret (to sign user tokens)")
        global SECRET, AUDIENCE
        SECRET, AUDIENCE = args.secret, args.audience
        os.environ["FANOUT_JWT_SECRET"] = args.secret
        os.environ["FANOUT_JWT_AUDIENCE"] = args.audience
        args.baseline = "none"
    if args.quick:
        args.clients = [100, 1000]
        args.duration = min(args.duration, 5)
        args.idle = min(args.idle, 3)
        args.settle = min(args.settle, 1)
        args.stalled = min(args.stalled, 100)
        args.wide_changes = min(args.wide_changes, 40)
    load = wait_for_quiet(args.max_load, 900)
    log(f"load average {load}")
    results = run(args)
    results.update(
        command="python benchmarks/fanout.py " + " ".join(sys.argv[1:]),
        version=head(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        load_average_before=load,
        load_average_after=load_average(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    # A smoke run never replaces the full results.
    stem = ("fanout-deployment" if args.url else "fanout") + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    title = (
        f"replicator fan-out, {os.cpu_count()} cores, Python {platform.python_version()}"
        + (
            f"; the deployment at {args.url}"
            if args.url
            else f", heartbeat {args.heartbeat:g} s; this version {results['version']}"
        )
        + (f", baseline {results['baseline_commit']}" if "baseline_commit" in results else "")
    )
    plot(results, args.out / f"{stem}.png", title)
    print()
    print(table(results))
    print()
    print("\n".join(targets(results)))
    print(f"\nwrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
