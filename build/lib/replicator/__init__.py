"""Live unread-message and missed-call badges from PostgreSQL logical replication."""

from __future__ import annotations

__version__ = "0.1.0"
