"""Pure decoding of pgoutput (protocol version 1) messages: bytes in, messages out, no I/O.

Row tuples are decoded lazily: for each relation the caller says which columns it wants
(``Decoder.project``) and in which slot of the result each goes; every other column is
skipped by its length without being decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from replicator.errors import ProtocolError
from replicator.lsn import format_lsn


class _Unchanged:
    """An unchanged TOASTed value (``u``): the column keeps its old value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = str | bytes | None | _Unchanged
Values = list[Value]

_I8 = struct.Struct(">B")
_I16 = struct.Struct(">H")
_I32 = struct.Struct(">I")
_I64 = struct.Struct(">Q")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_TRUNCATE_HEAD = struct.Struct(">IB")
_COLUMN_TAIL = struct.Struct(">Ii")
_MESSAGE_HEAD = struct.Struct(">BQ")

_N, _U, _T, _B = ord("n"), ord("u"), ord("t"), ord("b")
_OLD, _KEY, _NEW = ord("O"), ord("K"), ord("N")


class Begin(NamedTuple):
    final_lsn: int
    commit_time: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


class Origin(NamedTuple):
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


class Type(NamedTuple):
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    relid: int
    new: Values | None


class Update(NamedTuple):
    relid: int
    old: Values | None
    new: Values | None
    #: ``O`` when the old tuple is the whole row (replica identity full), ``K`` for the key only
    old_kind: str


class Delete(NamedTuple):
    relid: int
    old: Values | None
    old_kind: str


class Truncate(NamedTuple):
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


class LogicalMessage(NamedTuple):
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8"), end + 1


