"""The replication pipeline: snapshot at start-up, then the stream, reconnects and shutdown."""
