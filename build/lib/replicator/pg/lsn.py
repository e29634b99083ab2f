"""PostgreSQL log sequence numbers: parse and format the ``X/Y`` text form."""

from __future__ import annotations

from replicator.errors import ProtocolError


def parse_lsn(text: str) -> int:
    """Parse ``'16/B374D848'`` into an integer."""
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ProtocolError(f"invalid LSN {text!r}: expected the form X/Y")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise ProtocolError(f"invalid LSN {text!r}: expected hexadecimal X/Y") from None


def format_lsn(lsn: int) -> str:
    """Format an integer LSN the way PostgreSQL prints it."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
