"""An earlier commit of this repository, installed in a virtualenv of its own, for benchmarks
that measure this version and that one in the same run."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: earlier versions, each installed in a virtualenv of its own
BASELINES = HERE / ".baselines"
#: the default baseline: the commit where this branch left main
DEFAULT_BASELINE = "merge-base"


def counts(text: str) -> list[int]:
    """``--users 1000,10000``-style lists of numbers."""
    return [int(x) for x in text.split(",")]


def comparison_arguments(parser: argparse.ArgumentParser, baseline_help: str) -> None:
    """``--baseline`` (a commit measured in the same run) and ``--max-load``."""
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        help=baseline_help + " (default: where this branch left main; none: skip)",
    )
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a lower load")


def cpu_seconds(pid: int | str = "self") -> float:
    """A process's CPU time, in nanoseconds' precision: each thread's time on a CPU from the
    scheduler (``/proc/<pid>/stat`` counts in 10 ms ticks, too coarse for a few changes per
    second)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # a thread may end while being read
        with suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=HERE.parent, check=True, capture_output=True, text=True
    ).stdout.strip()


def head() -> str:
    """This version: the short commit id, marked when the tree has uncommitted changes."""
    sha = git("rev-parse", "--short", "HEAD")
    return sha + ("+changes" if git("status", "--porcelain", "--", "replicator") else "")


def baseline_python(ref: str) -> tuple[Path, str]:
    """The Python of a virtualenv holding ``ref`` of this repository, installed (once) from
    a clean export of that commit, as a user would install it. ``merge-base``: where this
    branch left main."""
    if ref == DEFAULT_BASELINE:
        ref = git("merge-base", "HEAD", "main")
    sha = git("rev-parse", "--short", ref)
    home = BASELINES / sha
    python = home / "venv" / "bin" / "python"
    if python.exists():
        return python, sha
    log(f"installing baseline {ref} ({sha}) in {home}")
    shutil.rmtree(home, ignore_errors=True)
    source = home / "src"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", sha], cwd=HERE.parent, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], check=True)
    return python, sha


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def wait_for_quiet(limit: float, timeout: float) -> tuple[float, float, float]:
    """Wait (at most ``timeout`` s) until the 1-minute load average is below ``limit``, since
    other work on the machine would be billed to nobody but would slow everything down;
    return the load averages when the run starts."""
    deadline = time.monotonic() + timeout
    load = load_average()
    while load[0] >= limit and time.monotonic() < deadline:
        log(f"load average {load[0]:.2f} >= {limit}: waiting for a quieter moment")
        time.sleep(15)
        load = load_average()
    return load
