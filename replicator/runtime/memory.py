"""Large pages for the service's heap: ``serve`` starts itself again, once, to get them.

Ten thousand streams and a million users' counts are a few hundred megabytes of small
objects, and every heartbeat, event and reconnect touches a few of them, somewhere in that
heap, that nothing touched for seconds. With 4 kB pages most of those touches miss the TLB,
and under a hypervisor each miss walks two sets of page tables: measured at 10,000 idle
streams on a KVM guest, that was most of what a heartbeat cost (idle CPU 5-14 % of a core
with 4 kB pages, 3 % with 2 MB ones).

Transparent huge pages back memory with 2 MB pages, but where the kernel gives them only to
memory that asks (``madvise``, the default on Debian and Ubuntu), CPython's own allocator
never asks. So the service runs with CPython allocating from glibc's malloc
(``PYTHONMALLOC=malloc``) and glibc asking for huge pages (``glibc.malloc.hugetlb=1``, glibc
2.35 and later). Both are read when the interpreter starts, hence the second start: the same
process (``exec``, so the PID, the open files and the signals stay), the same command line.
A ``PYTHONMALLOC`` set by whoever started the service is left as it is: that is also how
to keep CPython's allocator (``PYTHONMALLOC=pymalloc``).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_has_hugetlb() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _huge_pages_possible() -> bool:
    try:
        mode = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def large_page_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start again with, or None when this one is as it should be (or
    large pages are not to be had here)."""
    if "PYTHONMALLOC" in environ or sys.platform != "linux":
        return None
    if not _glibc_has_hugetlb() or not _huge_pages_possible():
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" not in tunables:
        tunables = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return {**environ, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": tunables}


def start_again_with_large_pages() -> None:
    """Replace this process with the same command on a large-page heap; returns only when
    that is not needed or not possible."""
    env = large_page_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as exc:
        logger.warning("could not start again with large pages (%s); going on without", exc)
