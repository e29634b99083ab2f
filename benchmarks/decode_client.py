"""One decode run of replicator's own consumer path, in whatever environment runs this file.

``benchmarks/decode.py`` runs it with the current virtualenv's Python and with a baseline
version's (an earlier commit installed in a virtualenv of its own), so both versions decode
the same changes from slots created before the writes. It streams from ``--start`` until the
state has applied ``--end``, then prints one JSON line: wall seconds (from opening the
replication connection), CPU seconds of this process over the same span, and rows applied.

It works with the layered package (``replicator.pg``, badges from a file) and with the flat
one that came before it (two built-in badges only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

STREAM_OPTIONS = {"proto_version": "1", "publication_names": "", "messages": "true"}


def _current(dsn: str, badges: Path | None, start: int) -> tuple[Any, Any, Any, Any]:
    """(feed, position, connection class, loop options) of the layered package."""
    from replicator.badges import spec as badge_spec
    from replicator.badges.applier import Applier
    from replicator.badges.catalog import bind_sync
    from replicator.badges.state import BadgeState
    from replicator.pg.feed import PgoutputFeed
    from replicator.pg.walsender import ReplicationConnection
    from replicator.runtime.service import event_loop_options

    specs = badge_spec.load(badges)
    with psycopg.connect(dsn, autocommit=True) as conn:
        bound = bind_sync(conn, specs)
    state = BadgeState([s.name for s in specs], [s.counterpart is not None for s in specs])
    feed = PgoutputFeed(Applier(state, bound), applied_lsn=start)
    return feed, feed, ReplicationConnection, event_loop_options()


def _flat(start: int) -> tuple[Any, Any, Any, Any]:
    """The same of the flat package that preceded it."""
    from replicator.replication import ReplicationConnection  # type: ignore[import-not-found]
    from replicator.service import event_loop_options  # type: ignore[import-not-found]

    from replicator.badges import Applier, BadgeState  # type: ignore[attr-defined]

    applier = Applier(BadgeState())
    applier.applied_lsn = start
    return applier.apply, applier, ReplicationConnection, event_loop_options()


async def _run(
    connection: Any, dsn: str, slot: str, publication: str, feed: Any, position: Any, end: int
) -> tuple[float, float]:
    cpu = time.process_time()
    started = time.perf_counter()
    repl = await connection.open(dsn)
    done = anyio.Event()
    try:
        await repl.start(
            slot, position.applied_lsn, {**STREAM_OPTIONS, "publication_names": publication}
        )
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while position.applied_lsn < end:
                    await anyio.sleep(0.001)
                done.set()

            tg.start_soon(repl.stream, feed, lambda keepalive: None, lambda: position.applied_lsn)
            tg.start_soon(watch)
            with anyio.fail_after(600):
                await done.wait()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            tg.cancel_scope.cancel()
    finally:
        await repl.close()
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", default="badges")
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--badges", type=Path, default=None)
    args = parser.parse_args()
    try:
        import replicator.pg  # noqa: F401
    except ImportError:
        if args.badges is not None:
            raise SystemExit("this version has no badges files") from None
        feed, position, connection, loop = _flat(args.start)
    else:
        feed, position, connection, loop = _current(args.dsn, args.badges, args.start)
    seconds, cpu = anyio.run(
        _run,
        connection,
        args.dsn,
        args.slot,
        args.publication,
        feed,
        position,
        args.end,
        backend_options=loop,
    )
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": position.rows}))


if __name__ == "__main__":
    main()
