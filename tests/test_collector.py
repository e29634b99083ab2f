"""The collector policy: what piles up in the oldest generation is frozen, and looked at only
when something could have been added."""

from __future__ import annotations

import gc

from replicator.runtime.collector import MAX_UNFROZEN, FreezingCollector


def test_a_pile_of_long_lived_objects_is_frozen_once() -> None:
    collector = FreezingCollector()
    try:
        collector.freeze_now()
        frozen = gc.get_freeze_count()
        pile = [[i] for i in range(MAX_UNFROZEN + 10_000)]
        gc.collect(1)  # the survivors of the middle generation move to the oldest
        collector.freeze_if_due()
        assert collector.forced_collections == 1
        assert gc.get_freeze_count() >= frozen + len(pile)
        assert len(gc.get_objects(generation=2)) < MAX_UNFROZEN
        # Nothing moved into the oldest generation since: no second collection.
        collector.freeze_if_due()
        assert collector.forced_collections == 1
    finally:
        gc.unfreeze()
