-- Partial indexes that serve the badge queries (the snapshot at start-up and `replicator verify`).
CREATE INDEX IF NOT EXISTS idx_messages_read_at
    ON messages (recipient_id, sender_id) WHERE read_at IS NULL;

CREATE INDEX IF NOT EXISTS idx_calls_missed_unread
    ON calls (callee_id, caller_id) WHERE status = 'missed' AND seen_at IS NULL;
