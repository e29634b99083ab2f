"""Badge state: per-user counts by counterpart, one map per badge, changed only at commit."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

#: user -> one {counterpart: count} per badge (counterpart '' for a badge without one)
Counts = list[dict[str, int]]
Pair = tuple[str, str]


class BadgeState:
    """The counts of every user with at least one badge, exact as of ``lsn``.

    ``names`` are the badges in file order; ``grouped`` says, per badge, whether it counts by
    counterpart (else its one count per user is kept under the counterpart ``''``).
    """

    def __init__(self, names: Sequence[str], grouped: Sequence[bool]) -> None:
        self.names = tuple(names)
        self.grouped = tuple(grouped)
        self.users: dict[str, Counts] = {}
        #: commit LSN of the last transaction applied (the LSN clients are shown)
        self.lsn = 0
        self._empty: tuple[dict[str, int], ...] = tuple({} for _ in self.names)

    def _new(self) -> Counts:
        return [{} for _ in self.names]

    def load(self, badge: int, rows: Iterable[tuple[str, str, int]]) -> None:
        users = self.users
        for user, counterpart, count in rows:
            if count:
                counts = users.get(user)
                if counts is None:
                    counts = users[user] = self._new()
                counts[badge][counterpart] = count

    def view(self, user: str) -> Sequence[dict[str, int]]:
        """The user's counts, one map per badge (read-only: the state's own maps)."""
        counts = self.users.get(user)
        return self._empty if counts is None else counts

    def merge(
        self,
        deltas: Sequence[dict[Pair, int]],
        truncated: set[int],
        lsn: int,
    ) -> set[str]:
        """Apply one committed transaction; return the users whose counts changed."""
        changed: set[str] = set()
        users = self.users
        for badge in truncated:
            for user, held in users.items():
                if held[badge]:
                    held[badge] = {}
                    changed.add(user)
        for badge, buffer in enumerate(deltas):
            for (user, counterpart), delta in buffer.items():
                if not delta:
                    continue
                counts = users.get(user)
                if counts is None:
                    counts = users[user] = self._new()
                by_counterpart = counts[badge]
                total = by_counterpart.get(counterpart, 0) + delta
                if total:
                    if total < 0:
                        logger.error(
                            "%s of %s from %r would be %d at %s: state and database disagree",
                            self.names[badge],
                            user,
                            counterpart,
                            total,
                            format_lsn(lsn),
                        )
                    by_counterpart[counterpart] = total
                else:
                    del by_counterpart[counterpart]
                changed.add(user)
        for user in changed:
            left = users.get(user)
            if left is not None and not any(left):
                del users[user]
        self.lsn = lsn
        return changed
