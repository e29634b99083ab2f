"""Badges: what counts, the in-memory state, and how row changes move it.

Nothing here sees bytes: rows arrive as plain values from ``replicator.pg``."""
