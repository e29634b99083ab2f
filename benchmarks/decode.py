"""Decode benchmark: our consumer against pg_recvlogical and the server's own pgoutput decoding.

One throwaway embedded PostgreSQL 18. For each workload (200,000 rows in one transaction;
20,000 one-row transactions) the slots are created first, the rows are written once, and the
same changes are then consumed in four ways:

- ``ours``: ``Consumer``'s callbacks fed by the replication connection, on the event loop the
  service uses, from opening the connection until the badge state has applied the last commit;
- ``pg_recvlogical``: PostgreSQL's C client from the same bin directory, writing to /dev/null,
  with ``--endpos`` at the end of the last commit (so its wall time ends there);
- ``server``: ``pg_logical_slot_peek_binary_changes`` on its own slot: decoding alone, with no
  client and no network;
- ``null client``: our replication loop with a callback that drops every message. It is no
  faster than ``ours``: the walsender, not the client, sets the pace (a client that drains the
  socket at once and sleeps even slows it down, as every send then has to wake it up).

Each measurement is repeated (``--repeat``, on a fresh slot each time for the streaming
clients, interleaved so that a noisy moment hits all of them) and the best run is reported.
Writes ``benchmarks/results/decode.json`` and ``decode.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from replicator.ops.migrate import migrate  # noqa: E402
from replicator.pg.lsn import format_lsn, parse_lsn  # noqa: E402
from replicator.pg.walsender import ReplicationConnection  # noqa: E402
from replicator.pipeline.consumer import Consumer, ConsumerOptions  # noqa: E402
from replicator.runtime.cluster import PostgresCluster, embedded_bindir  # noqa: E402
from replicator.runtime.service import event_loop_options  # noqa: E402

RESULTS = HERE / "results"
PUBLICATION = "badges"
#: what the consumer asks for at START_REPLICATION
STREAM_OPTIONS = {"proto_version": "1", "publication_names": PUBLICATION, "messages": "true"}
PG_SETTINGS = {
    # Durability is not under test, and checkpoints in the middle of a run only add noise.
    "fsync": "off",
    "full_page_writes": "off",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
    "max_replication_slots": "60",
    "max_wal_senders": "20",
    "wal_sender_timeout": "120s",
    "log_min_messages": "warning",
    "autovacuum": "off",
}
USERS = [f"00000000-0000-4000-8000-{i:012x}" for i in range(50)]
PEEK = (
    "SELECT count(*), max(lsn)::text FROM pg_logical_slot_peek_binary_changes("
    "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s)"
)
CLIENTS = ("ours", "pg_recvlogical", "server", "null_client")
LABELS = {
    "ours": "replicator (ours)",
    "pg_recvlogical": "pg_recvlogical",
    "server": "server-side decode (peek)",
    "null_client": "null client (drops every message)",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    rows: int
    sql: str


def workloads(rows: int, transactions: int) -> list[Workload]:
    users = "ARRAY[" + ",".join(f"'{u}'::uuid" for u in USERS) + "]"
    n = len(USERS)
    # every seventh message is already read, so both branches of the badge rule run
    values = (
        f"({users})[1 + g % {n}], ({users})[1 + (g / {n}) % {n}],"
        " 'benchmark message number ' || g, CASE WHEN g % 7 = 3 THEN now() END"
    )
    insert = "INSERT INTO messages (sender_id, recipient_id, body, read_at)"
    return [
        Workload(
            "one_transaction",
            f"{rows:,} rows in one transaction",
            rows,
            f"{insert} SELECT {values} FROM generate_series(1, {rows}) g",
        ),
        Workload(
            "one_row_transactions",
            f"{transactions:,} one-row transactions",
            transactions,
            f"DO $$ BEGIN FOR g IN 1..{transactions} LOOP"
            f" {insert} SELECT {values}; COMMIT; END LOOP; END $$",
        ),
    ]


@dataclass
class Result:
    workload: Workload
    seconds: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLIENTS})
    #: CPU time of our process during each of our runs
    ours_cpu: list[float] = field(default_factory=list)

    def rate(self, client: str) -> float:
        return self.workload.rows / min(self.seconds[client])

    def as_json(self) -> dict[str, Any]:
        ours = self.rate("ours")
        best = self.seconds["ours"].index(min(self.seconds["ours"]))
        return {
            "title": self.workload.title,
            "rows": self.workload.rows,
            "ours_rows_per_s": round(ours),
            "pg_recvlogical_rows_per_s": round(self.rate("pg_recvlogical")),
            "server_rows_per_s": round(self.rate("server")),
            "ratio_vs_pg_recvlogical": round(ours / self.rate("pg_recvlogical"), 3),
            "ratio_vs_server": round(ours / self.rate("server"), 3),
            "null_client_rows_per_s": round(self.rate("null_client")),
            "ratio_vs_null_client": round(ours / self.rate("null_client"), 3),
            "ours_cpu_seconds": round(self.ours_cpu[best], 3),
            "median_rows_per_s": {
                c: round(self.workload.rows / statistics.median(v)) for c, v in self.seconds.items()
            },
            "seconds": {c: [round(s, 4) for s in v] for c, v in self.seconds.items()},
        }


# -- the consumers ------------------------------------------------------------------------------


class _Reached(Exception):
    """The null client saw the last commit."""


async def _ours(dsn: str, slot: str, start_lsn: int, end_lsn: int) -> tuple[float, int]:
    done_at = 0.0
    finished = anyio.Event()

    def on_commit(lsn: int, users: set[str]) -> None:
        nonlocal done_at
        if consumer.feed.applied_lsn >= end_lsn and not done_at:
            done_at = time.perf_counter()
            finished.set()

    consumer = Consumer(ConsumerOptions(dsn=dsn, slot=slot), on_commit=on_commit)
    consumer.feed.applied_lsn = start_lsn
    started = time.perf_counter()
    repl = await ReplicationConnection.open(dsn)
    try:
        await repl.start(slot, start_lsn, STREAM_OPTIONS)
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                # a last commit that changes nobody is not reported; the applied LSN still moves
                nonlocal done_at
                while consumer.feed.applied_lsn < end_lsn:
                    await anyio.sleep(0.001)
                done_at = done_at or time.perf_counter()
                finished.set()

            # The consumer's own start always takes a fresh snapshot, which would hold these
            # rows; to have them arrive by streaming, its callbacks are driven from a slot
            # created before the writes, as a reconnect does.
            tg.start_soon(
                repl.stream,
                consumer.feed,
                consumer._on_keepalive,
                lambda: consumer.feed.applied_lsn,
            )
            tg.start_soon(watch)
            with anyio.fail_after(600):
                await finished.wait()
            tg.cancel_scope.cancel()
    finally:
        await repl.close()
    return done_at - started, consumer.feed.rows


def run_ours(dsn: str, slot: str, start_lsn: int, end_lsn: int, rows: int) -> tuple[float, float]:
    """Wall and CPU seconds of our consumer."""
    cpu = time.process_time()
    seconds, applied = anyio.run(
        _ours, dsn, slot, start_lsn, end_lsn, backend_options=event_loop_options()
    )
    cpu = time.process_time() - cpu
    if applied != rows:
        raise SystemExit(f"our consumer applied {applied} rows, expected {rows}")
    return seconds, cpu


async def _null_client(dsn: str, slot: str, start_lsn: int, end_lsn: int) -> float:
    def on_xlogdata(payload: memoryview, lsn: int) -> None:
        # the walsender sends a commit at the end of its commit record
        if lsn >= end_lsn:
            raise _Reached

    started = time.perf_counter()
    repl = await ReplicationConnection.open(dsn)
    try:
        await repl.start(slot, start_lsn, STREAM_OPTIONS)
        with anyio.fail_after(600):
            await repl.stream(on_xlogdata, lambda keepalive: None, lambda: start_lsn)
    except _Reached:
        return time.perf_counter() - started
    finally:
        await repl.close()
    raise AssertionError("the stream ended before the last commit")


def run_null_client(dsn: str, slot: str, start_lsn: int, end_lsn: int) -> float:
    return anyio.run(
        _null_client, dsn, slot, start_lsn, end_lsn, backend_options=event_loop_options()
    )


def run_pg_recvlogical(bindir: Path, dsn: str, slot: str, end_lsn: int) -> float:
    args = [
        str(bindir / "pg_recvlogical"),
        "--dbname",
        dsn,
        "--slot",
        slot,
        "--start",
        "--endpos",
        format_lsn(end_lsn),
        "--file",
        "/dev/null",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={PUBLICATION}",
    ]
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=600)
    return time.perf_counter() - started


def run_server(dsn: str, slot: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(PEEK, (slot, PUBLICATION)).fetchone()
        return time.perf_counter() - started


# -- one workload -------------------------------------------------------------------------------


def measure(cluster: PostgresCluster, workload: Workload, repeat: int) -> Result:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {workload.key}".encode())
        admin.execute(f"CREATE DATABASE {workload.key}".encode())
    dsn = cluster.dsn(workload.key)
    migrate(dsn)
    streaming = ("ours", "pg_recvlogical", "null_client")
    slots = {c: [f"{c}_{i}" for i in range(repeat)] for c in streaming}
    start_lsn = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in [*(s for c in streaming for s in slots[c]), "peek"]:
            row = conn.execute(
                "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
            ).fetchone()
            assert row is not None
            start_lsn = max(start_lsn, parse_lsn(str(row[0])))
        log(f"{workload.title}: writing")
        started = time.perf_counter()
        conn.execute(workload.sql.encode())
        log(f"{workload.title}: written in {time.perf_counter() - started:.1f} s")
        peeked = conn.execute(PEEK, ("peek", PUBLICATION)).fetchone()
        assert peeked is not None
        messages, last = peeked
        end_lsn = parse_lsn(str(last))
    log(
        f"{workload.title}: {messages:,} pgoutput messages,"
        f" the last commit ends at {format_lsn(end_lsn)}"
    )

    result = Result(workload)

    def ours(i: int) -> float:
        seconds, cpu = run_ours(dsn, slots["ours"][i], start_lsn, end_lsn, workload.rows)
        result.ours_cpu.append(cpu)
        return seconds

    runs: dict[str, Callable[[int], float]] = {
        "ours": ours,
        "pg_recvlogical": lambda i: run_pg_recvlogical(
            cluster.bindir, dsn, slots["pg_recvlogical"][i], end_lsn
        ),
        "server": lambda i: run_server(dsn, "peek"),
        "null_client": lambda i: run_null_client(dsn, slots["null_client"][i], start_lsn, end_lsn),
    }
    for i in range(repeat):
        for client, run in runs.items():
            seconds = run(i)
            result.seconds[client].append(seconds)
            extra = f", {result.ours_cpu[-1]:.3f} s CPU" if client == "ours" else ""
            log(
                f"{workload.title}: {client:<14} run {i + 1}/{repeat}:"
                f" {workload.rows / seconds:>10,.0f} rows/s ({seconds:.3f} s{extra})"
            )
    drop_database(cluster, workload.key)
    return result


def drop_database(cluster: PostgresCluster, name: str) -> None:
    """Drop a workload's database once the walsenders of its slots let go of them."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        for _ in range(100):
            admin.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = %s AND active",
                (name,),
            )
            try:
                admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = %s",
                    (name,),
                )
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


