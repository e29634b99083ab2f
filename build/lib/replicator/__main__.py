"""Run as ``python -m replicator``."""

from __future__ import annotations

from replicator.ops.cli import main

raise SystemExit(main())
