"""Garbage-collector policy for a process holding many long-lived objects (state, streams).

A full collection walks every tracked object: with ten thousand open streams that is about a
million objects and a pause of several hundred milliseconds, during which no event goes out.
Nearly all of them are long-lived and freed by reference counting when their stream ends
(the uvloop transports and the stream code form no reference cycles), so walking them again
finds nothing. After each full collection its survivors are therefore frozen (moved where
the collector no longer looks), and the next full collection walks only what is newer.

The price: an object frozen while alive that later becomes garbage *in a cycle* is never
freed. Survivors of a full collection are long-lived by then, and what the service keeps
long (badge counts, streams, connections) is acyclic, so this stays small;
``gc.get_freeze_count()`` shows how many objects are frozen.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import anyio

logger = logging.getLogger(__name__)

#: seconds between checks for a finished full collection
CHECK_S = 1.0
#: unfrozen long-lived objects that make a full collection due (about 10 ms of walking)
MAX_UNFROZEN = 50_000


class FreezingCollector:
    """Freezes the survivors of every full collection; forces one when too much is unfrozen."""

    def __init__(self) -> None:
        self.full_collections = 0
        self.forced_collections = 0
        self._due = False
        #: collections of the middle generation at the last look
        self._promotions_seen = -1

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Freezing inside the callback would change the generations the collector is
        # still finishing with, so it only marks the freeze as due.
        if phase == "stop" and info["generation"] == 2:
            self.full_collections += 1
            self._due = True

    def freeze_now(self) -> None:
        """Collect everything once and freeze what survives (after start-up)."""
        self._due = False
        gc.collect()
        gc.freeze()
        logger.debug("frozen %d objects", gc.get_freeze_count())

    def freeze_if_due(self) -> None:
        if self._due:
            self._due = False
            gc.freeze()
            return
        # Only the middle generation's collections move objects into the oldest, so while
        # there has been none since the last look it has not grown, and is not counted again:
        # counting walks every object in it, scattered across the heap (milliseconds).
        promotions = gc.get_stats()[1]["collections"]
        if promotions == self._promotions_seen:
            return
        self._promotions_seen = promotions
        if len(gc.get_objects(generation=2)) > MAX_UNFROZEN:
            # Streams opening in numbers would otherwise pile up until CPython's own
            # trigger (a quarter more than last time), then cost one long pause.
            self.forced_collections += 1
            gc.collect()
            gc.freeze()

    async def run(self) -> None:
        """Install the policy, apply it until cancelled, then remove it."""
        gc.callbacks.append(self._on_collection)
        try:
            while True:
                await anyio.sleep(CHECK_S)
                self.freeze_if_due()
        finally:
            gc.callbacks.remove(self._on_collection)