# -- report -------------------------------------------------------------------------------------


def chart(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "ours": "#2b6cb0",
        "pg_recvlogical": "#a0aec0",
        "server": "#ed8936",
        "null_client": "#cbd5e0",
    }
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.2
    for j, client in enumerate(CLIENTS):
        rates = [r.rate(client) / 1000 for r in results]
        xs = [i + (j - 1.5) * width for i in range(len(results))]
        bars = ax.bar(xs, rates, width, label=LABELS[client], color=colors[client])
        ax.bar_label(bars, fmt="%.0fk", fontsize=8)
    for i, r in enumerate(results):
        data = r.as_json()
        ax.annotate(
            f"ours: {data['ratio_vs_pg_recvlogical']:.2f} x pg_recvlogical,"
            f" {data['ratio_vs_server']:.2f} x server",
            (i, 0),
            xytext=(0, -34),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(results)), [r.workload.title for r in results])
    ax.set_ylabel("rows per second (thousands)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the one transaction")
    parser.add_argument("--transactions", type=int, default=20_000, help="one-row transactions")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    bindir = embedded_bindir()
    statistic = f"best of {args.repeat}"
    root = Path(tempfile.mkdtemp(prefix="replicator-bench-decode-"))
    root.chmod(0o755)
    cluster = PostgresCluster(bindir, root / "pgdata", settings=PG_SETTINGS)
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        log(f"PostgreSQL {version} in {root}, {os.cpu_count()} CPUs")
        results = [
            measure(cluster, w, args.repeat) for w in workloads(args.rows, args.transactions)
        ]
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "statistic": statistic,
        "postgres": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "command": "make bench-decode",
        "workloads": {r.workload.key: r.as_json() for r in results},
    }
    (args.out / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"pgoutput decode throughput, PostgreSQL {version}, {os.cpu_count()} CPUs ({statistic})"
    chart(results, args.out / "decode.png", title)
    print()
    print(
        f"{'rows/s (' + statistic + ')':<36}{'ours':>10}{'pg_recvlogical':>16}{'server':>10}"
        f"{'null client':>13}{'ours/recv':>11}{'ours/server':>13}"
    )
    for r in results:
        d = r.as_json()
        print(
            f"{r.workload.title:<36}{d['ours_rows_per_s']:>10,}"
            f"{d['pg_recvlogical_rows_per_s']:>16,}{d['server_rows_per_s']:>10,}"
            f"{d['null_client_rows_per_s']:>13,}{d['ratio_vs_pg_recvlogical']:>11.2f}"
            f"{d['ratio_vs_server']:>13.2f}"
        )
    print(f"written to {args.out / 'decode.json'} and {args.out / 'decode.png'}")


if __name__ == "__main__":
    main()
