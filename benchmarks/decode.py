"""Decode benchmark: our consumer path against an earlier version, pg_recvlogical and the server.

One throwaway embedded PostgreSQL 18. For each workload (200,000 rows in one transaction;
20,000 one-row transactions), with the default badges and with a custom badges file of three
kinds on one table, the slots are created first, the rows are written once, and the same
changes are then consumed in these ways:

- ``ours``: this version's consumer path (the pgoutput feed and the badge applier the service
  runs), in a process of its own (``decode_client.py``), on the service's event loop, from
  opening the replication connection until the badge state has applied the last commit;
- ``baseline``: the same client run by an earlier commit (``--baseline``, default ``HEAD~1``)
  installed in a virtualenv of its own; default badges only;
- ``pg_recvlogical``: PostgreSQL's C client from the same bin directory, writing to /dev/null,
  with ``--endpos`` at the end of the last commit (so its wall time ends there);
- ``server``: ``pg_logical_slot_peek_binary_changes`` on its own slot: decoding alone, with no
  client and no network;
- ``null client``: our replication loop with a callback that drops every message. It is no
  faster than ``ours``: the walsender, not the client, sets the pace.

Runs are interleaved (``--repeat``, a fresh slot each time for every streaming client) so a
noisy moment hits all of them; the median is reported. Because the walsender sets the wall-clock
pace, our CPU seconds per row are reported beside it: they show what our code costs.
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

from benchmarks.baseline import baseline_python, log  # noqa: E402
from replicator.ops.migrate import migrate  # noqa: E402
from replicator.pg.lsn import format_lsn, parse_lsn  # noqa: E402
from replicator.pg.walsender import ReplicationConnection  # noqa: E402
from replicator.runtime.cluster import PostgresCluster, embedded_bindir  # noqa: E402
from replicator.runtime.service import event_loop_options  # noqa: E402

RESULTS = HERE / "results"
CLIENT = HERE / "decode_client.py"
STREAM_OPTIONS = {"proto_version": "1", "publication_names": "badges", "messages": "true"}
PG_SETTINGS = {
    # Durability is not under test, and checkpoints in the middle of a run only add noise.
    "fsync": "off",
    "full_page_writes": "off",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
    "max_replication_slots": "100",
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
CLIENTS = ("ours", "baseline", "pg_recvlogical", "server", "null_client")
STREAMING = ("ours", "baseline", "pg_recvlogical", "null_client")
LABELS = {
    "ours": "replicator (this version)",
    "baseline": "replicator (baseline)",
    "pg_recvlogical": "pg_recvlogical",
    "server": "server-side decode (peek)",
    "null_client": "null client (drops every message)",
}

#: three badge kinds on one table: two by counterpart, one a plain number per user
CUSTOM_SCHEMA = """
CREATE SCHEMA inbox;
CREATE TABLE inbox.notes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id bigint NOT NULL,
    author_id bigint NOT NULL,
    body text NOT NULL DEFAULT '',
    is_read boolean NOT NULL DEFAULT false,
    mentions_owner boolean,
    priority smallint
);
ALTER TABLE inbox.notes REPLICA IDENTITY FULL;
CREATE PUBLICATION custom FOR TABLE inbox.notes;
"""
CUSTOM_BADGES = """
[[badge]]
name = "unread_notes"
table = "inbox.notes"
user = "owner_id"
counterpart = "author_id"
where = "is_read = false"

[[badge]]
name = "unread_mentions"
table = "inbox.notes"
user = "owner_id"
counterpart = "author_id"
where = "is_read = false and mentions_owner is true"

