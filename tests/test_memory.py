"""The large-page heap: ``serve`` starts itself again on glibc's malloc asking for huge pages,
unless told otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.runtime.memory import TUNABLE, large_page_environment
from tests.conftest import Server, create_database, drop_database
from tests.service_support import RunningService, running_service

SUPPORTED = large_page_environment({}) is not None


def test_the_environment_to_start_again_with() -> None:
    if not SUPPORTED:
        # no glibc 2.35+, or transparent huge pages are off: nothing to ask for
        assert large_page_environment({"PATH": "/bin"}) is None
        return
    env = large_page_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {
        "PATH": "/bin",
        "PYTHONMALLOC": "malloc",
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}",
    }
    kept = large_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert kept is not None and kept["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    # Whoever sets PYTHONMALLOC decides (and a second start sees its own setting).
    assert large_page_environment({"PYTHONMALLOC": "pymalloc"}) is None
    assert large_page_environment(env) is None


@pytest.fixture(scope="module")
def service(pg_server: Server) -> Iterator[RunningService]:
    db = create_database(pg_server)
    try:
        with running_service(db.dsn, db.slot) as svc:
            yield svc
    finally:
        drop_database(db)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_serve_runs_on_the_large_page_heap(service: RunningService) -> None:
    environ = _environ(service.process.pid)  # the same process, started again
    wanted = large_page_environment(os.environ)
    if wanted is not None:
        assert environ["PYTHONMALLOC"] == "malloc"
        assert TUNABLE in environ["GLIBC_TUNABLES"].split(":")
    else:
        assert environ.get("PYTHONMALLOC") == os.environ.get("PYTHONMALLOC")
    assert service.process.poll() is None
