-- Messages and calls, the two tables badges are counted from.
CREATE TABLE IF NOT EXISTS messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender_id uuid NOT NULL,
    recipient_id uuid NOT NULL,
    body text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at timestamptz
);

CREATE TABLE IF NOT EXISTS calls (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    caller_id uuid NOT NULL,
    callee_id uuid NOT NULL,
    status text NOT NULL CHECK (status IN ('ringing', 'answered', 'missed', 'declined')),
    created_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz
);
