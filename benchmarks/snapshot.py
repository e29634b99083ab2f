"""Start-up benchmark: process start to ``/readyz`` 200, and RSS per (user, counterpart) pair.

One throwaway PostgreSQL (the system's 15 where installed, else the embedded one). For each
size (10k, 100k and 1M users by default; 1.2 unread-message pairs and 0.3 missed-call pairs
per user, 3.3 unread messages and 0.5 missed calls per user, as in a messaging app) the
database is filled and vacuumed once, then, interleaved ``--repeat`` times:

- ``psql``: ``psql`` streaming the same two bare badge aggregates (``COPY (SELECT user,
  counterpart, count(*) ... GROUP BY 1, 2) TO STDOUT``) to /dev/null, from process start;
- ``ours``: ``replicator serve`` from process start until ``/readyz`` answers 200, and its
  RSS then, less its RSS on an empty database: divided by the pairs, what the state costs;
- ``baseline``: the same for an earlier commit (``--baseline``), installed in a virtualenv
  of its own.

Medians are reported. Writes ``benchmarks/results/snapshot.json`` and ``snapshot.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.baseline import (  # noqa: E402
    baseline_python,
    comparison_arguments,
    counts,
    head,
    load_average,
    log,
    wait_for_quiet,
)
from replicator.badges import queries  # noqa: E402
from replicator.badges import spec as badge_spec  # noqa: E402
from replicator.badges.catalog import bind_sync  # noqa: E402
from replicator.ops.migrate import migrate  # noqa: E402
from replicator.runtime.cluster import (  # noqa: E402
    PostgresCluster,
    embedded_bindir,
    system_bindirs,
)

RESULTS = HERE / "results"
SECRET = "snapshot-benchmark-secret-0123456789abcdef"
LISTEN = re.compile(r"listening on http://[\d.]+:(\d+)")
PG_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
    "autovacuum": "off",
    "shared_buffers": "512MB",
    "log_min_messages": "warning",
}
UUID = "('00000000-0000-4000-8000-' || lpad(to_hex({}), 12, '0'))::uuid"


def fill(dsn: str, users: int) -> int:
    """Messages and calls for ``users`` users; returns the (user, counterpart) pairs."""
    unread_pairs, missed_pairs = users * 6 // 5, users * 3 // 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        # pair j: recipient j mod users, a sender spread over the users; 2 or 5 messages
        conn.execute(
            (
                "INSERT INTO messages (sender_id, recipient_id) SELECT "
                + UUID.format(f"(j::bigint * 7919 + 13 + j / {users}) % {users}")
                + ", "
                + UUID.format(f"j % {users}")
                + f" FROM generate_series(0, {unread_pairs - 1}) j,"
                " generate_series(1, 2 + CASE WHEN j % 4 = 0 THEN 3 ELSE 0 END) r"
            ).encode()
        )
        # pair k: 1 or 2 missed calls
        conn.execute(
            (
                "INSERT INTO calls (caller_id, callee_id, status) SELECT "
                + UUID.format(f"(k::bigint * 104729 + 7 + k / {users}) % {users}")
                + ", "
                + UUID.format(f"(k::bigint * 3 + 1) % {users}")
                + f", 'missed' FROM generate_series(0, {missed_pairs - 1}) k,"
                " generate_series(1, 1 + CASE WHEN k % 3 < 2 THEN 1 ELSE 0 END) r"
            ).encode()
        )
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("VACUUM ANALYZE calls")
    return unread_pairs + missed_pairs


def bare_aggregates(dsn: str) -> list[str]:
    """The badge queries as the snapshot runs them, as plain SQL text (the badges of
    ``REPLICATOR_BADGES`` and ``REPLICATOR_SCHEMA`` when set, as the service reads them)."""
    path = os.environ.get("REPLICATOR_BADGES")
    specs = badge_spec.load(
        Path(path) if path else None, schema=os.environ.get("REPLICATOR_SCHEMA", "public")
    )
    with psycopg.connect(dsn) as conn:
        badges = bind_sync(conn, specs)
        return [queries.counts(b, as_text=False).as_string(conn) for b in badges]


def database_size(dsn: str, aggregates: list[str]) -> tuple[int, int]:
    """The users with a badge and the (user, counterpart) counts the state would hold."""
    rows = " UNION ALL ".join(
        f"SELECT u::text FROM ({a}) AS q{i}(u)" for i, a in enumerate(aggregates)
    )
    with psycopg.connect(dsn) as conn:
        found = conn.execute(f"SELECT count(DISTINCT u), count(*) FROM ({rows}) r".encode())
        users, pairs = found.fetchone()  # type: ignore[misc]
    return int(users), int(pairs)


def run_psql(bindir: Path, dsn: str, aggregates: list[str]) -> float:
    psql = bindir / "psql" if (bindir / "psql").exists() else Path("psql")
    args = [str(psql), "-X", "-q", dsn]
    for query in aggregates:
        args += ["-c", f"COPY ({query}) TO STDOUT"]
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - started


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_service(python: Path, dsn: str, settle: float) -> tuple[float, int, str]:
    """Seconds from process start to /readyz 200, RSS (kB) ``settle`` s later, and the log."""
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REPLICATOR_JWT_SECRET": SECRET,
        "REPLICATOR_HOST": "127.0.0.1",
        "REPLICATOR_PORT": "0",
        "REPLICATOR_SLOT": "startup",
        "PYTHONUNBUFFERED": "1",
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(python), "-m", "replicator", "serve"],
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    port: list[int] = []
    found = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = LISTEN.search(line)
            if match and not port:
                port.append(int(match.group(1)))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not found.wait(120) or not port:
            raise SystemExit("service did not start:\n" + "".join(lines[-20:]))
        url = f"http://127.0.0.1:{port[0]}/readyz"
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("service did not get ready:\n" + "".join(lines[-20:]))
            time.sleep(0.02)
        ready = time.perf_counter() - started
        time.sleep(settle)
        return ready, rss_kb(process.pid), "".join(lines)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def measure(
    cluster: PostgresCluster,
    users: int,
    versions: dict[str, Path],
    repeat: int,
    settle: float,
) -> dict[str, Any]:
    name = f"users_{users}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}".encode())
        admin.execute(f"CREATE DATABASE {name}".encode())
    dsn = cluster.dsn(name)
    migrate(dsn)
    started = time.perf_counter()
    pairs = fill(dsn, users)
    log(f"{users:,} users: {pairs:,} pairs written in {time.perf_counter() - started:.1f} s")
    record = interleaved(
        cluster.bindir, dsn, versions, repeat, settle, show_progress=users >= 1_000_000
    )
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())
    return {"users": users, "pairs": pairs, **record}


def interleaved(
    bindir: Path,
    dsn: str,
    versions: dict[str, Path],
    repeat: int,
    settle: float,
    show_progress: bool = False,
) -> dict[str, Any]:
    """``repeat`` rounds of psql and each version in turn on one database: their medians."""
    aggregates = bare_aggregates(dsn)
    seconds: dict[str, list[float]] = {"psql": [], **{v: [] for v in versions}}
    rss: dict[str, list[int]] = {v: [] for v in versions}
    for i in range(repeat):
        seconds["psql"].append(run_psql(bindir, dsn, aggregates))
        for version, python in versions.items():
            ready, kb, out = run_service(python, dsn, settle)
            seconds[version].append(ready)
            rss[version].append(kb)
            if i == 0 and version == "ours" and show_progress:
                progress = [line for line in out.splitlines() if "snapshot" in line]
                log("log: " + " | ".join(line.split("INFO")[-1].strip() for line in progress))
        log(
            f"run {i + 1}/{repeat}: psql {seconds['psql'][-1]:.2f} s, "
            + ", ".join(
                f"{v} {seconds[v][-1]:.2f} s ({rss[v][-1] / 1024:.0f} MB)" for v in versions
            )
        )
    return {
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "median_rss_kb": {k: statistics.median(v) for k, v in rss.items()},
        "seconds": {k: [round(s, 3) for s in v] for k, v in seconds.items()},
        "rss_kb": rss,
    }


def empty_rss(cluster: PostgresCluster, versions: dict[str, Path], settle: float) -> dict[str, int]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(b"DROP DATABASE IF EXISTS empty")
        admin.execute(b"CREATE DATABASE empty")
    dsn = cluster.dsn("empty")
    migrate(dsn)
    found = {}
    for version, python in versions.items():
        found[version] = int(
            statistics.median(run_service(python, dsn, settle)[1] for _ in range(3))
        )
    log(
        "RSS on an empty database: "
        + ", ".join(f"{v} {kb / 1024:.1f} MB" for v, kb in found.items())
    )
    return found


def measure_database(
    dsn: str, bindir: Path, empty: dict[str, int], repeat: int, settle: float
) -> dict[str, Any]:
    """Start-up on someone's own database, as it is: nothing is written but the service's own
    slot (``startup_<id>``, dropped when it stops)."""
    users, pairs = database_size(dsn, bare_aggregates(dsn))
    log(f"the database: {users:,} users with a badge, {pairs:,} (user, counterpart) counts")
    versions = {"ours": Path(sys.executable)}
    record = {"users": users, "pairs": pairs, **interleaved(bindir, dsn, versions, repeat, settle)}
    derive(record, empty)
    return record


def plot_database(record: dict[str, Any], path: Path, title: str) -> None:
    """The database's start-up and memory against this repository's own sizes (its
    ``snapshot.json``), so that a team sees where it stands and what to expect as it grows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = RESULTS / "snapshot.json"
    sizes = json.loads(reference.read_text())["sizes"] if reference.exists() else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if sizes:
        pairs = [r["pairs"] for r in sizes]
        left.plot(pairs, [r["median_seconds"]["ours"] for r in sizes], "o-", label="reference")
        left.plot(
            pairs, [r["median_seconds"]["psql"] for r in sizes], "k--", label="psql, reference"
        )
        right.plot(pairs, [r["rss_bytes_per_pair"]["ours"] for r in sizes], "o-", label="reference")
    for axis, value, style, label in (
        (left, record["median_seconds"]["ours"], "r*", "your database"),
        (left, record["median_seconds"]["psql"], "kx", "psql, your database"),
        (right, record["rss_bytes_per_pair"]["ours"], "r*", "your database"),
    ):
        axis.plot([record["pairs"]], [value], style, markersize=12, label=label)
    for axis, label in (
        (left, "seconds from process start to /readyz 200"),
        (right, "RSS per (user, counterpart) count, bytes"),
    ):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("(user, counterpart) counts")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def derive(record: dict[str, Any], empty: dict[str, int]) -> None:
    seconds, rss = record["median_seconds"], record["median_rss_kb"]
    record["ready_over_psql"] = {v: round(seconds[v] / seconds["psql"], 2) for v in rss}
    record["rss_bytes_per_pair"] = {
        v: round((rss[v] - empty[v]) * 1024 / record["pairs"], 1) for v in rss
    }