[[badge]]
name = "urgent"
table = "inbox.notes"
user = "owner_id"
where = "is_read = false and priority >= 3"
"""


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    rows: int
    sql: str
    #: "default" (the built-in badges) or "custom" (three kinds from a badges file)
    badges: str
    publication: str


def workloads(rows: int, transactions: int) -> list[Workload]:
    users = "ARRAY[" + ",".join(f"'{u}'::uuid" for u in USERS) + "]"
    n = len(USERS)
    # every seventh message is already read, so both branches of the badge rule run
    default = (
        "INSERT INTO messages (sender_id, recipient_id, body, read_at)",
        f"({users})[1 + g % {n}], ({users})[1 + (g / {n}) % {n}],"
        " 'benchmark message number ' || g, CASE WHEN g % 7 = 3 THEN now() END",
    )
    custom = (
        "INSERT INTO inbox.notes (owner_id, author_id, body, is_read, mentions_owner, priority)",
        f"1 + g % {n}, 1 + (g / {n}) % {n}, 'benchmark note number ' || g, g % 7 = 3,"
        " CASE WHEN g % 5 = 0 THEN NULL ELSE g % 3 = 0 END, g % 6",
    )
    found = []
    for badges, (insert, values), publication in (
        ("default", default, "badges"),
        ("custom", custom, "custom"),
    ):
        kinds = "" if badges == "default" else ", three badge kinds"
        found += [
            Workload(
                f"{badges}_one_transaction",
                f"{rows:,} rows in one transaction{kinds}",
                rows,
                f"{insert} SELECT {values} FROM generate_series(1, {rows}) g",
                badges,
                publication,
            ),
            Workload(
                f"{badges}_one_row_transactions",
                f"{transactions:,} one-row transactions{kinds}",
                transactions,
                f"DO $$ BEGIN FOR g IN 1..{transactions} LOOP"
                f" {insert} SELECT {values}; COMMIT; END LOOP; END $$",
                badges,
                publication,
            ),
        ]
    return found


@dataclass
class Result:
    workload: Workload
    seconds: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLIENTS})
    #: CPU seconds of the client process, per run, for ours and the baseline
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "baseline": []})

    def rate(self, client: str) -> float:
        return self.workload.rows / statistics.median(self.seconds[client])

    def cpu_us_per_row(self, client: str) -> float:
        return statistics.median(self.cpu[client]) / self.workload.rows * 1e6

    def as_json(self) -> dict[str, Any]:
        ran = [c for c in CLIENTS if self.seconds[c]]
        data: dict[str, Any] = {
            "title": self.workload.title,
            "badges": self.workload.badges,
            "rows": self.workload.rows,
            "median_rows_per_s": {c: round(self.rate(c)) for c in ran},
            "ratio_vs_pg_recvlogical": round(self.rate("ours") / self.rate("pg_recvlogical"), 3),
            "ratio_vs_server": round(self.rate("ours") / self.rate("server"), 3),
            "ours_cpu_us_per_row": round(self.cpu_us_per_row("ours"), 3),
            "seconds": {c: [round(s, 4) for s in self.seconds[c]] for c in ran},
            "cpu_seconds": {c: [round(s, 4) for s in v] for c, v in self.cpu.items() if v},
        }
        if self.seconds["baseline"]:
            data["baseline_cpu_us_per_row"] = round(self.cpu_us_per_row("baseline"), 3)
            data["ratio_vs_baseline"] = round(self.rate("ours") / self.rate("baseline"), 3)
            # >1 means this version spends less CPU per row than the baseline
            data["cpu_ratio_baseline_over_ours"] = round(
                self.cpu_us_per_row("baseline") / self.cpu_us_per_row("ours"), 3
            )
        return data


# -- the clients --------------------------------------------------------------------------------


def run_client(
    python: Path, dsn: str, slot: str, workload: Workload, badges: Path | None, start: int, end: int
) -> tuple[float, float]:
    """Wall and CPU seconds of one ``decode_client.py`` run."""
    args = [
        str(python),
        str(CLIENT),
        "--dsn",
        dsn,
        "--slot",
        slot,
        "--publication",
        workload.publication,
        "--start",
        str(start),
        "--end",
        str(end),
    ]
    if badges is not None:
        args += ["--badges", str(badges)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=900).stdout
    found = json.loads(out.strip().splitlines()[-1])
    if found["rows"] != workload.rows:
        raise SystemExit(f"{python}: applied {found['rows']} rows, expected {workload.rows}")
    return float(found["seconds"]), float(found["cpu"])


class _Reached(Exception):
    """The null client saw the last commit."""


async def _null_client(
    dsn: str, slot: str, publication: str, start_lsn: int, end_lsn: int
) -> float:
    def on_xlogdata(payload: memoryview, lsn: int) -> None:
        # the walsender sends a commit at the end of its commit record
        if lsn >= end_lsn:
            raise _Reached

    started = time.perf_counter()
    repl = await ReplicationConnection.open(dsn)
    try:
        await repl.start(slot, start_lsn, {**STREAM_OPTIONS, "publication_names": publication})
        with anyio.fail_after(600):
            await repl.stream(on_xlogdata, lambda keepalive: None, lambda: start_lsn)
    except _Reached:
        return time.perf_counter() - started
    finally:
        await repl.close()
    raise AssertionError("the stream ended before the last commit")


def run_null_client(dsn: str, slot: str, publication: str, start_lsn: int, end_lsn: int) -> float:
    return anyio.run(
        _null_client,
        dsn,
        slot,
        publication,
        start_lsn,
        end_lsn,
        backend_options=event_loop_options(),
    )


def run_pg_recvlogical(bindir: Path, dsn: str, slot: str, publication: str, end_lsn: int) -> float:
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
        f"publication_names={publication}",
    ]
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=600)
    return time.perf_counter() - started


def run_server(dsn: str, slot: str, publication: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(PEEK, (slot, publication)).fetchone()
        return time.perf_counter() - started


# -- one workload -------------------------------------------------------------------------------


def measure(
    cluster: PostgresCluster,
    workload: Workload,
    repeat: int,
    baseline: Path | None,
    custom_badges: Path,
) -> Result:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {workload.key}".encode())
        admin.execute(f"CREATE DATABASE {workload.key}".encode())
    dsn = cluster.dsn(workload.key)
    migrate(dsn)
    badges = None
    if workload.badges == "custom":
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(CUSTOM_SCHEMA.encode())
        badges = custom_badges
    clients = [c for c in CLIENTS if c != "baseline" or (baseline and workload.badges == "default")]
    streaming = [c for c in clients if c in STREAMING]
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
        peeked = conn.execute(PEEK, ("peek", workload.publication)).fetchone()
        assert peeked is not None
        messages, last = peeked
        end_lsn = parse_lsn(str(last))
    log(
        f"{workload.title}: {messages:,} pgoutput messages,"
        f" the last commit ends at {format_lsn(end_lsn)}"
    )

    result = Result(workload)

    def client(name: str, python: Path) -> Callable[[int], float]:
        def run(i: int) -> float:
            seconds, cpu = run_client(
                python, dsn, slots[name][i], workload, badges, start_lsn, end_lsn
            )
            result.cpu[name].append(cpu)
            return seconds

        return run

    runs: dict[str, Callable[[int], float]] = {
        "ours": client("ours", Path(sys.executable)),
        "pg_recvlogical": lambda i: run_pg_recvlogical(
            cluster.bindir, dsn, slots["pg_recvlogical"][i], workload.publication, end_lsn
        ),
        "server": lambda i: run_server(dsn, "peek", workload.publication),
        "null_client": lambda i: run_null_client(
            dsn, slots["null_client"][i], workload.publication, start_lsn, end_lsn
        ),
    }
    if "baseline" in clients and baseline is not None:
        runs["baseline"] = client("baseline", baseline)
    for i in range(repeat):
        for name, run in runs.items():
            seconds = run(i)
            result.seconds[name].append(seconds)
            extra = f", {result.cpu[name][-1]:.3f} s CPU" if name in result.cpu else ""
            log(
                f"{workload.title}: {name:<14} run {i + 1}/{repeat}:"
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
        "baseline": "#90cdf4",
        "pg_recvlogical": "#a0aec0",
        "server": "#ed8936",
        "null_client": "#cbd5e0",
    }
    fig, ax = plt.subplots(figsize=(13, 6))
    width = 0.16
    for j, client in enumerate(CLIENTS):
        xs, rates = [], []
        for i, r in enumerate(results):
            if r.seconds[client]:
                xs.append(i + (j - 2) * width)
                rates.append(r.rate(client) / 1000)
        bars = ax.bar(xs, rates, width, label=LABELS[client], color=colors[client])
        ax.bar_label(bars, fmt="%.0fk", fontsize=7)
    for i, r in enumerate(results):
        data = r.as_json()
        text = f"ours: {data['ratio_vs_pg_recvlogical']:.2f} x pg_recvlogical"
        if "ratio_vs_baseline" in data:
            text += (
                f"\n{data['ratio_vs_baseline']:.2f} x baseline (wall),"
                f" CPU/row {data['ours_cpu_us_per_row']:.2f}"
                f" vs {data['baseline_cpu_us_per_row']:.2f} µs"
            )
        else:
            text += f"\nCPU/row {data['ours_cpu_us_per_row']:.2f} µs"
        ax.annotate(
            text, (i, 0), xytext=(0, -46), textcoords="offset points", ha="center", fontsize=7
        )
    ax.set_xticks(range(len(results)), [r.workload.title for r in results], fontsize=8)
    ax.set_ylabel("rows per second (thousands, median)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the one transaction")
    parser.add_argument("--transactions", type=int, default=20_000, help="one-row transactions")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs of each client")
    parser.add_argument(
        "--baseline",
        default="HEAD~1",
        help="git commit to compare with, installed in its own virtualenv (none: skip)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    baseline, baseline_sha = None, None
    if args.baseline != "none":
        baseline, baseline_sha = baseline_python(args.baseline)
    bindir = embedded_bindir()
    statistic = f"median of {args.repeat} interleaved runs"
    root = Path(tempfile.mkdtemp(prefix="replicator-bench-decode-"))
    root.chmod(0o755)
    custom_badges = root / "badges.toml"
    custom_badges.write_text(CUSTOM_BADGES)
    cluster = PostgresCluster(bindir, root / "pgdata", settings=PG_SETTINGS)
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        log(f"PostgreSQL {version} in {root}, {os.cpu_count()} CPUs, baseline {baseline_sha}")
        results = [
            measure(cluster, w, args.repeat, baseline, custom_badges)
            for w in workloads(args.rows, args.transactions)
        ]
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "statistic": statistic,
        "postgres": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "command": f"make bench-decode BASELINE={args.baseline}",
        "version": head,
        "baseline": baseline_sha,
        "workloads": {r.workload.key: r.as_json() for r in results},
    }
    (args.out / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"pgoutput decode, PostgreSQL {version}, {os.cpu_count()} CPUs ({statistic})"
    chart(results, args.out / "decode.png", title)
    print()
    print(
        f"{'rows/s (' + statistic + ')':<52}{'ours':>10}{'baseline':>10}{'recvlogical':>13}"
        f"{'server':>10}{'ours/base':>11}{'ours/recv':>11}{'CPU µs/row':>12}{'base':>8}"
    )
    for r in results:
        d = r.as_json()
        rates = d["median_rows_per_s"]
        print(
            f"{r.workload.title:<52}{rates['ours']:>10,}{rates.get('baseline', 0):>10,}"
            f"{rates['pg_recvlogical']:>13,}{rates['server']:>10,}"
            f"{d.get('ratio_vs_baseline', float('nan')):>11.2f}"
            f"{d['ratio_vs_pg_recvlogical']:>11.2f}{d['ours_cpu_us_per_row']:>12.2f}"
            f"{d.get('baseline_cpu_us_per_row', float('nan')):>8.2f}"
        )
    print(f"written to {args.out / 'decode.json'} and {args.out / 'decode.png'}")


if __name__ == "__main__":
    main()
