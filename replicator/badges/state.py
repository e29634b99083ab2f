"""Badge state: per-user counts by counterpart, one map per badge, changed only at commit.

Kept compact, because a million users must fit in a few hundred MB. Ids are held in a compact
form that depends only on their text (``key_of``): the canonical text of a uuid becomes an
``int`` above ``UUID_BASE``, a canonical integer an ``int``, anything else stays text (a 129-bit
int takes 48 bytes of memory, a 36-character str 96); so no column type is needed
and the text form, which is what users are known by, always comes back exactly. A user with
few counts keeps them all in one ``bytes`` of records (badge, counterpart, count); a user with
many keeps one dict per badge and the totals (``Wide``), so that a change costs what it
touches, not what the user has.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
Key = int | str
#: per badge, the counterparts whose counts a commit moved -> their new count (0: cleared)
Moved = list[dict[str, int]]
#: what a commit changed, by user: what moved, or None when only the whole state will do
Changes = Mapping[str, Moved | None]

#: a user whose records take more bytes than this keeps dicts instead (about 9 uuids)
SMALL_BYTES = 200
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
#: uuids are keyed by their 128 bits plus this, above every integer id
UUID_BASE = 2**128
#: a count outside a signed 32-bit record field makes the user wide
_COUNT_LIMIT = 2**31
_UUID, _INT, _TEXT = 0, 1, 2
#: record count fields of the most common counts, made once (fewer short-lived objects
#: while the snapshot loads means less memory left in holes between long-lived ones)
_COUNTS = [n.to_bytes(4, "big", signed=True) for n in range(4096)]
#: 0x01 then a uuid's 16 bytes is its key, UUID_BASE + its 128 bits
_UUID_HIGH = b"\x01"


def key_of(text: str) -> Key:
    """The compact key of an id's text form; ``text_of`` gives the text back exactly."""
    n = len(text)
    if n == 36:
        if text[8] == "-" and text[13] == "-" and text[18] == "-" and text[23] == "-":
            digits = text[:8] + text[9:13] + text[14:18] + text[19:23] + text[24:]
            try:
                raw = bytes.fromhex(digits)
            except ValueError:
                return text
            # fromhex also takes upper case and spaces: only the canonical text is compacted
            if len(raw) == 16 and raw.hex() == digits:
                return int.from_bytes(raw) + UUID_BASE
        return text
    if 0 < n <= 20 and text.isascii() and (text.isdigit() or text[1:].isdigit()):
        try:
            number = int(text)
        except ValueError:
            return text
        if _INT_MIN <= number <= _INT_MAX and str(number) == text:
            return number
    return text


def uuid_key(raw: bytes) -> int:
    """The key of a uuid read as its 16 bytes."""
    return int.from_bytes(raw) + UUID_BASE


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def text_of(key: Key) -> str:
    if type(key) is int:
        return _uuid_text((key - UUID_BASE).to_bytes(16)) if key >= UUID_BASE else str(key)
    return key  # type: ignore[return-value]


def _ident(badge: int, key: Key) -> bytes:
    """A record's identity: the badge, the counterpart's kind and its bytes."""
    if type(key) is int:
        if key >= UUID_BASE:
            return bytes((badge, _UUID)) + (key - UUID_BASE).to_bytes(16)
        return bytes((badge, _INT)) + key.to_bytes(8, "big", signed=True)
    encoded = key.encode()  # type: ignore[union-attr]
    return bytes((badge, _TEXT)) + len(encoded).to_bytes(4, "big") + encoded


def _parse(blob: bytes) -> dict[bytes, int]:
    """A small user's records: identity -> count."""
    records: dict[bytes, int] = {}
    pos, end = 0, len(blob)
    from_bytes = int.from_bytes
    while pos < end:
        kind = blob[pos + 1]
        if kind == _UUID:
            stop = pos + 18
        elif kind == _INT:
            stop = pos + 10
        else:
            stop = pos + 6 + from_bytes(blob[pos + 2 : pos + 6], "big")
        records[blob[pos:stop]] = from_bytes(blob[stop : stop + 4], "big", signed=True)
        pos = stop + 4
    return records


def _counterpart(ident: bytes) -> str:
    kind = ident[1]
    if kind == _UUID:
        return _uuid_text(ident[2:])
    if kind == _INT:
        return str(int.from_bytes(ident[2:], "big", signed=True))
    return ident[6:].decode()


def _pack(records: Mapping[bytes, int]) -> bytes:
    return b"".join(i + n.to_bytes(4, "big", signed=True) for i, n in records.items())


