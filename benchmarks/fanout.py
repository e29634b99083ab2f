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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from replicator.ops.migrate import migrate  # noqa: E402
from replicator.runtime.cluster import PostgresCluster, embedded_bindir  # noqa: E402
from replicator.web.auth import mint_token  # noqa: E402

RESULTS = HERE / "results"
SECRET = "fanout-benchmark-secret-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the service process ------------------------------------------------------------------------


class Service:
    """``python -m replicator serve`` on a port of its own choosing, its log in a file."""

    def __init__(self, dsn: str, workdir: Path, env: dict[str, str]) -> None:
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", "replicator", "serve"],
            env=environ,
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.pid = self.process.pid
        self._port: queue.Queue[int] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.port = self._port.get(timeout=60)
        except queue.Empty:
            self.process.kill()
            raise SystemExit("service did not start:\n" + self.log_tail()) from None
        self.url = f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.process.stdout is not None
        with self.logfile.open("w") as out:
            for line in self.process.stdout:
                out.write(line)
                out.flush()
                match = LISTEN.search(line)
                if match:
                    self._port.put(int(match.group(1)))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit("service did not get ready:\n" + self.log_tail())

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of the whole line, in clock ticks
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

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


def warm_up(port: int, count: int = 20) -> None:
    """Open and close a few streams, so that one-time allocations are not counted per stream."""
    socks = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        token = mint_token(SECRET, user_id(0xFFFF_0000 + i))
        sock.sendall(
            f"GET /v1/badges/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        socks.append(sock)
    for sock in socks:
        sock.recv(65536)
        sock.close()


# -- load processes -----------------------------------------------------------------------------


class LoadProcess:
    """One ``fanout_load.py`` holding up to ``count`` streams for users first..first+count-1."""

    def __init__(self, port: int, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fanout_load.py"),
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


def write_changes(dsn: str, users: int, rate: float, duration: float, writers: int) -> list[Commit]:
    """Commit ``rate`` single-row transactions per second for ``duration`` seconds.

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
        owned = list(range(w, users, writers))
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
                    cur.execute(query, (rng.choice(SENDERS), user_id(user)), prepare=True)
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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    clients: list[int] = sorted(args.clients)
    most = clients[-1]
    workdir = Path(tempfile.mkdtemp(prefix="replicator-fanout-"))
    workdir.chmod(0o755)
    records: list[dict[str, Any]] = []
    loads: list[LoadProcess] = []
    service: Service | None = None
    try:
        with database(workdir) as dsn:
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
            service = Service(dsn, workdir, env)
            service.wait_ready()
            log(f"service pid {service.pid} on {service.url}")
            warm_up(service.port)
            time.sleep(args.settle)
            rss0 = service.rss_kb()
            log(f"service RSS with no stream: {rss0} kB")
            per_load = -(-most // args.load_procs)
            loads = [
                LoadProcess(service.port, i * per_load, min(per_load, most - i * per_load))
                for i in range(args.load_procs)
            ]
            for n in clients:
                records.append(phase(args, dsn, service, loads, n, rss0, workdir))
            if args.stalled:
                log(f"{args.stalled} more streams that never read, for users already streaming")
                stalled, blocked = open_stalled(service, dsn, args.stalled)
                log(f"{blocked} of them blocked in a write")
                try:
                    record = phase(args, dsn, service, loads, most, rss0, workdir)
                    record["stalled_clients"] = args.stalled
                    record["stalled_blocked_at_start"] = blocked
                    record["stalled_blocked_at_end"] = int(
                        service.metric("replicator_streams_blocked")
                    )
                    records.append(record)
                finally:
                    for sock in stalled:
                        sock.close()
            took = service.stop()
            log(f"service with {most} streams stopped in {took:.2f} s")
            for record in records:
                record["shutdown_s_at_max"] = round(took, 2)
    finally:
        for load in loads:
            load.stop()
        if service is not None:
            service.stop()
            if args.service_log is not None:
                shutil.copyfile(service.logfile, args.service_log)
        shutil.rmtree(workdir, ignore_errors=True)
    return records


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
        sock.connect(("127.0.0.1", service.port))
        token = mint_token(SECRET, user_id(i % STALLED_USERS), ttl=6 * 3600)
        sock.sendall(
            f"GET /v1/badges/stream HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n"
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
        "cpu_s_per_1000_changes": round(per_1000, 4),
        "marginal_cpu_s_per_1000_changes": round(marginal, 4),
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
        f" p99 {record['p99_ms']} ms, {per_1000:.3f} CPU s/1000 changes"
        f" ({marginal:.3f} marginal)"
    )
    return record


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stalled = [r for r in records if r.get("stalled_clients")]
    records = [r for r in records if not r.get("stalled_clients")]
    n = [r["clients"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        left.plot(n, [r[key] for r in records], style, label=key.removesuffix("_ms"))
    for r in stalled:
        left.plot(
            [r["clients"]],
            [r["p99_ms"]],
            "kx",
            markersize=9,
            label=f"p99 with {r['stalled_clients']} non-reading streams",
        )
    left.axhline(100, color="grey", linestyle="--", linewidth=0.8, label="p99 target")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("connected SSE streams")
    left.set_ylabel("commit -> client latency (ms)")
    left.set_title(f"latency at {records[0]['target_rate']:.0f} changes/s")
    left.legend()
    left.grid(True, which="both", alpha=0.3)

    right.plot(n, [r["rss_per_stream_kb"] for r in records], "o-", color="tab:green")
    right.axhline(20, color="tab:green", linestyle="--", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("connected SSE streams")
    right.set_ylabel("RSS per idle stream (kB)", color="tab:green")
    right.set_ylim(bottom=0)
    cpu = right.twinx()
    cpu.plot(n, [r["cpu_s_per_1000_changes"] * 1000 for r in records], "s-", color="tab:red")
    cpu.plot(
        n,
        [r["marginal_cpu_s_per_1000_changes"] * 1000 for r in records],
        "s:",
        color="tab:red",
    )
    cpu.set_ylabel("server CPU ms per 1000 changes (dotted: marginal)", color="tab:red")
    cpu.set_ylim(bottom=0)
    right.set_title("memory and CPU")
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'clients':>8} {'changes/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
        f" {'events/s':>8} {'kB/stream':>9} {'CPU s/1k':>8} {'marginal':>8} {'idle CPU':>8}"
    )
    lines = [head]
    for r in records:
        label = f"{r['clients']}" + ("+stall" if r.get("stalled_clients") else "")
        lines.append(
            f"{label:>8} {r['changes_per_s']:>9.0f} {r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f}"
            f" {r['p99_ms']:>7.1f} {r['events_per_s']:>8.0f} {r['rss_per_stream_kb']:>9.1f}"
            f" {r['cpu_s_per_1000_changes']:>8.3f} {r['marginal_cpu_s_per_1000_changes']:>8.3f}"
            f" {r['idle_cpu_s_per_s'] * 100:>7.1f}%"
        )
    return "\n".join(lines)


def targets(records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with the figure measured against it."""
    stalled = [r for r in records if r.get("stalled_clients")]
    records = [r for r in records if not r.get("stalled_clients")]
    by_n = {r["clients"]: r for r in records}
    most = by_n[max(by_n)]
    worst = max(records, key=lambda r: r["p99_ms"])
    lines = [
        f"{most['clients']} concurrent streams held by one process: yes",
        f"p99 commit -> client < 100 ms at {most['target_rate']:.0f} changes/s:"
        f" worst {worst['p99_ms']:.1f} ms (at {worst['clients']} streams)",
        f"RSS per idle stream < 20 kB: {most['rss_per_stream_kb']:.1f} kB"
        f" (at {most['clients']} streams)",
    ]
    least = by_n[min(by_n)]
    if least is not most:
        raw = most["cpu_s_per_1000_changes"] / least["cpu_s_per_1000_changes"]
        marginal = (
            most["marginal_cpu_s_per_1000_changes"] / least["marginal_cpu_s_per_1000_changes"]
        )
        lines.append(
            f"CPU per change at {most['clients']} streams <= 1.2 x at {least['clients']}:"
            f" {raw:.2f} x (all CPU), {marginal:.2f} x (marginal)"
        )
    for r in stalled:
        lines.append(
            f"with {r['stalled_clients']} more streams that never read"
            f" ({r['stalled_blocked_at_start']} blocked in a write): p99"
            f" {r['p99_ms']:.1f} ms for the {r['clients']} reading streams"
            f" (without them {by_n[r['clients']]['p99_ms']:.1f} ms)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
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
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service (repeatable)",
    )
    parser.add_argument("--service-log", type=Path, help="keep the service's log here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument(
        "--quick", action="store_true", help="100 and 1000 streams, short phases (a smoke run)"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients = [100, 1000]
        args.duration = min(args.duration, 5)
        args.idle = min(args.idle, 3)
        args.settle = min(args.settle, 1)
        args.stalled = min(args.stalled, 100)
    command = "python benchmarks/fanout.py " + " ".join(sys.argv[1:])
    records = run(args)
    for record in records:
        record["command"] = command.strip()
        record["cpus"] = os.cpu_count()
        record["python"] = platform.python_version()
    args.out.mkdir(parents=True, exist_ok=True)
    # A smoke run never replaces the full results.
    stem = "fanout-quick" if args.quick else "fanout"
    (args.out / f"{stem}.json").write_text(json.dumps(records, indent=2) + "\n")
    title = (
        f"replicator fan-out, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" heartbeat {args.heartbeat:g} s"
    )
    plot(records, args.out / f"{stem}.png", title)
    print()
    print(table(records))
    print()
    print("\n".join(targets(records)))
    print(f"\nwrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
