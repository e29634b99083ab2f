"""Badge state: per-user counts by counterpart, changed only at commit."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from replicator.pg.lsn import format_lsn

logger = logging.getLogger(__name__)

UNREAD, MISSED = 0, 1
BADGE_NAMES = ("unread_messages", "missed_calls")

#: user -> [unread by sender, missed by caller]
Counts = list[dict[str, int]]
Pair = tuple[str, str]


class BadgeState:
    """The counts of every user with at least one badge, exact as of ``lsn``."""

    def __init__(self) -> None:
        self.users: dict[str, Counts] = {}
        #: commit LSN of the last transaction applied (the LSN clients are shown)
        self.lsn = 0

    def load(self, badge: int, rows: Iterable[tuple[str, str, int]]) -> None:
        users = self.users
        for user, counterpart, count in rows:
            if count:
                counts = users.get(user)
                if counts is None:
                    counts = self.users[user] = [{}, {}]
                counts[badge][counterpart] = count

    def view(self, user: str) -> tuple[dict[str, int], dict[str, int]]:
        counts = self.users.get(user)
        if counts is None:
            return {}, {}
        return counts[UNREAD], counts[MISSED]

    def merge(
        self,
        deltas: tuple[dict[Pair, int], dict[Pair, int]],
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
        for badge in (UNREAD, MISSED):
            for (user, counterpart), delta in deltas[badge].items():
                if not delta:
                    continue
                counts = users.get(user)
                if counts is None:
                    counts = [{}, {}]
                    users[user] = counts
                by_counterpart = counts[badge]
                total = by_counterpart.get(counterpart, 0) + delta
                if total:
                    if total < 0:
                        logger.error(
                            "%s of %s from %s would be %d at %s: state and database disagree",
                            BADGE_NAMES[badge],
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
            if left is not None and not left[0] and not left[1]:
                del users[user]
        self.lsn = lsn
        return changed
