"""Memory while one transaction of a million rows streams in: bounded by pairs, not by rows."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import anyio
import psycopg

from replicator.ops.migrate import migrate
from replicator.pg.lsn import parse_lsn
from replicator.pipeline.consumer import Consumer, ConsumerOptions
from replicator.runtime.cluster import PostgresCluster, embedded_bindir

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """RSS every 20 ms in a thread, so the event loop's own work is not in the way."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.monotonic() - self._start, rss_mb()))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def one_case(dsn: str, rows: int, users: int, slot: str) -> dict[str, object]:
    consumer = Consumer(ConsumerOptions(dsn=dsn, slot=slot))
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        with anyio.fail_after(60):
            while not consumer.live:
                await anyio.sleep(0.01)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("TRUNCATE messages")
            base = rss_mb()
            print(f"  writing {rows:,} rows over {users} users ({users * users:,} pairs) ...")
            # users x users distinct (recipient, sender) pairs, every row unread
            await conn.execute(
                "INSERT INTO messages (sender_id, recipient_id)"
                " SELECT md5((g %% %s)::text)::uuid, md5(((g / %s) %% %s)::text || 'r')::uuid"
                " FROM generate_series(0, %s - 1) g",
                (users, users, users, rows),
            )
            cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
            row = await cur.fetchone()
            assert row is not None
            target = parse_lsn(str(row[0]))
        with Sampler() as sampler:
            started = time.monotonic()
            with anyio.fail_after(900):
                while consumer.applied_lsn < target and consumer.feed.rows < rows:
                    await anyio.sleep(0.05)
                while consumer.feed.transactions < 2:
                    await anyio.sleep(0.05)
            elapsed = time.monotonic() - started
        tg.cancel_scope.cancel()
    await consumer.shutdown()
    peak = max((mb for _, mb in sampler.samples), default=base)
    pairs = sum(len(c[0]) for _, c in consumer.state.items())
    result = {
        "rows": rows,
        "users": users,
        "distinct_pairs": pairs,
        "rss_before_mb": round(base, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - base, 1),
        "seconds": round(elapsed, 2),
        "rows_per_s": round(rows / elapsed),
        "rss_timeline": [(round(t, 2), round(mb, 1)) for t, mb in sampler.samples],
    }
    print(
        f"  {rows:,} rows, {pairs:,} pairs: RSS {base:.0f} -> peak {peak:.0f} MB"
        f" (+{peak - base:.1f} MB), {elapsed:.1f} s"
    )
    return result


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        timeline = r["rss_timeline"]
        assert isinstance(timeline, list)
        ax.plot(
            [t for t, _ in timeline],
            [mb for _, mb in timeline],
            label=f"{r['rows']:,} rows, {r['distinct_pairs']:,} pairs",
        )
    ax.set_xlabel("seconds since commit")
    ax.set_ylabel("consumer RSS (MB)")
    ax.set_title("RSS while one big transaction streams in")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replicator-bigtx-") as tmp:
        os.chmod(tmp, 0o755)
        cluster = PostgresCluster(embedded_bindir(), Path(tmp) / "pg", settings={"fsync": "off"})
        cluster.start()
        try:
            migrate(cluster.dsn())
            results = []
            for users in (10, 100, 1000):
                results.append(await one_case(cluster.dsn(), args.rows, users, f"big_{users}"))
        finally:
            cluster.stop("immediate")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "big_transaction.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "big_transaction.png")
    print("\nrows        pairs     RSS growth   seconds   rows/s")
    for r in results:
        print(
            f"{r['rows']:>9,} {r['distinct_pairs']:>9,} {r['rss_growth_mb']:>9} MB"
            f" {r['seconds']:>8} {r['rows_per_s']:>9,}"
        )
    print(f"\nwrote {RESULTS / 'big_transaction.json'} and big_transaction.png")


if __name__ == "__main__":
    anyio.run(main)
