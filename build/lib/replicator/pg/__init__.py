"""PostgreSQL's side: LSNs, copy-both framing, decoders, the walsender connection and slots.

Nothing here imports ``replicator.badges``: rows leave this package as plain values."""
