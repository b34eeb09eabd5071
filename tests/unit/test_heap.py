"""A server freezes what survives a full collection: later collections walk only newer
objects, a frozen record still goes when its block does, and new cycles are collected."""

from __future__ import annotations

import gc
import weakref
from typing import Iterator

import pytest

from kvpool import heap


class Record:
    """Stands for an index entry: small, tracked, no cycles."""

    __slots__ = ("key", "replicas", "__weakref__")

    def __init__(self, key: int) -> None:
        self.key, self.replicas = key, [key]


@pytest.fixture
def freezing() -> Iterator[None]:
    heap.freeze_survivors()
    try:
        yield
    finally:
        heap.stop_freezing()


def test_records_that_survived_a_full_collection_are_not_walked_again(freezing: None) -> None:
    records = [Record(i) for i in range(50_000)]
    before = heap.STATS.count
    gc.collect()
    assert heap.STATS.count == before + 1 and heap.STATS.last_s > 0
    assert heap.STATS.frozen >= len(records)
    walked = {id(o) for o in gc.get_objects()}
    assert not any(id(r) in walked for r in records[::997])
    gone = weakref.ref(records[-1])
    del records[-1]  # reference counting frees a frozen record at once
    assert gone() is None


def test_cycles_made_after_the_freeze_are_still_collected(freezing: None) -> None:
    gc.collect()
    a, b = Record(1), Record(2)
    a.replicas, b.replicas = [b], [a]
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    gc.collect()
    assert gone() is None


def test_stopping_unfreezes_everything() -> None:
    heap.freeze_survivors()
    gc.collect()
    assert heap.STATS.frozen > 0
    heap.stop_freezing()
    assert heap.STATS.frozen == 0 and heap._after_full not in gc.callbacks
