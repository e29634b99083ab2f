"""The badge queries: what a badge counts, as SQL, for the snapshot and ``replicator verify``."""

from __future__ import annotations

from replicator.badges.state import MISSED, UNREAD

# The single source of truth for what a badge is; the snapshot and `replicator verify` run these.
BADGE_QUERIES = {
    UNREAD: (
        "SELECT recipient_id::text, sender_id::text, count(*) FROM {schema}.messages"
        " WHERE read_at IS NULL AND recipient_id IS NOT NULL AND sender_id IS NOT NULL"
        " GROUP BY 1, 2"
    ),
    MISSED: (
        "SELECT callee_id::text, caller_id::text, count(*) FROM {schema}.calls"
        " WHERE status = 'missed' AND seen_at IS NULL"
        " AND callee_id IS NOT NULL AND caller_id IS NOT NULL"
        " GROUP BY 1, 2"
    ),
}
