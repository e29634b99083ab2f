"""Framing of the streaming replication copy-both protocol: XLogData, keepalives, status updates."""

from __future__ import annotations

import struct
import time
from typing import NamedTuple

from replicator.errors import ProtocolError

#: the WAL start and end of an XLogData message ('w', start, end, send time, then the payload)
XLOGDATA_POSITIONS = struct.Struct(">QQ")
XLOGDATA_HEADER = 1 + XLOGDATA_POSITIONS.size + 8
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")

#: microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01)
PG_EPOCH_OFFSET_US = 946_684_800_000_000


class Keepalive(NamedTuple):
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_keepalive(data: bytes | memoryview) -> Keepalive:
    if len(data) != 1 + _KEEPALIVE.size:
        raise ProtocolError(f"keepalive message of {len(data)} bytes, expected 18")
    wal_end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
    return Keepalive(wal_end, send_time, bool(reply))


def pg_now() -> int:
    """Now, in microseconds since 2000-01-01, as the protocol wants it."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


def pg_time_to_unix(pg_us: int) -> float:
    return (pg_us + PG_EPOCH_OFFSET_US) / 1_000_000


def standby_status(lsn: int, *, reply_requested: bool = False) -> bytes:
    """A Standby Status Update confirming ``lsn`` as written, flushed and applied."""
    return _STATUS.pack(b"r", lsn, lsn, lsn, pg_now(), 1 if reply_requested else 0)