class Wide:
    """A user with many counts: one {counterpart text: count} per badge, and the totals."""

    __slots__ = ("maps", "totals")

    def __init__(self, maps: list[dict[str, int]], totals: list[int]) -> None:
        self.maps = maps
        self.totals = totals

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Wide) and self.maps == other.maps

    __hash__ = None  # type: ignore[assignment]


def _widen(records: Mapping[bytes, int], badges: int) -> Wide:
    maps: list[dict[str, int]] = [{} for _ in range(badges)]
    for ident, count in records.items():
        maps[ident[0]][_counterpart(ident)] = count
    return Wide(maps, [sum(m.values()) for m in maps])


class BadgeState:
    """The counts of every user with at least one badge, exact as of ``lsn``.

    ``names`` are the badges in file order; ``grouped`` says, per badge, whether it counts by
    counterpart (else its one count per user is kept under the counterpart ``''``).
    """

    def __init__(self, names: Sequence[str], grouped: Sequence[bool]) -> None:
        # the badges file allows no more (spec.MAX_BADGES): records keep it in one byte
        assert len(names) <= 255
        self.names = tuple(names)
        self.grouped = tuple(grouped)
        #: compact user key -> packed records, or a Wide
        self._users: dict[Key, bytes | Wide] = {}
        #: commit LSN of the last transaction applied (the LSN clients are shown)
        self.lsn = 0

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Users with at least one count."""
        return len(self._users)

    def __contains__(self, user: str) -> bool:
        return key_of(user) in self._users

    def user_ids(self) -> Iterator[str]:
        return (text_of(k) for k in self._users)

    def view(self, user: str) -> list[dict[str, int]]:
        """The user's counts, one {counterpart: count} per badge (read-only)."""
        held = self._users.get(key_of(user))
        return self._view(held)

    def _view(self, held: bytes | Wide | None) -> list[dict[str, int]]:
        if held is None:
            return [{} for _ in self.names]
        if type(held) is Wide:
            return held.maps
        maps: list[dict[str, int]] = [{} for _ in self.names]
        for ident, count in _parse(held).items():  # type: ignore[arg-type]
            maps[ident[0]][_counterpart(ident)] = count
        return maps

    def summary(self, user: str) -> tuple[list[int], int]:
        """The user's total per badge and how many (badge, counterpart) counts it has, at a
        cost that does not grow with its counterparts."""
        held = self._users.get(key_of(user))
        if type(held) is Wide:
            return list(held.totals), sum(len(m) for m in held.maps)
        totals = [0] * len(self.names)
        if held is None:
            return totals, 0
        records = _parse(held)  # type: ignore[arg-type]
        for ident, count in records.items():
            totals[ident[0]] += count
        return totals, len(records)

    def items(self) -> Iterator[tuple[str, list[dict[str, int]]]]:
        """Every user's counts (for verification and tests: this walks the whole state)."""
        for key, held in self._users.items():
            yield text_of(key), self._view(held)

    def differences(self, other: BadgeState) -> Differences:
        """The users whose counts differ between this state and ``other``."""
        return Differences(self, other)

    # -- writing ---------------------------------------------------------------------------

    def load(self, badge: int, rows: Iterable[tuple[bytes | Key, bytes | Key, int]]) -> None:
        """Add snapshot rows of one badge: (user, counterpart, count), each pair once.

        Ids may come as text, as their key, or a uuid as its 16 bytes, as the snapshot reads
        them.
        """
        users = self._users
        get = users.get
        uuid_head, join, counts = bytes((badge, _UUID)), b"".join, _COUNTS
        for user, counterpart, count in rows:
            if not count:
                continue
            key: Key
            if isinstance(user, bytes):
                key = int.from_bytes(_UUID_HIGH + user)
            else:
                key = key_of(user) if isinstance(user, str) else user
            held = get(key)
            if isinstance(counterpart, bytes) and 0 < count < 4096 and not isinstance(held, Wide):
                # the common case, with one allocation for the record
                record = join((uuid_head, counterpart, counts[count]))
                if held is None:
                    users[key] = record
                    continue
                if len(held) + len(record) <= SMALL_BYTES:
                    users[key] = held + record
                    continue
            self._add(key, held, badge, counterpart, count)

    def _add(
        self, key: Key, held: bytes | Wide | None, badge: int, counterpart: bytes | Key, count: int
    ) -> None:
        """One snapshot row, any ids and count."""
        if isinstance(counterpart, bytes):
            ident = bytes((badge, _UUID)) + counterpart
        else:
            ident = _ident(
                badge, key_of(counterpart) if isinstance(counterpart, str) else counterpart
            )
        if isinstance(held, Wide):
            held.maps[badge][_counterpart(ident)] = count
            held.totals[badge] += count
            return
        if -_COUNT_LIMIT <= count < _COUNT_LIMIT:
            record = ident + count.to_bytes(4, "big", signed=True)
            if held is None:
                self._users[key] = record
                return
            if len(held) + len(record) <= SMALL_BYTES:
                self._users[key] = held + record
                return
        records = {} if held is None else _parse(held)
        records[ident] = count
        self._users[key] = _widen(records, len(self.names))

    def merge(
        self,
        deltas: Sequence[Mapping[Pair, int]],
        truncated: set[int],
        lsn: int,
    ) -> dict[str, Moved | None]:
        """Apply one committed transaction; return what it changed for whom."""
        changes: dict[str, Moved | None] = {}
        if truncated:
            self._truncate(truncated, changes)
        # A user's records are read and written once per transaction, whatever it touched.
        by_user: dict[str, list[tuple[int, str, int]]] = {}
        for badge, buffer in enumerate(deltas):
            for (user, counterpart), delta in buffer.items():
                if delta:
                    found = by_user.get(user)
                    if found is None:
                        by_user[user] = [(badge, counterpart, delta)]
                    else:
                        found.append((badge, counterpart, delta))
        for user, touched in by_user.items():
            moved = self._apply(user, touched, lsn)
            if user not in changes:
                changes[user] = moved
        self.lsn = lsn
        return changes

    def _apply(self, user: str, touched: list[tuple[int, str, int]], lsn: int) -> Moved:
        users = self._users
        key = key_of(user)
        held = users.get(key)
        moved: Moved = [{} for _ in self.names]
        if type(held) is Wide:
            maps, totals = held.maps, held.totals
            for badge, counterpart, delta in touched:
                by_counterpart = maps[badge]
                count = by_counterpart.get(counterpart, 0) + delta
                self._check(count, badge, user, counterpart, lsn)
                if count:
                    by_counterpart[counterpart] = count
                else:
                    del by_counterpart[counterpart]
                totals[badge] += delta
                moved[badge][counterpart] = count
            if not any(maps):
                del users[key]
            return moved
        records = {} if held is None else _parse(held)  # type: ignore[arg-type]
        wide = False
        for badge, counterpart, delta in touched:
            ident = _ident(badge, key_of(counterpart))
            count = records.get(ident, 0) + delta
            self._check(count, badge, user, counterpart, lsn)
            if count:
                records[ident] = count
                if not -_COUNT_LIMIT <= count < _COUNT_LIMIT:
                    wide = True
            else:
                del records[ident]
            moved[badge][counterpart] = count
        if not records:
            users.pop(key, None)
            return moved
        blob = b"" if wide else _pack(records)
        users[key] = _widen(records, len(self.names)) if wide or len(blob) > SMALL_BYTES else blob
        return moved

    def _check(self, count: int, badge: int, user: str, counterpart: str, lsn: int) -> None:
        if count < 0:
            logger.error(
                "%s of %s from %r would be %d at %s: state and database disagree",
                self.names[badge],
                user,
                counterpart,
                count,
                format_lsn(lsn),
            )

    def _truncate(self, truncated: set[int], changes: dict[str, Moved | None]) -> None:
        users = self._users
        for key, held in list(users.items()):
            if type(held) is Wide:
                if not any(held.maps[b] for b in truncated):
                    continue
                for b in truncated:
                    held.maps[b] = {}
                    held.totals[b] = 0
                if not any(held.maps):
                    del users[key]
            else:
                records = _parse(held)  # type: ignore[arg-type]
                kept = {i: n for i, n in records.items() if i[0] not in truncated}
                if len(kept) == len(records):
                    continue
                if kept:
                    users[key] = _pack(kept)
                else:
                    del users[key]
            changes[text_of(key)] = None


class Differences(Mapping[str, None]):
    """The users whose counts differ between two states, each worked out when asked: after a
    fresh snapshot of a million users, only the connected ones need to be."""

    def __init__(self, old: BadgeState, new: BadgeState) -> None:
        self._old, self._new = old, new
        self._count: int | None = None

    def _differ(self, key: Key) -> bool:
        a, b = self._old._users.get(key), self._new._users.get(key)
        if a is None or b is None:
            return a is not b
        return a != b and self._old._view(a) != self._new._view(b)

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and self._differ(key_of(user))

    def __getitem__(self, user: str) -> None:
        if user not in self:
            raise KeyError(user)

    def __iter__(self) -> Iterator[str]:
        old, new = self._old._users, self._new._users
        for key in new:
            if key not in old or self._differ(key):
                yield text_of(key)
        for key in old:
            if key not in new:
                yield text_of(key)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count

    def __bool__(self) -> bool:
        return next(iter(self), None) is not None
