"""Floor benchmark: what the event loop alone costs for the fan-out benchmark's traffic.

The service's CPU per change (``make bench-fanout``) is decoding, applying and encoding plus
what the machine charges for the traffic itself: waking the process for each change that
arrives, and a write on loopback for each event and each heartbeat. This measures the latter
with nothing else in the process, on uvloop as the service runs:

- ``wake``: a process waiting in its event loop for one socket that another process writes a
  100-byte message to, ``--rate`` times a second; its callback reads the message and does
  nothing with it. CPU per message.
- ``heartbeats``: a process holding ``--streams`` TCP connections (the clients in two other
  processes, reading) that writes a 20-byte chunk to each connection once per
  ``--interval`` seconds, a slice of them every quarter of a second, as the service's
  heartbeats go out. CPU per write.

CPU is the process's time on a CPU from the scheduler (``/proc/<pid>/task/*/schedstat``).
Writes ``benchmarks/results/floor.json`` and ``floor.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.baseline import (  # noqa: E402
    cpu_seconds,
    head,
    load_average,
    log,
    wait_for_quiet,
)

RESULTS = HERE / "results"
MESSAGE = b"x" * 100
HEARTBEAT = b"14\r\n: keep-alive\n\n\r\n"
TICK_S = 0.25


def run_loop(main: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


def _writer(sock: socket.socket, rate: float, seconds: float) -> None:
    """Write MESSAGE ``rate`` times a second, evenly spaced, for ``seconds``."""
    next_at = time.monotonic()
    end = next_at + seconds
    while next_at < end:
        next_at += 1 / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.send(MESSAGE)
    sock.close()


async def _read_until_closed(sock: socket.socket) -> tuple[int, int, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    counts = [0, 0]

    def readable() -> None:
        counts[1] += 1
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(sock.fileno())
                done.set_result(None)
                return
            counts[0] += len(data) // len(MESSAGE)

    started = cpu_seconds()
    loop.add_reader(sock.fileno(), readable)
    await done
    return counts[0], counts[1], cpu_seconds() - started


def wake(rate: float, seconds: float) -> dict[str, Any]:
    reader, writer = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        reader.close()
        _writer(writer, rate, seconds)
        os._exit(0)
    writer.close()
    reader.setblocking(False)
    messages, wakes, cpu = run_loop(_read_until_closed(reader))
    os.waitpid(pid, 0)
    reader.close()
    record = {
        "rate": rate,
        "messages": messages,
        "wakes": wakes,
        "cpu_ms_per_message": round(cpu / max(1, messages) * 1000, 4),
    }
    log(
        f"wake: {messages} messages at {rate:.0f}/s, {wakes} wake-ups,"
        f" {record['cpu_ms_per_message']} ms CPU per message"
    )
    return record


async def _hold(port: int, count: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()

    class Reader(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    for _ in range(count):
        await loop.create_connection(Reader, "127.0.0.1", port)
    await asyncio.sleep(seconds)


async def _beat(listener: socket.socket, streams: int, interval: float, seconds: float) -> Any:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []

    class Held(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Held, sock=listener)
    deadline = time.monotonic() + 120
    while len(transports) < streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not transports:
        raise SystemExit("no client connected")
    await asyncio.sleep(2)  # let the connecting settle
    per_tick = max(1, round(len(transports) * TICK_S / interval))
    writes, position = 0, 0
    started, cpu_a = time.monotonic(), cpu_seconds()
    while time.monotonic() - started < seconds:
        for _ in range(per_tick):
            transports[position % len(transports)].write(HEARTBEAT)
            position += 1
        writes += per_tick
        await asyncio.sleep(TICK_S)
    elapsed, cpu = time.monotonic() - started, cpu_seconds() - cpu_a
    server.close()
    return {
        "streams": len(transports),
        "writes_per_s": round(writes / elapsed, 1),
        "cpu_s_per_s": round(cpu / elapsed, 4),
        "cpu_ms_per_write": round(cpu / max(1, writes) * 1000, 4),
    }


def heartbeats(streams: int, interval: float, seconds: float) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    # the clients in processes of their own, as the fan-out benchmark's load is
    clients = [
        subprocess.Popen(
            [sys.executable, __file__, "--hold", str(port), str(count), str(seconds + 120)]
        )
        for count in (streams // 2, streams - streams // 2)
    ]
    try:
        record: dict[str, Any] = run_loop(_beat(listener, streams, interval, seconds))
    finally:
        for client in clients:
            client.kill()
            client.wait()
    log(
        f"heartbeats: {record['streams']} connections, {record['writes_per_s']} writes/s,"
        f" {record['cpu_s_per_s'] * 100:.1f} % of a core, {record['cpu_ms_per_write']} ms CPU"
        " per write"
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="messages per second (wake)")
    parser.add_argument("--streams", type=int, default=10_000, help="connections (heartbeats)")
    parser.add_argument("--interval", type=float, default=15, help="seconds between beats")
    parser.add_argument("--seconds", type=float, default=20, help="length of each phase")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a lower load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--hold", nargs=3, help=argparse.SUPPRESS)  # a client process
    args = parser.parse_args()
    if args.hold:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        port, count, seconds = args.hold
        run_loop(_hold(int(port), int(count), float(seconds)))
        return
    load = wait_for_quiet(args.max_load, 900)
    log(f"load average {load}")
    results = {
        "wake": wake(args.rate, args.seconds),
        "heartbeats": heartbeats(args.streams, args.interval, args.seconds),
        "command": "python benchmarks/floor.py " + " ".join(sys.argv[1:]),
        "version": head(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load,
        "load_average_after": load_average(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "floor.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "floor.png")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wake, beats = results["wake"], results["heartbeats"]
    labels = [
        f"a wake-up for one message\n({wake['rate']:.0f} messages/s)",
        f"a heartbeat write\n({beats['streams']} connections)",
    ]
    values = [wake["cpu_ms_per_message"], beats["cpu_ms_per_write"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, values, color=["#2b6cb0", "#90cdf4"])
    for x, value in enumerate(values):
        ax.annotate(f"{value:.3f}", (x, value), ha="center", va="bottom")
    ax.set_ylabel("CPU ms")
    ax.set_title(f"the event loop alone (uvloop), {results['cpus']} cores", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