class Decoder:
    """Decodes pgoutput messages, remembering the relations announced so far.

    ``project(relid, slots)`` sets, for one relation, the slot in the result list of each
    column (``-1``: skip it). Relations with no projection decode to ``None`` tuples, at the
    cost of walking nothing: their bytes are not even looked at.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._slots: dict[int, tuple[tuple[int, ...], int]] = {}

    def project(self, relid: int, slots: tuple[int, ...]) -> None:
        width = max(slots, default=-1) + 1
        self._slots[relid] = (slots, width)

    def forget(self, relid: int) -> None:
        self._slots.pop(relid, None)

    def decode(self, data: bytes | memoryview, lsn: int = 0) -> Message:
        """Decode one pgoutput message; ``lsn`` only serves error messages."""
        if not data:
            raise ProtocolError(f"empty pgoutput message at {format_lsn(lsn)}")
        tag = data[0]
        try:
            if tag == 0x49:  # I
                return self._insert(data)
            if tag == 0x55:  # U
                return self._update(data)
            if tag == 0x44:  # D
                return self._delete(data)
            if tag == 0x42:  # B
                return self._fixed(data, Begin, _BEGIN)
            if tag == 0x43:  # C
                return self._fixed(data, Commit, _COMMIT)
            if tag == 0x52:  # R
                return self._relation(data)
            if tag == 0x59:  # Y
                return self._type(data)
            if tag == 0x4F:  # O
                return self._origin(data)
            if tag == 0x54:  # T
                return self._truncate(data)
            if tag == 0x4D:  # M
                return self._message(data)
        except ProtocolError as exc:
            raise ProtocolError(f"{exc} in {chr(tag)!r} message at {format_lsn(lsn)}") from None
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"malformed {chr(tag)!r} message at {format_lsn(lsn)}: {exc}"
            ) from None
        raise ProtocolError(
            f"unknown pgoutput message type {tag:#04x} ({chr(tag)!r}) at {format_lsn(lsn)}"
        )

    @staticmethod
    def _fixed(data: bytes | memoryview, cls: type, layout: struct.Struct) -> Message:
        if len(data) != 1 + layout.size:
            raise ProtocolError(f"length {len(data)}, expected {1 + layout.size}")
        result: Message = cls(*layout.unpack_from(data, 1))
        return result

    def _tuple(self, data: bytes | memoryview, pos: int, relid: int) -> tuple[Values | None, int]:
        (ncols,) = _I16.unpack_from(data, pos)
        pos += 2
        projection = self._slots.get(relid)
        if projection is None:
            # Not a relation we care about: walk it only to find where it ends.
            for _ in range(ncols):
                kind = data[pos]
                if kind == _T or kind == _B:
                    pos += 5 + _I32.unpack_from(data, pos + 1)[0]
                elif kind == _N or kind == _U:
                    pos += 1
                else:
                    raise ProtocolError(f"unknown tuple value kind {kind:#04x}")
            return None, pos
        slots, width = projection
        if ncols > len(slots):
            raise ProtocolError(f"tuple of {ncols} columns for a relation of {len(slots)}")
        values: Values = [None] * width
        unpack_len = _I32.unpack_from
        for col in range(ncols):
            kind = data[pos]
            if kind == _T:
                end = pos + 5 + unpack_len(data, pos + 1)[0]
                slot = slots[col]
                if slot >= 0:
                    if end > len(data):
                        raise ProtocolError("value runs past the end of the message")
                    values[slot] = str(data[pos + 5 : end], "utf-8")
                pos = end
            elif kind == _N:
                pos += 1
            elif kind == _U:
                if slots[col] >= 0:
                    values[slots[col]] = UNCHANGED
                pos += 1
            elif kind == _B:
                end = pos + 5 + unpack_len(data, pos + 1)[0]
                if slots[col] >= 0:
                    if end > len(data):
                        raise ProtocolError("value runs past the end of the message")
                    values[slots[col]] = bytes(data[pos + 5 : end])
                pos = end
            else:
                raise ProtocolError(f"unknown tuple value kind {kind:#04x}")
        return values, pos

    def _check_end(self, data: bytes | memoryview, pos: int) -> None:
        if pos != len(data):
            raise ProtocolError(f"{len(data) - pos} bytes left over")

    def _insert(self, data: bytes | memoryview) -> Insert:
        (relid,) = _I32.unpack_from(data, 1)
        if data[5] != _NEW:
            raise ProtocolError(f"expected 'N' at byte 5, got {data[5]:#04x}")
        new, pos = self._tuple(data, 6, relid)
        self._check_end(data, pos)
        return Insert(relid, new)

    def _update(self, data: bytes | memoryview) -> Update:
        (relid,) = _I32.unpack_from(data, 1)
        pos = 5
        old: Values | None = None
        old_kind = ""
        if data[pos] == _OLD or data[pos] == _KEY:
            old_kind = chr(data[pos])
            old, pos = self._tuple(data, pos + 1, relid)
        if data[pos] != _NEW:
            raise ProtocolError(f"expected 'N' at byte {pos}, got {data[pos]:#04x}")
        new, pos = self._tuple(data, pos + 1, relid)
        self._check_end(data, pos)
        return Update(relid, old, new, old_kind)

    def _delete(self, data: bytes | memoryview) -> Delete:
        (relid,) = _I32.unpack_from(data, 1)
        kind = data[5]
        if kind != _OLD and kind != _KEY:
            raise ProtocolError(f"expected 'O' or 'K' at byte 5, got {kind:#04x}")
        old, pos = self._tuple(data, 6, relid)
        self._check_end(data, pos)
        return Delete(relid, old, chr(kind))

    def _relation(self, data: bytes | memoryview) -> Relation:
        raw = bytes(data)
        (relid,) = _I32.unpack_from(raw, 1)
        namespace, pos = _cstring(raw, 5)
        name, pos = _cstring(raw, pos)
        replident = chr(raw[pos])
        (ncols,) = _I16.unpack_from(raw, pos + 1)
        pos += 3
        columns = []
        for _ in range(ncols):
            flags = raw[pos]
            colname, pos = _cstring(raw, pos + 1)
            type_oid, typmod = _COLUMN_TAIL.unpack_from(raw, pos)
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        self._check_end(raw, pos)
        # pgoutput sends an empty namespace for pg_catalog
        relation = Relation(relid, namespace or "pg_catalog", name, replident, tuple(columns))
        self.relations[relid] = relation
        self._slots.pop(relid, None)
        return relation

    def _type(self, data: bytes | memoryview) -> Type:
        raw = bytes(data)
        (oid,) = _I32.unpack_from(raw, 1)
        namespace, pos = _cstring(raw, 5)
        name, pos = _cstring(raw, pos)
        self._check_end(raw, pos)
        return Type(oid, namespace, name)

    def _origin(self, data: bytes | memoryview) -> Origin:
        raw = bytes(data)
        (lsn,) = _I64.unpack_from(raw, 1)
        name, pos = _cstring(raw, 9)
        self._check_end(raw, pos)
        return Origin(lsn, name)

    def _truncate(self, data: bytes | memoryview) -> Truncate:
        nrels, options = _TRUNCATE_HEAD.unpack_from(data, 1)
        pos = 6
        relids = struct.unpack_from(f">{nrels}I", data, pos)
        pos += 4 * nrels
        self._check_end(data, pos)
        return Truncate(tuple(relids), bool(options & 1), bool(options & 2))

    def _message(self, data: bytes | memoryview) -> LogicalMessage:
        raw = bytes(data)
        flags, lsn = _MESSAGE_HEAD.unpack_from(raw, 1)
        prefix, pos = _cstring(raw, 10)
        (length,) = _I32.unpack_from(raw, pos)
        pos += 4
        content = raw[pos : pos + length]
        if len(content) != length:
            raise ProtocolError("message content runs past the end")
        self._check_end(raw, pos + length)
        return LogicalMessage(bool(flags & 1), lsn, prefix, content)