def plot(records: list[dict[str, Any]], path: Path, title: str, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [r["users"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"psql": ("k--", "psql, bare aggregates"), "ours": ("o-", labels["ours"])}
    if "baseline" in labels:
        styles["baseline"] = ("s:", labels["baseline"])
    for key, (style, label) in styles.items():
        left.plot(users, [r["median_seconds"][key] for r in records], style, label=label)
    left.plot(
        users,
        [2 * r["median_seconds"]["psql"] for r in records],
        color="grey",
        linewidth=0.8,
        label="2 x psql (target)",
    )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("users (1.5 pairs each)")
    left.set_ylabel("seconds from process start to /readyz 200")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    for key in [k for k in ("ours", "baseline") if k in labels]:
        right.plot(
            users,
            [r["rss_bytes_per_pair"][key] for r in records],
            styles[key][0],
            label=labels[key],
        )
    right.axhline(150, color="grey", linestyle="--", linewidth=0.8, label="150 B (target)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("users (1.5 pairs each)")
    right.set_ylabel("RSS per (user, counterpart) pair, bytes")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextmanager
def throwaway_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL of its own (the system's 15 where installed, else the embedded one)."""
    bindirs = system_bindirs()
    root = Path(tempfile.mkdtemp(prefix="replicator-bench-snapshot-"))
    root.chmod(0o755)
    cluster = PostgresCluster(
        bindirs[0] if bindirs else embedded_bindir(), root / "pgdata", settings=PG_SETTINGS
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--users",
        type=counts,
        default=[10_000, 100_000, 1_000_000],
        help="comma-separated user counts (default 10000,100000,1000000)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    comparison_arguments(parser, "git commit to compare with, installed in its own virtualenv")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--dsn",
        help="measure start-up on this database as it is (your own, or a copy of it) instead"
        " of generated ones; REPLICATOR_BADGES, REPLICATOR_SCHEMA and REPLICATOR_PUBLICATION"
        " are taken from the environment",
    )
    args = parser.parse_args()
    if args.dsn:
        database_main(args)
        return
    versions = {"ours": Path(sys.executable)}
    labels = {"ours": f"replicator {head()}"}
    baseline_sha = None
    if args.baseline != "none":
        versions["baseline"], baseline_sha = baseline_python(args.baseline)
        labels["baseline"] = f"replicator {baseline_sha} (baseline)"
    with throwaway_cluster() as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        load = wait_for_quiet(args.max_load, 900)
        log(f"PostgreSQL {version}, {os.cpu_count()} CPUs, load average {load}")
        empty = empty_rss(cluster, versions, args.settle)
        records = []
        for users in args.users:
            record = measure(cluster, users, versions, args.repeat, args.settle)
            derive(record, empty)
            records.append(record)
        load_after = load_average()
    report = {
        "command": f"make bench-snapshot BASELINE={args.baseline}",
        "statistic": f"median of {args.repeat} interleaved runs",
        "postgres": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "version": head(),
        "baseline": baseline_sha,
        "load_average_before": load,
        "load_average_after": load_after,
        "rss_kb_empty_database": empty,
        "sizes": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"start-up, PostgreSQL {version}, {os.cpu_count()} CPUs, Python"
        f" {platform.python_version()} ({report['statistic']})"
    )
    plot(records, args.out / "snapshot.png", title, labels)
    print()
    print(
        f"{'users':>10} {'pairs':>10} {'psql s':>8} {'ours s':>8} {'x psql':>7} {'B/pair':>7}",
        end="",
    )
    print(f" {'base s':>8} {'B/pair':>7}" if baseline_sha else "")
    for r in records:
        s, ratio, per = r["median_seconds"], r["ready_over_psql"], r["rss_bytes_per_pair"]
        line = (
            f"{r['users']:>10,} {r['pairs']:>10,} {s['psql']:>8.2f} {s['ours']:>8.2f}"
            f" {ratio['ours']:>7.2f} {per['ours']:>7.1f}"
        )
        if baseline_sha:
            line += f" {s['baseline']:>8.2f} {per['baseline']:>7.1f}"
        print(line)
    print(f"written to {args.out / 'snapshot.json'} and {args.out / 'snapshot.png'}")


def database_main(args: argparse.Namespace) -> None:
    """``--dsn``: start-up and memory on one given database, and the RSS of an empty one
    (from a throwaway embedded PostgreSQL) to subtract."""
    with throwaway_cluster() as cluster:
        empty = empty_rss(cluster, {"ours": Path(sys.executable)}, args.settle)
        bindir = cluster.bindir
    with psycopg.connect(args.dsn) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    load = load_average()
    record = measure_database(args.dsn, bindir, empty, args.repeat, args.settle)
    report = {
        "command": "python benchmarks/snapshot.py --dsn ...",
        "statistic": f"median of {args.repeat} interleaved runs",
        "postgres": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "version": head(),
        "load_average_before": load,
        "load_average_after": load_average(),
        "rss_kb_empty_database": empty,
        "database": record,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot-database.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"start-up on your database, PostgreSQL {version}, {os.cpu_count()} CPUs here,"
        f" Python {platform.python_version()} ({report['statistic']})"
    )
    plot_database(record, args.out / "snapshot-database.png", title)
    s, per = record["median_seconds"], record["rss_bytes_per_pair"]["ours"]
    state_mb = (record["median_rss_kb"]["ours"] - empty["ours"]) / 1024
    print()
    print(
        f"{record['users']:,} users, {record['pairs']:,} counts: ready in {s['ours']:.2f} s"
        f" (psql streams the same aggregates in {s['psql']:.2f} s), the counts take"
        f" {state_mb:.0f} MB ({per:.0f} B per count) over the {empty['ours'] / 1024:.0f} MB"
        " of an empty service"
    )
    print(f"written to {args.out / 'snapshot-database.json'} and .png")


if __name__ == "__main__":
    main()
